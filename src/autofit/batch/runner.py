"""A resumable batch runner: prompts in (JSONL, CSV or text), images and a JSONL manifest out.

Unattended jobs are the point: every image is written atomically (:mod:`autofit.files`),
every finished item is appended to the manifest and flushed to disk, and a rerun after a crash
or Ctrl-C skips what is finished with the same content (prompt, seed, settings, model), so an
edited prompts file regenerates what changed. An item that fails (a bad value, an error raised
by the pipeline, memory exhausted at the last rung, an image the file system refuses for its name)
is recorded with its error and the job goes on; a rerun tries failed items again. Only what
concerns the output folder as a whole (it cannot be made, the disk is full, the manifest cannot be
appended) stops the job, with one line (:class:`BatchError`).

Several GPUs: launch one process per GPU with ``accelerate launch`` and pass ``distributed=True``
(``autofit batch --distributed``): accelerate's ``PartialState`` splits the items, each process
has its own autofit proxy on its own device, writes its own manifest shard, and all of them
share the plan cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autofit.batch.items import (CALL_KEYS, KNOWN_KEYS, BatchItem, RejectedItem, aside_id, id_problem, load_items,
                          read_items, shown_id)
from autofit.errors import AutoFitExhausted
from autofit.events import emit
from autofit.files import stale_temporary, write_atomically
from autofit.proxy import AutoFitPipeline, autofit
from autofit.records import plan_record

__all__ = ["CALL_KEYS", "KNOWN_KEYS", "BatchError", "BatchItem", "BatchReport", "RejectedItem", "iter_manifest", "pending",
           "item_key", "load_items", "read_items", "run_batch"]


class BatchError(RuntimeError):
    """The job cannot go on at all (the output folder cannot be written: a full disk, no rights)."""


# Errors of saving one image that concern that image alone (its name, a folder standing where it
# goes): the item fails and the job goes on. Any other OSError (no space, a file-size limit, a
# read-only or vanished folder, an I/O error) would fail every later item too and stops the job.
_ITEM_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.EINVAL, errno.EILSEQ})


@dataclass(slots=True)
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _model_of(pipe: Any) -> str:
    inner = getattr(pipe, "__wrapped__", pipe)
    return f"{type(inner).__name__}:{getattr(inner, 'name_or_path', None) or ''}"


def item_key(item: BatchItem, settings: dict[str, Any], model: str) -> str:
    """What an item's images depend on: a rerun regenerates an item whose key changed."""
    fields = {"prompt": item.prompt, "seed": item.seed, "settings": settings, "model": model}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _finished(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last record of each id whose images are all on disk and that succeeded."""
    last: dict[str, dict[str, Any]] = {}
    try:
        records = list(iter_manifest(out_dir))
    except OSError as exc:
        raise BatchError(f"cannot read the manifest in {out_dir}: {exc.strerror or exc}") from None
    for rec in records:
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            last[rec["id"]] = rec
    return {i: r for i, r in last.items()
            if r.get("status") == "ok" and isinstance(r.get("files"), list)
            and all(isinstance(f, str) and (out_dir / f).is_file() for f in r["files"])}


def _end_torn_line(manifest: Path) -> None:
    """A kill in the middle of a write can leave a last line without its newline: end it, so the
    next record starts a line of its own instead of being glued to the torn one and lost."""
    if not manifest.is_file() or manifest.stat().st_size == 0:
        return
    with open(manifest, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, someone else's
    return True


def _clean_temporaries(out_dir: Path) -> int:
    """Remove what a killed or failed save left (autofit.files' temporaries), unless its process
    still runs (another rank of the same job). A user's file is never one of them."""
    removed = 0
    for tmp in out_dir.glob(".*.tmp*"):
        if not stale_temporary(tmp, _pid_alive):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _planned_names(item: BatchItem, settings: dict[str, Any]) -> list[str]:
    n = settings.get("num_images_per_prompt") or 1
    return [f"{item.id}.png"] if n == 1 else [f"{item.id}_{k}.png" for k in range(n)]


def _screen(items: Sequence[BatchItem | RejectedItem]) -> list[BatchItem | RejectedItem]:
    """Items built in code skip the prompts file's checks: an id that cannot name a file, or that
    an earlier item has, fails its item. A rejected item whose id a good item has is recorded
    under ``<id>@line<N>``, so its failure record never marks the good item (which a rerun would
    then make again). Items read by :func:`read_items` pass unchanged."""
    owner: set[str] = set()
    screened: list[BatchItem | RejectedItem] = []
    for position, item in enumerate(items):
        if isinstance(item, BatchItem):
            where = f"line {item.line}: " if item.line else ""
            problem = id_problem(item.id)
            if problem:
                item = RejectedItem(item.id, item.line, f"{where}item {shown_id(item.id)} {problem}")
            elif item.id.casefold() in owner:
                item = RejectedItem(aside_id(item.id, item.line, position), item.line,
                                    f"{where}duplicate id {item.id!r}; ids name the output files")
            else:
                owner.add(item.id.casefold())
        screened.append(item)
    return [RejectedItem(aside_id(it.id, it.line, position), it.line, it.error)
            if isinstance(it, RejectedItem) and it.id.casefold() in owner else it
            for position, it in enumerate(screened)]


def _claim_names(items: Sequence[BatchItem | RejectedItem], defaults: dict[str, Any]) -> dict[str, str]:
    """Items whose output names another item already uses (``a`` with two images writes ``a_0.png``,
    which item ``a_0`` would overwrite): id -> the error that rejects them."""
    owner: dict[str, str] = {}
    clashes: dict[str, str] = {}
    for item in items:
        if isinstance(item, RejectedItem):
            continue
        names = _planned_names(item, {**defaults, **item.settings})
        taken = [(n, owner[n.casefold()]) for n in names if n.casefold() in owner]
        if taken:
            name, other = taken[0]
            where = f"line {item.line}: " if item.line else ""
            clashes[item.id] = (f"{where}item {item.id!r} would write {name}, which item {other!r} writes; "
                                "give it another id")
            continue
        for n in names:
            owner[n.casefold()] = item.id
    return clashes


def pending(items: Sequence[BatchItem | RejectedItem], out_dir: str | os.PathLike, *,
            defaults: dict[str, Any] | None = None, model: str) -> list[str]:
    """The ids of the items :func:`run_batch` would generate in ``out_dir`` (a rejected item, one
    not finished, or finished with other content), read from the manifest alone: ``autofit batch``
    asks before loading the model, so resuming a finished batch takes a second. ``model`` is
    ``"<pipeline class>:<name_or_path>"``, as the items' keys record it."""
    items = _screen(list(items))
    defaults = dict(defaults or {})
    clashes = _claim_names(items, defaults)
    out = Path(out_dir)
    finished = _finished(out) if out.is_dir() else {}
    return [item.id for item in items
            if isinstance(item, RejectedItem) or item.id in clashes
            or finished.get(item.id, {}).get("key") != item_key(item, {**defaults, **item.settings}, model)]


def run_batch(
    pipe: Any,
    items: Sequence[BatchItem | RejectedItem] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    defaults: dict[str, Any] | None = None,
    progress: bool = True,
    distributed: bool = False,
    options: dict[str, Any] | None = None,
) -> BatchReport:
    """Generate every item not finished yet. ``pipe`` is an autofit proxy (or a pipeline, which is
    wrapped with ``options``). ``items`` is a prompts file or a list of :class:`BatchItem` (and
    :class:`RejectedItem`, recorded as failed). An item that fails (a rejected value, an error from
    the pipeline, memory exhausted at the last rung) is recorded with its error and the job goes on.
    Returns what was done, skipped (finished before, same content) and failed. Raises
    :class:`BatchError` only when the output folder cannot be written."""
    if isinstance(items, (str, os.PathLike)):
        good, rejected = read_items(items)
        items = [*rejected, *good]
    items = _screen(list(items))  # over every item, so ranks agree
    out = _output_folder(Path(out_dir))
    rank, my_items, pipe = _share(pipe, items, distributed, options)
    defaults = dict(defaults or {})
    clashes = _claim_names(list(items), defaults)  # over every item, so ranks agree
    _clean_temporaries(out)
    report = BatchReport()
    todo = _todo(my_items, defaults, _model_of(pipe), clashes, _finished(out), report)
    manifest = out / (f"manifest.rank{rank}.jsonl" if distributed else "manifest.jsonl")
    t_start = time.perf_counter()
    bar = _bar(len(my_items), len(report.skipped), rank) if progress else None
    try:
        with _open_manifest(manifest) as log:
            for item, key in todo:
                _record(log, manifest, _run_one(pipe, item, key, defaults, out, clashes, report))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t_start
    emit("batch_done", stage="batch", action="none", attempt=0, done=len(report.done),
         skipped=len(report.skipped), failed=len(report.failed), seconds=round(report.seconds, 3))
    return report


def _output_folder(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "it is a file" if out.exists() else (exc.strerror or str(exc))
        raise BatchError(f"cannot create the output folder {out}: {what}") from None
    return out


def _share(pipe: Any, items: list[BatchItem | RejectedItem], distributed: bool,
           options: dict[str, Any] | None) -> tuple[int, list[BatchItem | RejectedItem], Any]:
    """This process's rank, its share of the items and its proxy (a pipeline is wrapped here, on
    this rank's device when distributed)."""
    if not distributed:
        return 0, list(items), pipe if isinstance(pipe, AutoFitPipeline) else autofit(pipe, **(options or {}))
    from accelerate import PartialState

    # Without CUDA, ask for the CPU explicitly: PartialState then joins the processes with
    # gloo (MULTI_CPU) instead of running each one alone.
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.split_between_processes(list(items)) as mine:
        my_items = list(mine)
    if not isinstance(pipe, AutoFitPipeline):
        pipe = autofit(pipe, **{**(options or {}), "device": state.device})
    return state.process_index, my_items, pipe


def _todo(my_items: list[BatchItem | RejectedItem], defaults: dict[str, Any], model: str, clashes: dict[str, str],
          finished: dict[str, dict[str, Any]], report: BatchReport) -> list[tuple[BatchItem | RejectedItem, str | None]]:
    """(item, key) to generate; what finished before with the same key goes to ``report.skipped``."""
    todo: list[tuple[BatchItem | RejectedItem, str | None]] = []
    for item in my_items:
        if isinstance(item, RejectedItem):
            todo.append((item, None))
            continue
        key = item_key(item, {**defaults, **item.settings}, model)
        if finished.get(item.id, {}).get("key") == key and item.id not in clashes:
            report.skipped.append(item.id)
        else:
            todo.append((item, key))
    return todo


def _bar(total: int, initial: int, rank: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"autofit batch[{rank}]", unit="img")


@contextmanager
def _open_manifest(manifest: Path) -> Iterator[Any]:
    try:
        _end_torn_line(manifest)
        # Unbuffered: a failed append raises once, here; a buffered file would try the same bytes
        # again when closed and raise over the one-line error.
        log = open(manifest, "ab", buffering=0)
    except OSError as exc:
        raise BatchError(f"cannot write the manifest {manifest}: {exc.strerror or exc}") from None
    try:
        yield log
    finally:
        try:
            log.close()
        except OSError:
            pass  # every record written was fsynced; nothing is left to flush


def _record(log: Any, manifest: Path, record: dict[str, Any]) -> None:
    """Append one record and fsync it: a crash after this never loses the item."""
    try:
        _append(log, (json.dumps(record, default=str) + "\n").encode("utf-8", "surrogatepass"))
        os.fsync(log.fileno())
    except OSError as exc:
        raise BatchError(f"cannot append to the manifest {manifest}: {exc.strerror or exc}; "
                         "free space and rerun to resume") from None


def _append(log: Any, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file (a write near a limit can be short)."""
    view = memoryview(data)
    while view:
        view = view[log.write(view):]


def _run_one(pipe: Any, item: BatchItem | RejectedItem, key: str | None, defaults: dict[str, Any], out: Path,
             clashes: dict[str, str], report: BatchReport) -> dict[str, Any]:
    """Generate one item and return its manifest record; any failure but one of the output folder
    (a full disk, a file-size limit, a read-only folder), a KeyboardInterrupt or a kill is the
    item's own and recorded."""
    if isinstance(item, RejectedItem):
        return _failed(report, {"id": item.id, "line": item.line}, item.error, stage="input")
    kwargs = {**defaults, **item.settings}
    record: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "seed": item.seed, "key": key}
    if item.line:
        record["line"] = item.line
    if item.id in clashes:
        return _failed(report, record, clashes[item.id], stage="input", settings=kwargs)
    history_before = len(pipe.autofit.history)
    t = time.perf_counter()
    try:
        images = pipe(item.prompt, generator=torch.Generator().manual_seed(item.seed), **kwargs).images
    except AutoFitExhausted as exc:
        return _failed(report, record, str(exc), stage=exc.stage, **_after(pipe, t, history_before, kwargs))
    except Exception as exc:  # an error of this item (a value the pipeline refuses): not the job's
        return _failed(report, record, f"{type(exc).__name__}: {exc}", stage="call",
                       **_after(pipe, t, history_before, kwargs))
    expected = _planned_names(item, kwargs)
    if len(images) != len(expected):  # names were claimed for the expected count
        return _failed(report, record, f"the pipeline returned {len(images)} images, not {len(expected)}",
                       stage="call", **_after(pipe, t, history_before, kwargs))
    files = []
    for image, name in zip(images, expected):
        try:
            write_atomically(out / name, image.save, fsync=True)  # on disk before the manifest says so
        except OSError as exc:
            # No errno: the encoder refused the image (Pillow: "cannot write mode CMYK as PNG").
            if exc.errno is not None and exc.errno not in _ITEM_ERRNOS:
                raise BatchError(f"cannot write {out / name}: {exc.strerror or exc}; free space and rerun "
                                 "to resume") from None
            return _failed(report, record, f"cannot write {name}: {exc.strerror or exc}", stage="save",
                           **_after(pipe, t, history_before, kwargs))
        except Exception as exc:  # the image cannot be encoded (not a PIL image, a mode PNG refuses)
            return _failed(report, record, f"cannot save {name}: {type(exc).__name__}: {exc}", stage="save",
                           **_after(pipe, t, history_before, kwargs))
        files.append(name)
    report.done.append(item.id)
    return {**record, "status": "ok", "files": files, **_after(pipe, t, history_before, kwargs)}


def _after(pipe: Any, started: float, history_before: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": round(time.perf_counter() - started, 3),
            **plan_record(pipe.autofit.plan, pipe.autofit.history[history_before:]), "settings": kwargs}


def _failed(report: BatchReport, record: dict[str, Any], error: str, *, stage: str, **more: Any) -> dict[str, Any]:
    report.failed[record["id"]] = error
    emit("batch_item_failed", level="warning", stage=stage, action="skip", attempt=0, item=record["id"],
         error=error[:200])
    return {**record, "status": "failed", "error": error[:500], **more}


def iter_manifest(out_dir: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """Every manifest record of a batch folder (all shards), in file order."""
    for shard in sorted(Path(out_dir).glob("manifest*.jsonl")):
        if not shard.is_file():
            continue  # a folder of that name: the append says what is wrong
        for line in shard.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn last line from a killed process: the item is simply redone
            if isinstance(rec, dict):
                yield rec
