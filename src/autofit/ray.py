"""Batch jobs on a Ray cluster: an adapter for Ray Data's ``map_batches``, one actor per GPU.

``GenerateImages`` is the callable class an actor pool runs: each actor builds one pipeline
(a factory or a model folder), wraps it with :func:`autofit.autofit` (a node-local plan cache
shared by the node's actors) and turns batches of prompt rows (the item schema of
``autofit batch``) into images in a shared output folder and one result row per item.
:func:`map_images` is the standard ``map_batches`` call around it, :func:`run_batch_on_ray` the
whole job with a report like :func:`autofit.batch.run_batch`'s (``autofit batch --ray``).

What Ray does and what this module does about it (Ray 2.60):

- An actor that dies (a segfault, the OOM killer, a lost node) is restarted and its batch is
  retried, so a batch can run twice. Every image is written atomically under the item's id and
  recorded in the actor's own manifest shard with its content key (the key ``autofit batch``
  resumes on); an item already finished with the same key is skipped, so nothing is made twice
  and a rerun of the whole job skips what is done.
- An exception raised out of ``map_batches`` fails the whole dataset, so each item's failure (a
  bad value, an error of the pipeline, memory exhausted at the last rung) is caught and recorded
  as that item's. Only what concerns the output folder as a whole (a full disk) stops the job.
- Retries are unbounded: an item that kills its worker every time (the host's OOM killer) would be
  retried forever, so each start is noted and an item whose worker died ``max_attempts`` times in
  one run is recorded as failed instead.

Ray is an optional dependency (``pip install 'autofit-diffusers[ray]'``); no other autofit module
imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.data import ActorPoolStrategy, Dataset
except ImportError as _exc:
    raise ImportError(
        f"autofit's Ray adapter needs Ray Data ({_exc}); install the extra: pip install '.[ray]' in a clone "
        "(once released: pip install 'autofit-diffusers[ray]')") from None

import pyarrow as pa

# Private helpers of the single-machine runner: one implementation of saving, recording and
# resuming, so a Ray job and `autofit batch` write the same files and records.
from autofit.batch.items import BatchItem, RejectedItem, _check, read_items, shown_id
from autofit.batch.runner import (BatchError, BatchReport, _append, _claim_names, _clean_temporaries, _end_torn_line,
                                  _model_of, _open_manifest, _record, _run_one, _screen, item_key)
from autofit.events import emit

__all__ = ["ROW_SCHEMA", "GenerateImages", "map_images", "run_batch_on_ray"]

# One schema for every block, so a dataset of results can be written to Parquet as it is.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("status", pa.string()),  # ok (made now), skipped (finished before), failed
    ("path", pa.string()),  # the first image written (null when none)
    ("files", pa.list_(pa.string())),  # every image, relative to the output folder
    ("key", pa.string()),  # the content key (null for a rejected item)
    ("plan", pa.list_(pa.string())),
    ("escalations", pa.list_(pa.struct([("stage", pa.string()), ("action", pa.string()),
                                        ("scope", pa.string())]))),
    ("error", pa.string()),
    ("seconds", pa.float64()),
    ("worker", pa.string()),  # <node id>:<pid> of the actor that wrote the row
])
# Where the starts of each item are noted, per run: .autofit-ray/<run>/<node>-<pid>.started
STARTS_DIR = ".autofit-ray"
PipelineSource = Callable[[], Any] | str | os.PathLike


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


class _Tail:
    """New complete lines of the files matching a pattern, read incrementally: a retried batch
    sees what the dead actor recorded without rereading every shard."""

    def __init__(self, folder: Path, pattern: str) -> None:
        self.folder, self.pattern = folder, pattern
        self.offsets: dict[str, int] = {}

    def new_lines(self) -> Iterable[tuple[str, bytes | None]]:
        """(file name, line) pairs; (name, None) when a file was replaced or truncated: forget
        what was read of it."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob(self.pattern)):
            try:
                size = path.stat().st_size
                start = self.offsets.get(path.name, 0)
                if size < start:  # replaced or truncated: read it again
                    start = 0
                    yield path.name, None
                if size == start:
                    continue
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(size - start)
            except OSError:
                continue  # a folder of that name, a file removed meanwhile: nothing to read
            end = data.rfind(b"\n")
            if end < 0:
                continue  # a torn line without its end (a killed writer): never read
            self.offsets[path.name] = start + end + 1
            for line in data[:end].splitlines():
                yield path.name, line


class _Manifest:
    """The last record of each id in every manifest shard of the folder, in shard-name order as
    :func:`autofit.batch.iter_manifest` reads them (the last record wins)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tail = _Tail(out, "manifest*.jsonl")
        self.shards: dict[str, dict[str, dict[str, Any]]] = {}

    def refresh(self) -> None:
        for shard, line in self.tail.new_lines():
            if line is None:
                self.shards.pop(shard, None)
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn line ended by a later writer: the item is simply redone
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                self.shards.setdefault(shard, {})[rec["id"]] = rec

    def latest(self, item_id: str) -> dict[str, Any] | None:
        for shard in sorted(self.shards, reverse=True):
            rec = self.shards[shard].get(item_id)
            if rec is not None:
                return rec
        return None

    def finished(self, item_id: str, key: str) -> dict[str, Any] | None:
        """The ok record of ``item_id`` with this key whose files are all on disk, or None."""
        rec = self.latest(item_id)
        if rec is None:
            return None
        files = rec.get("files")
        if rec.get("status") != "ok" or rec.get("key") != key or not isinstance(files, list):
            return None
        if not all(isinstance(f, str) and (self.out / f).is_file() for f in files):
            return None
        return rec


def _plain(value: Any) -> Any:
    """A batch cell as the item checks expect it: None for a missing value (Ray fills missing
    numbers with NaN, missing text with None), Python scalars instead of numpy's."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and value != value:
        return None
    return value


def _rows_of(batch: Any) -> list[dict[str, Any]]:
    """The rows of a batch in any of Ray Data's formats: a pyarrow Table, a pandas DataFrame or a
    dict of columns (numpy arrays or lists)."""
    if isinstance(batch, pa.Table):
        rows = batch.to_pylist()
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        rows = batch.to_dict("records")
    elif isinstance(batch, Mapping):
        columns = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()), []))
        rows = [{k: col[i] for k, col in columns.items()} for i in range(n)]
    else:
        raise TypeError(f"a batch of prompt rows is a pyarrow Table, a pandas DataFrame or a dict of columns, "
                        f"not {type(batch).__name__}")
    return [{k: v for k, v in ((k, _plain(v)) for k, v in row.items()) if v is not None} for row in rows]


def _load(source: PipelineSource, dtype: str | None) -> Any:
    if callable(source):
        return source()
    import torch
    from diffusers import DiffusionPipeline

    from autofit import _diffusers

    kind = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[dtype]
    return DiffusionPipeline.from_pretrained(str(source), **_diffusers.dtype_kwargs(kind))


class GenerateImages:
    """The callable class for ``Dataset.map_batches`` with an actor pool (one actor per GPU).

    Args:
        pipeline: a function that returns a diffusers pipeline (or an ``autofit`` proxy, used as
            it is), or the folder of one (loaded with ``DiffusionPipeline.from_pretrained``; the
            same path on every node).
        out: the output folder, the same path on every node (a shared file system): images
            ``<id>.png`` and one manifest shard per actor, ``manifest.ray-*.jsonl``.
        options: :func:`autofit.autofit`'s options (``policy``, ``max_vram``, ``device``...).
        cache_dir: the plan cache, a folder local to each node, shared by its actors (default:
            ``options["cache"]``, else ``$AUTOFIT_CACHE_DIR`` or ``~/.cache/autofit`` on each node).
        defaults: call settings of every item (``num_inference_steps``, ``height``...), as
            ``run_batch``'s ``defaults``; an item's own settings win.
        dtype: the dtype a model folder is loaded in (``float16``, ``bfloat16``, ``float32``).
        seed: the seed of a row without one.
        run: the job's id, the same for every actor (:func:`map_images` makes one): an item
            finished earlier in the same run (by an attempt of a retried batch) is reported
            ``ok``, not ``skipped``, and the starts of each item are counted across restarts.
        max_attempts: an item whose worker died this many times in one run is recorded as failed
            instead of being tried again (needs ``run``).

    A row needs a ``prompt``; ``id`` names its file (default: the item's content key; ids must be
    unique across the dataset), ``seed`` defaults to ``seed``; ``negative_prompt``,
    ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``num_images_per_prompt``,
    ``max_sequence_length`` go to the pipeline, ``line`` (where the row came from) to the messages.
    Any other column fails its row. Returns one row per item, :data:`ROW_SCHEMA`.
    """

    def __init__(self, pipeline: PipelineSource, out: str | os.PathLike, *, options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, defaults: dict[str, Any] | None = None,
                 dtype: str | None = None, seed: int = 0, run: str | None = None, max_attempts: int = 3) -> None:
        t = time.perf_counter()
        from autofit import AutoFitPipeline, AutoFitUsageError, autofit

        if dtype not in (None, "float16", "bfloat16", "float32"):
            raise AutoFitUsageError(f"dtype={dtype!r}: use float16, bfloat16, float32 or None (as stored)")
        self.out = Path(out)
        self.defaults = dict(defaults or {})
        self.seed = seed
        self.run = run
        self.max_attempts = max_attempts
        self.pid = os.getpid()
        self.node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"
        self.worker = f"{self.node}:{self.pid}"
        pipe = _load(pipeline, dtype)
        if not isinstance(pipe, AutoFitPipeline):
            # A process of its own per GPU: Ray sets CUDA_VISIBLE_DEVICES, so the default device is
            # the actor's GPU.
            options = dict(options or {})
            if cache_dir is not None:
                options["cache"] = cache_dir
            pipe = autofit(pipe, **options)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.model = _model_of(pipe)
        self.out.mkdir(parents=True, exist_ok=True)
        # A shard per actor process, named by start time first, so shards sort in the order they
        # were written across runs (a rerun's record of an id comes after an older one's).
        self.shard = self.out / f"manifest.ray-{_stamp()}-{self.node}-{self.pid}.jsonl"
        self.manifest = _Manifest(self.out)
        self.starts: dict[str, int] = {}
        self.starts_file: Path | None = None
        self.starts_tail: _Tail | None = None
        self.starts_log: Any = None
        if run is not None:
            folder = self.out / STARTS_DIR / run
            folder.mkdir(parents=True, exist_ok=True)
            self.starts_file = folder / f"{self.node}-{self.pid}.started"
            self.starts_tail = _Tail(folder, "*.started")
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        emit("ray_actor_ready", stage="batch", worker=self.worker, gpus=",".join(map(str, gpu_ids)),
             device=str(pipe.autofit.device),
             model=self.model, seconds=round(time.perf_counter() - t, 3))

    def __call__(self, batch: Any) -> pa.Table:
        self.manifest.refresh()  # what other actors (a dead one whose batch this is) finished
        if self.starts_tail is not None:
            for _, line in self.starts_tail.new_lines():
                if line:
                    name = line.decode("utf-8", "surrogateescape")
                    self.starts[name] = self.starts.get(name, 0) + 1
        items = _screen([self._item(row, i) for i, row in enumerate(_rows_of(batch))])
        clashes = _claim_names(items, self.defaults)
        rows = []
        try:
            _end_torn_line(self.shard)
            log = open(self.shard, "ab", buffering=0)
        except OSError as exc:
            raise BatchError(f"cannot write the manifest {self.shard}: {exc.strerror or exc}") from None
        try:
            for item in items:
                rows.append(self._one(item, clashes, log))
            # Once per batch, before Ray sees its rows: each record was written as its item
            # finished (a killed process loses none of them: they are in the page cache, and each
            # image was fsynced before its record was written); this makes them outlive the node
            # too. Per item, it cost as much as the atomic save (~4-6 ms on this dev box).
            try:
                os.fsync(log.fileno())
            except OSError as exc:
                raise BatchError(f"cannot write the manifest {self.shard}: {exc.strerror or exc}; free space and "
                                 "rerun to resume") from None
        finally:
            log.close()
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def _item(self, row: dict[str, Any], index: int) -> BatchItem | RejectedItem:
        """A row checked as ``autofit batch`` checks a line of a prompts file."""
        line = row.pop("line", 0)
        line = line if isinstance(line, int) and not isinstance(line, bool) and line > 0 else 0
        given = row.get("id") not in (None, "")
        item_id, checked = _check(row if given else {**row, "id": "-"}, 0, self.seed)  # index 0: seed is `seed`
        if isinstance(checked, str):
            where = f"line {line}: " if line else ""
            what = f"item {shown_id(item_id)}" if given else f"row {index} of its batch (no id)"
            # '@' is in no valid id: the record never marks a good item failed
            aside = "@row-" + hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:12]
            return RejectedItem(item_id if given else aside, line, f"{where}{what} {checked}")
        if not given:  # no id: the content names the file
            checked = BatchItem(item_key(checked, {**self.defaults, **checked.settings}, self.model),
                                checked.prompt, checked.seed, checked.settings)
        return BatchItem(checked.id, checked.prompt, checked.seed, checked.settings, line)

    def _one(self, item: BatchItem | RejectedItem, clashes: dict[str, str], log: Any) -> dict[str, Any]:
        report = BatchReport()
        key = None
        if isinstance(item, BatchItem):
            key = item_key(item, {**self.defaults, **item.settings}, self.model)
            done = self.manifest.finished(item.id, key)
            if done is not None:
                status = "ok" if self.run is not None and done.get("run") == self.run else "skipped"
                return self._row(item.id, status, done)
        last = self.manifest.latest(item.id)
        if (self.run is not None and last is not None and last.get("run") == self.run and last.get("key") == key
                and last.get("status") == "failed"):
            # Failed in this run, before a retry of its batch: once per run, as on one machine
            # (and a start that ended in a record is no death of the worker).
            return self._row(item.id, "failed", last)
        if isinstance(item, BatchItem):
            tries = self.starts.get(item.id, 0)
            if tries >= self.max_attempts and item.id not in clashes:
                item = RejectedItem(item.id, item.line, (
                    f"the worker died {tries} times while generating this item (killed by the host's "
                    "out-of-memory killer? see the node's kernel log); not tried again in this run"))
            elif self.starts_file is not None:
                self._note_start(item.id)
        try:
            record = _run_one(self.pipe, item, key, self.defaults, self.out, clashes, report)
        except BatchError:
            raise  # the output folder as a whole: the job stops
        except Exception as exc:  # nothing of one item may fail the dataset
            record = {"id": item.id, "key": key, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            emit("batch_item_failed", level="warning", stage="batch", action="skip", item=item.id,
                 error=record["error"][:200])
        record = {**record, "key": key, "worker": self.worker, **({"run": self.run} if self.run else {})}
        try:
            _append(log, (json.dumps(record, default=str) + "\n").encode("utf-8", "surrogatepass"))
        except OSError as exc:
            raise BatchError(f"cannot append to the manifest {self.shard}: {exc.strerror or exc}; free space "
                             "and rerun to resume") from None
        self.manifest.shards.setdefault(self.shard.name, {})[record["id"]] = record
        return self._row(record["id"], record["status"], record)

    def _note_start(self, item_id: str) -> None:
        # Unbuffered, no fsync: the note must outlive the process (the page cache keeps it), not
        # the node (a node lost takes its starts with it: they were no fault of the item's).
        try:
            if self.starts_log is None:
                assert self.starts_file is not None
                self.starts_log = open(self.starts_file, "ab", buffering=0)
            _append(self.starts_log, item_id.encode("utf-8", "surrogateescape") + b"\n")
        except OSError as exc:
            raise BatchError(f"cannot write {self.starts_file}: {exc.strerror or exc}; free space and rerun "
                             "to resume") from None

    def _row(self, item_id: str, status: str, record: dict[str, Any]) -> dict[str, Any]:
        files = [f for f in record.get("files") or [] if isinstance(f, str)]
        return {
            "id": item_id,
            "status": status,
            "path": str(self.out / files[0]) if files else None,
            "files": files,
            "key": record.get("key"),
            "plan": [str(p) for p in record.get("plan") or []],
            "escalations": [{k: str(e.get(k)) for k in ("stage", "action", "scope")}
                            for e in record.get("escalations") or [] if isinstance(e, dict)],
            "error": record.get("error"),
            "seconds": float(record.get("seconds") or 0.0) if status != "skipped" else 0.0,
            "worker": self.worker,
        }


def map_images(ds: Dataset, pipeline: PipelineSource, out: str | os.PathLike, *, actors: int,
               gpus_per_actor: float = 1.0, cpus_per_actor: float | None = None, batch_size: int = 4,
               run: str | None = None, **kwargs: Any) -> Dataset:
    """``ds.map_batches`` with :class:`GenerateImages` on a pool of ``actors`` actors, each with
    ``gpus_per_actor`` GPUs (1: one pipeline per GPU; 0 on a cluster without GPUs) and
    ``cpus_per_actor`` CPUs (default: Ray's, 1 per actor). ``kwargs``
    go to :class:`GenerateImages` (``options``, ``cache_dir``, ``defaults``, ``dtype``,
    ``seed``, ``max_attempts``); ``run`` defaults to a new id for this job."""
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise ValueError(f"actors={actors!r}: use a whole number >= 1 (one actor per GPU)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: use a whole number >= 1")
    return ds.map_batches(
        GenerateImages,
        fn_constructor_args=(pipeline, str(out)),
        fn_constructor_kwargs={**kwargs, "run": run or f"{_stamp()}-{secrets.token_hex(4)}"},
        batch_size=batch_size,
        batch_format="pyarrow",  # nulls stay None (numpy would turn a missing number into NaN)
        compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None,
        # Only when asked: Ray Data reserves 1 CPU per GPU actor by itself and warns when both are given.
        **({"num_cpus": cpus_per_actor} if cpus_per_actor is not None else {}),
    )


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    # ray.init sets the level of Ray's logger: keep the one it has (the CLI lowers it to warnings).
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                              "logging_level": logging.getLogger("ray").getEffectiveLevel()}
    if address:
        ray.init(address=address, **kwargs)
        return True
    # A local cluster needs no other machine: keep every Ray address on 127.0.0.1. Ray reads
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 once, when it is imported (without it, and even with
    # ray.init(_node_ip_address=...), Ray 2.60 listened on every interface), so the flag it set is
    # set here for the time of the start; the processes it starts inherit the loopback address.
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    return True


def _batch_error(exc: BaseException) -> str | None:
    """The message of the BatchError an actor raised, from what Ray raised on the driver. Ray
    Data wraps it in a UserCodeException that keeps only the traceback's text, so the message is
    read from the text when the exception itself is not in the chain."""
    seen = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, BatchError):
            return str(node)
        found = re.findall(r"^(?:autofit\.[\w.]+\.)?BatchError: (.+)$", str(node), re.M)
        if found:
            return found[-1].strip()
        node = getattr(node, "cause", None) or node.__cause__ or node.__context__
    return None


def _model_of_folder(folder: str | os.PathLike) -> str | None:
    """``<pipeline class>:<folder>``, as an actor's keys will record it, read without loading."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return f"{name}:{folder}" if isinstance(name, str) else None


def run_batch_on_ray(
    pipeline: PipelineSource,
    items: Sequence[BatchItem | RejectedItem] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    defaults: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    batch_size: int = 4,
    max_attempts: int = 3,
    progress: bool = True,
) -> BatchReport:
    """:func:`autofit.batch.run_batch` on a Ray cluster: the cluster at ``address`` (default: the
    one this process joined, ``$RAY_ADDRESS``, else a new local one on loopback), ``actors``
    actors (default: one per GPU of the cluster; one on the CPU without GPUs). Items and the
    report are as ``run_batch``'s: rejected items are recorded here, the good ones are generated
    by the actors; an item finished before this run is skipped, one finished by an attempt of a
    retried batch counts as done. Raises :class:`BatchError` when the output folder cannot be
    written."""
    defaults = dict(defaults or {})
    items = _checked_items(items, defaults)
    out = _output_folder(out_dir)
    report = BatchReport()
    t_start = time.perf_counter()
    run = f"{_stamp()}-{secrets.token_hex(4)}"
    todo = _unfinished(pipeline, [it for it in items if isinstance(it, BatchItem)], out, defaults, report)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(report.skipped), desc="autofit batch[ray]", unit="img")
    try:
        _record_rejected([it for it in items if isinstance(it, RejectedItem)], out, run, report, bar)
        if todo:
            _generate(pipeline, todo, out, report, bar, run=run, defaults=defaults, options=options,
                      cache_dir=cache_dir, dtype=dtype, address=address, actors=actors,
                      gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                      max_attempts=max_attempts)
    finally:
        if bar is not None:
            bar.close()
    _remove_starts(out, run)
    report.seconds = time.perf_counter() - t_start
    emit("batch_done", stage="batch", action="none", attempt=0, done=len(report.done),
         skipped=len(report.skipped), failed=len(report.failed), seconds=round(report.seconds, 3))
    return report


def _checked_items(items: Sequence[BatchItem | RejectedItem] | str | os.PathLike,
                   defaults: dict[str, Any]) -> list[BatchItem | RejectedItem]:
    """The items of a prompts file (or a list), screened as ``run_batch`` screens them: an id
    that clashes with another's files becomes a rejected item."""
    if isinstance(items, (str, os.PathLike)):
        good, rejected = read_items(items)
        items = [*rejected, *good]
    items = _screen(list(items))
    clashes = _claim_names(items, defaults)
    return [RejectedItem(it.id, it.line, clashes[it.id]) if isinstance(it, BatchItem) and it.id in clashes else it
            for it in items]


def _output_folder(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "it is a file" if out.exists() else (exc.strerror or str(exc))
        raise BatchError(f"cannot create the output folder {out}: {what}") from None
    _clean_temporaries(out)  # before any actor runs: what is there was left by a dead process
    return out


def _unfinished(pipeline: PipelineSource, todo: list[BatchItem], out: Path, defaults: dict[str, Any],
                report: BatchReport) -> list[BatchItem]:
    """``todo`` less what the manifest shows finished under the same content key (recorded as
    skipped). With a model folder that is known without starting anything; with a factory the
    actors skip them."""
    model = _model_of_folder(pipeline) if not callable(pipeline) else None
    if model is None:
        return todo
    manifest = _Manifest(out)
    manifest.refresh()
    finished = {it.id for it in todo if manifest.finished(it.id, item_key(it, {**defaults, **it.settings}, model))}
    report.skipped.extend(it.id for it in todo if it.id in finished)
    return [it for it in todo if it.id not in finished]


def _record_rejected(rejected: list[RejectedItem], out: Path, run: str, report: BatchReport, bar: Any) -> None:
    if not rejected:
        return
    shard = out / f"manifest.ray-{_stamp()}-driver-{os.getpid()}.jsonl"
    with _open_manifest(shard) as log:
        for item in rejected:
            _record(log, shard, {**_run_one(None, item, None, {}, out, {}, report), "run": run})
            if bar is not None:
                bar.update(1)


def _generate(pipeline: PipelineSource, todo: list[BatchItem], out: Path, report: BatchReport, bar: Any, *,
              run: str, address: str | None, actors: int | None, gpus_per_actor: float | None,
              batch_size: int, cpus_per_actor: float | None, **kwargs: Any) -> None:
    started = _connect(address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if gpus else 0.0
        if actors is None:
            actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # ours counts items
        rows = [{"id": it.id, "prompt": it.prompt, "seed": it.seed, **it.settings, **({"line": it.line} if it.line
                                                                                         else {})} for it in todo]
        # Blocks of one batch each: results come back (and progress moves) as batches finish. A
        # job of fewer batches than actors is spread over as many actors as it has items.
        blocks = max(-(-len(rows) // batch_size), min(actors, len(rows)))
        actors = min(actors, blocks)
        emit("ray_job", stage="batch", items=len(todo), actors=actors, gpus_per_actor=gpus_per_actor,
             cluster_gpus=gpus, run=run)
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = map_images(ds, pipeline, out, actors=actors, gpus_per_actor=gpus_per_actor,
                        cpus_per_actor=cpus_per_actor, batch_size=batch_size, run=run, **kwargs)
        try:
            for row in ds.iter_rows():
                if row["status"] == "ok":
                    report.done.append(row["id"])
                elif row["status"] == "skipped":
                    report.skipped.append(row["id"])
                else:
                    report.failed[row["id"]] = row["error"] or "failed"
                    emit("batch_item_failed", level="warning", stage="batch", action="skip", item=row["id"],
                         error=(row["error"] or "")[:200], worker=row["worker"])
                if bar is not None:
                    bar.update(1)
        except Exception as exc:
            message = _batch_error(exc)
            if message is not None:
                raise BatchError(message) from None
            raise
    finally:
        if started:
            ray.shutdown()


def _remove_starts(out: Path, run: str) -> None:
    folder = out / STARTS_DIR / run
    for path in folder.glob("*.started") if folder.is_dir() else ():
        try:
            path.unlink()
        except OSError:
            pass
    for path in (folder, out / STARTS_DIR):
        try:
            path.rmdir()
        except OSError:
            pass  # not empty (another run), or gone


def cli_batch(args: Any, items: list[BatchItem], rejected: list[RejectedItem],
              defaults: dict[str, Any]) -> BatchReport:
    """``autofit batch ... --ray [ADDRESS]``: the job of ``cmd_batch`` on a Ray cluster; its report
    (``cmd_batch`` prints the summary). Raises :class:`BatchError` as ``run_batch`` does."""
    from autofit.errors import AutoFitUsageError

    if args.distributed:
        raise AutoFitUsageError("--ray and --distributed: choose one (--ray starts one actor per GPU of the cluster; "
                                "--distributed is for `accelerate launch` on one machine)")
    if args.device and ":" in args.device:
        raise AutoFitUsageError(f"--device {args.device} with --ray: each actor sees only its own GPU, as "
                                f"{args.device.split(':')[0]}:0; pass --device {args.device.split(':')[0]} or leave it out")
    options = {"policy": args.policy, "max_vram": args.vram, "max_ram": args.ram, "device": args.device}
    # Ray's own notices (the cluster started, each dataset's plan, progress bars turned off) are
    # not this command's output: warnings only (errors only under --quiet), for the command's time.
    import logging

    loud = {name: logging.getLogger(name) for name in ("ray", "ray.data", "ray.data._internal.progress")}
    levels = {name: log.level for name, log in loud.items()}
    for name, log in loud.items():
        log.setLevel(logging.ERROR if getattr(args, "quiet", False) or name.endswith("progress") else logging.WARNING)
    try:
        return run_batch_on_ray(args.model_dir, [*rejected, *items], args.out, defaults=defaults,
                                options={k: v for k, v in options.items() if v is not None},
                                cache_dir=args.cache_dir, dtype=args.dtype, address=args.ray or None,
                                progress=not (args.json or getattr(args, "quiet", False)))
    finally:
        for name, log in loud.items():
            log.setLevel(levels[name])
