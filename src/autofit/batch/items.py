"""Reading and checking a batch job's prompts file (``.jsonl``, ``.csv``, ``.txt``).

Every item is checked before anything is generated. A bad item (a missing prompt, an unknown key,
a value the pipeline would choke on, a duplicate id) becomes a :class:`RejectedItem` that names its
line and what to do; the others still run. Only a file that cannot be read at all is refused whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autofit.errors import AutoFitUsageError

# Per-item settings passed through to the pipeline call when present.
CALL_KEYS = ("negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
             "num_images_per_prompt", "max_sequence_length")
KNOWN_KEYS = ("id", "prompt", "seed", *CALL_KEYS)
SUFFIXES = (".jsonl", ".ndjson", ".csv", ".txt")
# An id names the item's files: ``<id>.png``, ``<id>_<k>.png`` for several images, and while one is
# written ``.<id>_<k>.<pid>.tmp.png``. File names are limited to 255 bytes (ext4, XFS, APFS, NTFS),
# so ids are limited to 128 bytes of UTF-8 (128 ASCII characters), which leaves room for suffixes.
MAX_ID_LENGTH = 128
ID_RULE = "letters, digits, '-', '_' or '.' (not first)"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
# key -> (lowest, highest, multiple of)
_INT_RANGES: dict[str, tuple[int, int, int]] = {
    "seed": (0, MAX_SEED, 1),
    "num_inference_steps": (1, 10_000, 1),
    "height": (8, 16_384, 8),  # the VAE downsamples by 8: other sizes fail inside the pipeline
    "width": (8, 16_384, 8),
    "num_images_per_prompt": (1, 256, 1),
    "max_sequence_length": (1, 8_192, 1),
}


@dataclass(frozen=True, slots=True)
class BatchItem:
    id: str
    prompt: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # where it came from, for messages (0: built in code)


@dataclass(frozen=True, slots=True)
class RejectedItem:
    """An item that failed its checks: recorded in the manifest as failed, never generated."""

    id: str
    line: int
    error: str


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is a boolean, not a whole number")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{key}={value!r} is not a whole number")
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a whole number") from None
    elif not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not a whole number")
    low, high, step = _INT_RANGES[key]
    if not low <= value <= high:
        raise ValueError(f"{key}={value} is out of range; use {low}..{high}")
    if value % step:
        raise ValueError(f"{key}={value} must be a multiple of {step}")
    return value


def _value(key: str, value: Any) -> Any:
    if key in _INT_RANGES:
        return _int(key, value)
    if key == "guidance_scale":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"guidance_scale={value!r} is not a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"guidance_scale={value!r} is not a number") from None
        if not math.isfinite(number) or not 0 <= number <= 100:
            raise ValueError(f"guidance_scale={value!r} is out of range; use 0..100")
        return number
    if not isinstance(value, str):  # prompt, negative_prompt
        raise ValueError(f"{key}={value!r} must be text")
    return value


def shown_id(item_id: str, width: int = 40) -> str:
    """An id as messages show it: quoted, a long one shortened."""
    return repr(item_id) if len(item_id) <= width else repr(item_id[:width]) + "..."


def id_problem(item_id: str) -> str | None:
    """What makes ``item_id`` unusable as the name of the item's files, or None. The message
    completes "item <id> ..."."""
    if not isinstance(item_id, str) or not item_id:
        return "has an empty id"
    size = len(item_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_LENGTH:
        length = f"{len(item_id)} characters" + (f", {size} bytes of UTF-8" if size != len(item_id) else "")
        return (f"has an id of {length}; use at most {MAX_ID_LENGTH} (ids name the output files, and file "
                "names are limited to 255 bytes)")
    if not all(c.isalnum() or c in "-_." for c in item_id) or item_id.startswith("."):
        return f"id {item_id!r} must use {ID_RULE}"
    return None


def aside_id(item_id: str, line: int, position: int = 0) -> str:
    """The id a rejected item's failure is recorded under when a good item owns its id: '@' is in
    no valid id, so the record never marks the good item failed."""
    return f"{item_id}@line{line}" if line else f"{item_id}@item{position}"


def _check(row: Any, index: int, base_seed: int) -> tuple[str, BatchItem | str]:
    """The item's id and the item, or the id and what is wrong with it."""
    default_id = f"{index:06d}"
    if not isinstance(row, dict):
        return default_id, f"is {type(row).__name__}, not an object with a 'prompt'"
    raw_id = row.get("id")
    item_id = default_id if raw_id in (None, "") else str(raw_id)
    problem = id_problem(item_id)
    if problem:
        return item_id, problem
    if row.get("prompt") in (None, ""):
        return item_id, "has no 'prompt'"
    unknown = sorted(set(row) - set(KNOWN_KEYS))
    if unknown:
        return item_id, f"has unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(KNOWN_KEYS)}"
    try:
        prompt = _value("prompt", row["prompt"])
        seed = base_seed + index if row.get("seed") in (None, "") else _int("seed", row["seed"])
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} (--seed + index) is out of range; use 0..{MAX_SEED}")
        settings = {k: _value(k, row[k]) for k in CALL_KEYS if row.get(k) not in (None, "")}
    except ValueError as exc:
        return item_id, str(exc)
    return item_id, BatchItem(item_id, prompt, seed, settings)


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) pairs; a JSONL line that is not JSON is a row of its error text."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as exc:
        raise AutoFitUsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise AutoFitUsageError(f"{path}: the CSV header needs a 'prompt' column; known columns: "
                                    f"{', '.join(KNOWN_KEYS)}")
        rows = []
        for row in reader:
            extra = row.pop(None, None)  # more cells than the header has
            row = {k.strip(): v for k, v in row.items()}
            if extra:
                row["(extra cells)"] = extra
            rows.append((reader.line_num, row))
        return rows
    if suffix == ".txt":
        return [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except (ValueError, RecursionError) as exc:
                    rows.append((n, _NotJSON(getattr(exc, "msg", type(exc).__name__))))
        return rows
    raise AutoFitUsageError(f"{path}: use a .jsonl, .csv or .txt file of prompts (one prompt per line in .txt)")


@dataclass(frozen=True, slots=True)
class _NotJSON:
    msg: str


def read_items(path: str | os.PathLike, *, base_seed: int = 0) -> tuple[list[BatchItem], list[RejectedItem]]:
    """Every item of a prompts file, checked: the good ones and the rejected ones (with line and
    reason). Raises :class:`AutoFitUsageError` only when the file as a whole cannot be read."""
    path = Path(path)
    try:
        rows = _rows(path)
    except OSError as exc:
        raise AutoFitUsageError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    items: list[BatchItem] = []
    rejected: list[RejectedItem] = []
    owner: dict[str, int] = {}  # casefolded id -> the line of the good item that has it
    for index, (line, row) in enumerate(rows):
        if isinstance(row, _NotJSON):
            rejected.append(RejectedItem(f"{index:06d}", line, f"{path.name}:{line}: not JSON ({row.msg}); "
                                                               "one JSON object per line"))
            continue
        item_id, checked = _check(row, index, base_seed)
        if isinstance(checked, str):
            rejected.append(RejectedItem(item_id, line, f"{path.name}:{line}: item {shown_id(item_id)} {checked}"))
            continue
        first = owner.get(item_id.casefold())  # casefold: A.png and a.png are one file on macOS/Windows
        if first is not None:
            rejected.append(RejectedItem(aside_id(item_id, line), line,
                                         f"{path.name}:{line}: duplicate id {item_id!r} (line {first} has it); "
                                         "ids name the output files"))
            continue
        owner[item_id.casefold()] = line
        items.append(BatchItem(checked.id, checked.prompt, checked.seed, checked.settings, line))
    # A rejected line whose id a good item has (a bad line before its good twin, or a line that is
    # not JSON whose default id is another line's id) is recorded apart too.
    rejected = [RejectedItem(aside_id(r.id, r.line), r.line, r.error) if r.id.casefold() in owner else r
                for r in rejected]
    return items, rejected


def load_items(path: str | os.PathLike, *, base_seed: int = 0) -> list[BatchItem]:
    """Read items from a ``.jsonl``, ``.csv`` or ``.txt`` file, refusing the file at its first bad
    item. Each needs a ``prompt``; ``id`` defaults to the item's index, ``seed`` to
    ``base_seed + index``; the keys in :data:`CALL_KEYS` go to the pipeline. :func:`read_items`
    (what ``run_batch`` and ``autofit batch`` use) keeps the good items instead."""
    items, rejected = read_items(path, base_seed=base_seed)
    if rejected:
        raise AutoFitUsageError(rejected[0].error)
    return items
