"""The plan cache: what worked, stored as JSON under the user's cache directory.

One file per key; writes go to a temporary file in the same folder and are renamed into place
(``os.replace`` is atomic), so many processes of a batch job can write at once: a reader sees a
whole old record or a whole new one, never a torn one. Updates hold a per-key file lock while
they read, merge and write (``PlanCache.update``), so concurrent findings are merged, not lost.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autofit._version import __version__
from autofit.events import emit
from autofit.paths import default_dir

if TYPE_CHECKING:
    from autofit.facts.footprint import Footprint

try:
    import fcntl
except ImportError:  # not POSIX: the last writer wins
    fcntl = None  # type: ignore[assignment]

SCHEMA = 1


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "?"
    out["autofit"] = __version__
    return out


def key_fields(
    *,
    pipeline: str,
    footprint: "Footprint",
    height: int | None,
    width: int | None,
    frames: int,
    batch: int,
    device_name: str,
    budget_bytes: int,
    policy: str,
    cfg: bool = True,
) -> dict[str, Any]:
    """What a plan depends on. Resolution is bucketed to 64K pixels and the budget to 512 MiB, so a
    grown budget gives a new key and the planner tries the lighter plan again. The budget is the
    configured one (card total x per-process fraction, capped by max_vram), not what happens to be
    free at the time, so processes of one job agree on the key."""
    pixels = (height or 0) * (width or 0)
    return {
        "schema": SCHEMA,
        "pipeline": pipeline,
        "components": sorted((c.name, c.class_name, c.bytes, c.dtype) for c in footprint.components.values()),
        "pixels_bucket": round(pixels / 65536),
        "frames": frames,
        "batch": batch,
        "cfg": cfg,  # guidance doubles the denoiser's batch, and its activations
        "device": device_name,
        "budget_bucket": budget_bytes // (512 << 20),
        "policy": policy,
        "versions": dict(_versions()),
    }


def make_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


MAX_RECORD_BYTES = 1 << 20  # a record is a few KiB; anything larger is not one of ours
_MAX_ACTIVATION = 1 << 50  # bytes; a measured peak above 1 PiB is not a measurement
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted as a lock or record must not hang us
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _is_count(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= _MAX_ACTIVATION)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_key(name: str) -> bool:
    """Whether ``name`` can be a plan-cache key (a record's file name): letters, digits, '-', '_'.
    The one check, for the records ``put`` writes and the ones ``entries`` lists."""
    return bool(name) and all(c.isalnum() or c in "-_" for c in name)


def record_problem(record: Any) -> str | None:
    """Why a parsed record cannot be used (the typed loader's check), or None. What the runtime
    reads must have its type: ``plan`` a list of rung names, ``activations`` stage -> a finite,
    non-negative byte count, ``broken`` rung -> component names."""
    if not isinstance(record, dict):
        return f"a record is an object, not {type(record).__name__}"
    if record.get("schema") != SCHEMA:
        return f"schema {record.get('schema')!r}, this autofit reads {SCHEMA}"
    if "plan" in record and not _str_list(record["plan"]):
        return "plan is not a list of rung names"
    acts = record.get("activations", {})
    if not isinstance(acts, dict) or not all(isinstance(k, str) and _is_count(v) for k, v in acts.items()):
        return "activations is not stage -> finite, non-negative bytes"
    broken = record.get("broken", {})
    if not isinstance(broken, dict) or not all(isinstance(k, str) and _str_list(v) for k, v in broken.items()):
        return "broken is not rung -> component names"
    if "running" in record and not _str_list(record["running"]):
        return "running is not a list of rung names"
    if "explained" in record and not isinstance(record["explained"], bool):
        return "explained is not true or false"
    if "key" in record and not isinstance(record["key"], dict):
        return "key is not an object"
    if "updated" in record and not _is_count(record["updated"]):
        return "updated is not a time"
    return None


def _open_regular(path: str | os.PathLike, flags: int, *, mode: int = 0o600, dir_fd: int | None = None) -> int:
    """Open without following a symlink or blocking on a FIFO; refuse anything but a regular file."""
    fd = os.open(path, flags | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


# A record is written in milliseconds: a temporary file this old was left by a writer that died
# between creating it and renaming it into place (kill -9, a full disk).
STALE_TEMPORARY_SECONDS = 600
_TEMPORARY = re.compile(r"\.[A-Za-z0-9_-]+\.\d+\.[0-9a-f]{8}\.tmp")


def _remove_stale_temporaries(dfd: int) -> None:
    """Remove the plans folder's temporary files that no live writer can still be renaming: only
    names of :meth:`PlanCache.put`'s own pattern, only regular files, never through a symlink."""
    now = time.time()
    for name in os.listdir(dfd):
        if not _TEMPORARY.fullmatch(name):
            continue
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TEMPORARY_SECONDS:
                os.unlink(name, dir_fd=dfd)
                emit("cache_temporary_removed", stage="load", action="none", file=name)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            pass


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One stored record as ``autofit cache list`` shows it: usable (``record``) or not (``problem``)."""

    key: str
    path: Path
    record: dict[str, Any] | None
    problem: str | None


class PlanCache:
    """The plan cache folder. ``get`` returns only records that pass :func:`record_problem`; a
    record that does not is ignored with an ``autofit.cache_record_ignored`` event (and replaced
    by the next update). Locks, records and the ``plans`` folder are never followed through a
    symlink, nor opened when they are not regular files (a FIFO would hang the call)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_dir()

    @property
    def plans(self) -> Path:
        return self.directory / "plans"

    def _path(self, key: str) -> Path:
        if not is_key(key):
            raise ValueError(f"{key!r} is not a plan-cache key (letters, digits, '-', '_')")
        return self.plans / f"{key}.json"

    def _plans_fd(self, *, create: bool) -> int | None:
        """The plans folder, opened without following a symlink (None when it does not exist)."""
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.plans)
            except FileExistsError:
                pass
        try:
            fd = os.open(self.plans, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP (a symlink) or ENOTDIR
            raise OSError(exc.errno, f"the plan cache's plans folder is not a folder of its own "
                                     f"({exc.strerror}); remove it", str(self.plans)) from None
        return fd

    def _read(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None), (None, why it is ignored), or (None, None) when there is none."""
        path = self._path(key)
        try:
            dfd = self._plans_fd(create=False)
        except OSError as exc:
            return None, str(exc)
        if dfd is None:
            return None, None
        try:
            fd = _open_regular(path.name, os.O_RDONLY, dir_fd=dfd)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"cannot be opened as a regular file ({exc.strerror})"
        finally:
            os.close(dfd)
        try:
            with os.fdopen(fd, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_RECORD_BYTES:
                    return None, f"larger than {MAX_RECORD_BYTES} bytes"
                data = f.read(MAX_RECORD_BYTES + 1)
            if len(data) > MAX_RECORD_BYTES:
                return None, f"larger than {MAX_RECORD_BYTES} bytes"
            record = json.loads(data)
        except (OSError, ValueError, RecursionError) as exc:
            return None, f"not readable JSON ({type(exc).__name__})"
        problem = record_problem(record)
        return (None, problem) if problem else (record, None)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key`` when there is a usable one, else None."""
        record, problem = self._read(key)
        if problem is not None:
            emit("cache_record_ignored", level="warning", stage="load", action="none", key=key, reason=problem)
        return record

    def update(self, key: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> None:
        """Read, change and write one record while holding the key's lock, so two processes that
        learn something at once (a rung that broke, a plan that worked) merge instead of one
        overwriting the other. Where file locks are missing (not POSIX, or a filesystem without flock)
        the last writer wins."""
        self._path(key)
        dfd = self._plans_fd(create=True)
        assert dfd is not None
        try:
            # O_RDONLY is enough for flock, and lets processes of other users share the lock file.
            mode = self._file_mode(dfd)
            lock = _open_regular(f"{key}.lock", os.O_RDONLY | os.O_CREAT, mode=mode, dir_fd=dfd)
        finally:
            os.close(dfd)
        if hasattr(os, "fchmod") and os.fstat(lock).st_uid == os.getuid():
            try:
                os.fchmod(lock, mode)  # the umask would take the group bits away
            except OSError:
                pass
        try:
            locked = False
            if fcntl is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    locked = True
                except OSError:  # a filesystem without flock (Lustre noflock, some NFS/FUSE)
                    pass
            try:
                self.put(key, change(self.get(key)))
            finally:
                if locked:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    @staticmethod
    def _file_mode(dfd: int) -> int:
        """Records are as readable as their folder: a folder a team's group can enter gives
        group-readable records, so processes of other users in the group share what was learned."""
        folder = os.fstat(dfd).st_mode
        mode = 0o600
        if folder & stat.S_IXGRP:
            mode |= 0o040
        if folder & stat.S_IXOTH:
            mode |= 0o004
        return mode

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        record = {**record, "schema": SCHEMA, "updated": time.time()}
        dfd = self._plans_fd(create=True)
        assert dfd is not None
        try:
            # Created and renamed within the folder opened above: a plans symlink swapped in
            # meanwhile is not followed.
            _remove_stale_temporaries(dfd)
            tmp = f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                         self._file_mode(dfd), dir_fd=dfd)
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, self._file_mode(dfd))  # the umask would take the group bits away
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f, indent=1, default=str)
                os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise
        finally:
            os.close(dfd)

    # ---- what ``autofit cache`` shows and clears ---------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Every stored record, usable or not, newest first."""
        try:
            dfd = self._plans_fd(create=False)
        except OSError:
            return []
        if dfd is None:
            return []
        os.close(dfd)
        out = []
        for path in self.plans.glob("*.json"):
            record, problem = self._read(path.stem) if is_key(path.stem) else (None, "not a plan-cache key")
            out.append(CacheEntry(path.stem, path, record, problem))
        return sorted(out, key=lambda e: -(e.record or {}).get("updated", 0))

    def remove(self, key: str) -> bool:
        """Forget one record (and its lock). True when there was one."""
        path = self._path(key)
        removed = False
        for p in (path, path.with_suffix(".lock")):
            try:
                p.unlink()
                removed = removed or p == path
            except FileNotFoundError:
                pass
        return removed

    def clear(self, *, model_dir: str | os.PathLike | None = None) -> int:
        """Forget every record, or those of the pipeline in ``model_dir`` (same pipeline class and
        component classes); unreadable records go too. Returns how many records were removed."""
        want = None
        if model_dir is not None:
            from autofit.facts.footprint import measure_folder

            pipeline, fp = measure_folder(model_dir)
            want = sorted((c.name, c.class_name) for c in fp.components.values())

        def match(e: CacheEntry) -> bool:
            if want is None or e.record is None:
                return True
            fields = e.record.get("key") or {}
            comps = fields.get("components")
            return (fields.get("pipeline") == pipeline and isinstance(comps, list)
                    and sorted((c[0], c[1]) for c in comps if isinstance(c, list) and len(c) >= 2) == want)

        n = 0
        for entry in self.entries():
            if not match(entry):
                continue
            try:
                n += self.remove(entry.key)
            except (OSError, ValueError) as exc:  # a folder where a record should be, a name not a key
                reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                emit("cache_write_failed", level="warning", error=f"cannot remove {entry.path}: {reason}; "
                                                                  "remove it by hand")
        return n
