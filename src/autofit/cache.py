"""The plan cache: what worked, stored as JSON under the user's cache directory.

One file per key; writes go to a temporary file in the same folder and are renamed into place
(``os.replace`` is atomic), so many processes of a batch job can write at once: a reader sees a
whole old record or a whole new one, never a torn one. Updates hold a per-key file lock while
they read, merge and write (``PlanCache.update``), so concurrent findings are merged, not lost.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .footprint import Footprint

SCHEMA = 1


def default_dir() -> Path:
    env = os.environ.get("AUTOFIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autofit"


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "?"
    from . import __version__

    out["autofit"] = __version__
    return out


def key_fields(
    *,
    pipeline: str,
    footprint: Footprint,
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


class PlanCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_dir()

    def _path(self, key: str) -> Path:
        return self.directory / "plans" / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("schema") == SCHEMA else None

    def update(self, key: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> None:
        """Read, change and write one record while holding the key's lock, so two processes that
        learn something at once (a rung that broke, a plan that worked) merge instead of one
        overwriting the other. Where file locks are missing (not POSIX, or a filesystem without flock)
        the last writer wins."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            try:
                import fcntl
            except ImportError:
                fcntl = None  # type: ignore[assignment]
            locked = False
            if fcntl is not None:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                    locked = True
                except OSError:  # a filesystem without flock (Lustre noflock, some NFS/FUSE)
                    pass
            try:
                self.put(key, change(self.get(key)))
            finally:
                if locked:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**record, "schema": SCHEMA, "updated": time.time()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, default=str)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
