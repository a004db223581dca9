"""A resumable batch runner: prompts in (JSONL or CSV), images and a JSONL manifest out.

Unattended jobs are the point: every image is written atomically (temporary file, then rename),
every finished item is appended to the manifest and flushed to disk, and a rerun after a crash
or Ctrl-C skips what is finished. An item that still runs out of memory at the last rung is
recorded with its error and the job goes on; a rerun tries failed items again.

Several GPUs: launch one process per GPU with ``accelerate launch`` and pass ``distributed=True``
(``autofit batch --distributed``): accelerate's ``PartialState`` splits the items, each process
has its own autofit proxy on its own device, writes its own manifest shard, and all of them
share the plan cache.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AutoFitExhausted, AutoFitUsageError
from .events import emit

# Per-item settings passed through to the pipeline call when present.
CALL_KEYS = ("negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
             "num_images_per_prompt", "max_sequence_length")
_INT_KEYS = {"num_inference_steps", "height", "width", "num_images_per_prompt", "max_sequence_length", "seed"}
_FLOAT_KEYS = {"guidance_scale"}


@dataclass(frozen=True, slots=True)
class BatchItem:
    id: str
    prompt: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _coerce(key: str, value: Any) -> Any:
    if value in ("", None):
        return None
    if key in _INT_KEYS:
        return int(value)
    if key in _FLOAT_KEYS:
        return float(value)
    return value


def load_items(path: str | os.PathLike, *, base_seed: int = 0) -> list[BatchItem]:
    """Read items from a ``.jsonl`` or ``.csv`` file. Each needs a ``prompt``; ``id`` defaults to
    the line number, ``seed`` to ``base_seed + index``; other known keys go to the pipeline."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise AutoFitUsageError(f"{path}:{n}: not JSON ({exc.msg}); one JSON object per line") from None
    else:
        raise AutoFitUsageError(f"{path}: use a .jsonl or .csv file of prompts")
    items, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("prompt"):
            raise AutoFitUsageError(f"{path}: item {i + 1} has no 'prompt'")
        item_id = str(row.get("id") or f"{i:06d}")
        if item_id in seen:
            raise AutoFitUsageError(f"{path}: duplicate id {item_id!r}; ids name the output files")
        if not all(c.isalnum() or c in "-_." for c in item_id):
            raise AutoFitUsageError(f"{path}: id {item_id!r} must use letters, digits, '-', '_' or '.'")
        seen.add(item_id)
        seed = _coerce("seed", row.get("seed"))
        settings = {k: _coerce(k, row[k]) for k in CALL_KEYS if k in row and _coerce(k, row[k]) is not None}
        items.append(BatchItem(item_id, str(row["prompt"]), base_seed + i if seed is None else seed, settings))
    return items


def _finished(out_dir: Path) -> set[str]:
    done: set[str] = set()
    for shard in out_dir.glob("manifest*.jsonl"):
        for line in shard.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process: the item is simply redone
            if rec.get("status") == "ok" and all((out_dir / f).is_file() for f in rec.get("files", [])):
                done.add(rec["id"])
            elif rec.get("status") == "failed":
                done.discard(rec["id"])
    return done


def _end_torn_line(manifest: Path) -> None:
    """A kill in the middle of a write can leave a last line without its newline: end it, so the
    next record starts a line of its own instead of being glued to the torn one and lost."""
    if not manifest.is_file() or manifest.stat().st_size == 0:
        return
    with open(manifest, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _save_atomic(image: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    image.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_batch(
    pipe: Any,
    items: Sequence[BatchItem] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    defaults: dict[str, Any] | None = None,
    progress: bool = True,
    distributed: bool = False,
    options: dict[str, Any] | None = None,
) -> BatchReport:
    """Generate every item not finished yet. ``pipe`` is an autofit proxy (or a pipeline, which is
    wrapped with ``options``). Returns what was done, skipped (already finished) and failed."""
    from .proxy import AutoFitPipeline, autofit

    if isinstance(items, (str, os.PathLike)):
        items = load_items(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, my_items = 0, list(items)
    if distributed:
        from accelerate import PartialState

        # Without CUDA, ask for the CPU explicitly: PartialState then joins the processes with
        # gloo (MULTI_CPU) instead of running each one alone.
        state = PartialState(cpu=not torch.cuda.is_available())
        rank = state.process_index
        with state.split_between_processes(list(items)) as mine:
            my_items = list(mine)
        if not isinstance(pipe, AutoFitPipeline):
            pipe = autofit(pipe, **{**(options or {}), "device": state.device})
    elif not isinstance(pipe, AutoFitPipeline):
        pipe = autofit(pipe, **(options or {}))
    finished = _finished(out)
    report = BatchReport()
    todo = [it for it in my_items if it.id not in finished]
    report.skipped = [it.id for it in my_items if it.id in finished]
    manifest = out / (f"manifest.rank{rank}.jsonl" if distributed else "manifest.jsonl")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(my_items), initial=len(report.skipped), desc=f"autofit batch[{rank}]", unit="img")
    t_start = time.perf_counter()
    _end_torn_line(manifest)
    with open(manifest, "a") as log:
        for item in todo:
            kwargs = {**(defaults or {}), **item.settings}
            history_before = len(pipe.autofit.history)
            t = time.perf_counter()
            record: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "seed": item.seed}
            try:
                images = pipe(item.prompt, generator=torch.Generator().manual_seed(item.seed), **kwargs).images
                files = []
                for k, image in enumerate(images):
                    name = f"{item.id}.png" if len(images) == 1 else f"{item.id}_{k}.png"
                    _save_atomic(image, out / name)
                    files.append(name)
                record.update(status="ok", files=files)
                report.done.append(item.id)
            except AutoFitExhausted as exc:
                record.update(status="failed", error=str(exc)[:500])
                report.failed[item.id] = str(exc)
                emit("batch_item_failed", level="warning", stage=exc.stage, action="skip", attempt=0, item=item.id)
            record.update(
                seconds=round(time.perf_counter() - t, 3),
                plan=list(pipe.autofit.plan),
                escalations=[{"stage": r.stage, "action": r.action, "scope": r.scope}
                             for r in pipe.autofit.history[history_before:]],
                settings=kwargs,
            )
            log.write(json.dumps(record, default=str) + "\n")
            log.flush()
            os.fsync(log.fileno())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - t_start
    emit("batch_done", stage="batch", action="none", attempt=0, done=len(report.done),
         skipped=len(report.skipped), failed=len(report.failed), seconds=round(report.seconds, 3))
    return report


def iter_manifest(out_dir: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """Every manifest record of a batch folder (all shards), in file order."""
    for shard in sorted(Path(out_dir).glob("manifest*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
