"""Where the ``group_disk`` placement keeps the weights it offloads to disk, and the room there.

Each placement writes its own folder, ``<root>/<pid>-<random>/<component>/``, one per component:
diffusers names a group's file after its group id (``CLIPTextModelWithProjection_unmatched_group``
for a whole text encoder), so two components of one class sharing a folder would read each
other's weights. The folder is removed when the placement is taken down, or when its modules
are garbage collected (a pipeline dropped while on disk), at the latest at exit. While it is in use its
owner holds a lock on ``<folder>/.lock``; a folder whose lock can be taken was left by a process
that died, and the next placement removes it (a lock, not a pid: pids repeat across containers
that share a cache folder). The root is ``$AUTOFIT_OFFLOAD_DIR``, else
``offload/`` in the default plan cache folder: a disk, not ``/tmp``, which is often RAM (tmpfs).
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref

try:
    import fcntl
except ImportError:  # not POSIX: stale folders are not collected
    fcntl = None  # type: ignore[assignment]
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OFFLOAD_ENV = "AUTOFIT_OFFLOAD_DIR"
_LOCKS: dict[Path, int] = {}  # placement folder -> the open, locked descriptor of its .lock


def offload_root() -> Path:
    env = os.environ.get(OFFLOAD_ENV)
    if env:
        return Path(env)
    from .cache import default_dir

    return default_dir() / "offload"


def free_bytes(path: Path | None = None) -> int | None:
    """Free bytes on the file system that holds ``path`` (default: the offload root), or None."""
    p = (path or offload_root()).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def new_folder() -> Path:
    """A fresh folder for one placement, locked while in use (stale ones are removed first)."""
    root = offload_root()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    # Made and locked under a hidden name, then renamed: no other process sees it unlocked.
    making = (root / f".{name}").absolute()
    making.mkdir(mode=0o700)
    fd = os.open(making / ".lock", os.O_CREAT | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks (some NFS): never collected as stale either
            pass
    folder = making.with_name(name)
    making.rename(folder)
    _LOCKS[folder] = fd
    return folder


def track(folder: Path, components: Mapping[str, Any]) -> None:
    """Remove each component's files when its module is garbage collected (a pipeline dropped
    while on disk: its hooks, which read the files, go with it), and the placement's folder with
    the last of them; at the latest when the interpreter exits."""
    left = set(components)

    def gone(name: str) -> None:
        shutil.rmtree(folder / name, ignore_errors=True)
        left.discard(name)
        if not left:
            remove([folder / name])

    for name, module in components.items():
        weakref.finalize(module, gone, name)


def remove(folders: Iterable[str | Path]) -> None:
    """Remove the placement folders holding ``folders`` (component subfolders) that autofit
    made; a folder the user passed to diffusers' own disk offloading is theirs."""
    for f in folders:
        run = Path(f).absolute().parent
        fd = _LOCKS.pop(run, None)
        if fd is None:
            continue
        shutil.rmtree(run, ignore_errors=True)
        os.close(fd)


def _remove_stale(root: Path) -> None:
    if fcntl is None:
        return
    for run in root.iterdir():
        if run.name.startswith(".") or not run.is_dir() or run.is_symlink() or run.absolute() in _LOCKS:
            continue
        try:
            fd = os.open(run / ".lock", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # not one of ours, or being made right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        shutil.rmtree(run, ignore_errors=True)
        os.close(fd)
