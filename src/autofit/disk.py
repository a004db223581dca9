"""Where the ``group_disk`` placement keeps the weights it offloads to disk, and the room there.

Each placement writes its own folder, ``<root>/<pid>-<12 hex>/<component>/``, one per component:
diffusers names a group's file after its group id (``CLIPTextModelWithProjection_unmatched_group``
for a whole text encoder), so two components of one class sharing a folder would read each
other's weights. The folder is removed when the placement is taken down, or when its modules
are garbage collected (a pipeline dropped while on disk), at the latest at exit. The root is
``$AUTOFIT_OFFLOAD_DIR``, else ``offload/`` in the default plan cache folder: a disk, not
``/tmp``, which is often RAM (tmpfs).

The root may hold other things (a user's projects, another tool's folders): autofit removes a
folder there only when it can prove it made it, and that its maker is gone: the name is
``<pid>-<12 hex>``, it is a real folder (never a link, never followed), it holds autofit's marker
file ``.autofit-offload`` with its magic text, and the lock its owner holds on ``.lock`` while the
folder is in use can be taken (a lock, not a pid: pids repeat across containers that share a
cache folder). Folders made before the marker existed are left alone.

While a placement lasts, autofit keeps every file it offloaded open (:class:`HeldFile`) and reads
the weights through that descriptor: a tmp cleaner or a scratch purge that removes the files (or
the whole folder) takes the names, not the weights, and every call goes on as before. Each read
goes into a fresh tensor from torch's allocator, at the alignment the weight had before it was
offloaded (the allocator's 64 bytes, or a checkpoint's offset for a weight mapped from it on the
CPU), never at the file's own offsets: the same kernels run as with the weights in memory, and
the outputs are identical.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
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
MARKER = ".autofit-offload"
# What the marker holds: a folder whose marker says anything else was not made by autofit.
MAGIC = b"autofit offload folder v1: made by autofit.disk.new_folder, removed once its .lock is free\n"
_NAME = re.compile(r"\.?[0-9]{1,10}-[0-9a-f]{12}")  # <pid>-<12 hex>; a leading dot while being made
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_PREADV = getattr(os, "preadv", None)
_LOCKS: dict[Path, int] = {}  # placement folder -> the open, locked descriptor of its .lock


class OffloadUnreadable(OSError):
    """Weights offloaded to disk cannot be read back (the file was cut short or damaged in place)."""


def offload_root() -> Path:
    env = os.environ.get(OFFLOAD_ENV)
    if env:
        return Path(env)
    from autofit.paths import default_dir

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


def unusable(root: Path | None = None) -> str | None:
    """Why no placement folder can be made under the offload root now, or None when one can: a
    file is written and removed there (or, while the root does not exist yet, in the folder it
    would be made in). Nothing is left behind."""
    root = (root or offload_root()).absolute()
    probe_in = root
    try:
        while not probe_in.exists():
            if probe_in == probe_in.parent:
                break
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            what = "it is a file, not a folder" if probe_in == root else f"{probe_in}, in its path, is not a folder"
            return f"the offload folder {root} cannot be made: {what}; set {OFFLOAD_ENV} to a folder on a writable disk"
        fd, probe = tempfile.mkstemp(prefix=".autofit-probe-", dir=probe_in)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return (f"the offload folder {root} cannot be written ({exc.strerror or exc}); "
                f"set {OFFLOAD_ENV} to a folder on a writable disk")
    return None


def new_folder() -> Path:
    """A fresh folder for one placement, marked as autofit's and locked while in use (stale ones
    are removed first)."""
    root = offload_root()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    # Made, locked and marked under a hidden name, then renamed: no other process sees it unlocked.
    making = (root / f".{name}").absolute()
    making.mkdir(mode=0o700)
    fd = os.open(making / ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW, 0o600)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a file system without locks (some NFS): never collected as stale either
                pass
        # The marker goes in after the lock: a sweep never sees a marked folder unlocked by a live owner.
        marker = os.open(making / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW, 0o600)
        try:
            os.write(marker, MAGIC)
        finally:
            os.close(marker)
        folder = making.with_name(name)
        making.rename(folder)
    except BaseException:
        os.close(fd)
        shutil.rmtree(making, ignore_errors=True)
        raise
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
        shutil.rmtree(run, ignore_errors=True)  # never follows a link put in its place
        os.close(fd)


def _remove_stale(root: Path) -> None:
    """Remove the folders under ``root`` that autofit made and whose owner is gone; nothing else."""
    if fcntl is None or os.open not in os.supports_dir_fd:
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if not _NAME.fullmatch(entry.name):
            continue
        path = Path(entry.path).absolute()
        if path in _LOCKS:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue  # a link (even to one of ours) or a file: never followed, never removed
        except OSError:
            continue
        _remove_if_stale(path)


def _remove_if_stale(path: Path) -> None:
    try:
        folder = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
    except OSError:
        return  # gone, swapped for a link, or not ours to read
    lock = -1
    try:
        seen = os.fstat(folder)
        if not stat.S_ISDIR(seen.st_mode) or not _marked(folder):
            return
        lock = os.open(".lock", os.O_RDONLY | _NOFOLLOW, dir_fd=folder)
        if not stat.S_ISREG(os.fstat(lock).st_mode):
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # its owner is alive
        if os.path.samestat(seen, os.lstat(path)):  # still the folder checked, not one swapped in since
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        return
    finally:
        if lock >= 0:
            os.close(lock)
        os.close(folder)


def _marked(folder: int) -> bool:
    """Whether the open folder ``folder`` holds autofit's marker, a regular file with the magic text."""
    try:
        fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW, dir_fd=folder)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and st.st_size == len(MAGIC) and os.read(fd, len(MAGIC) + 1) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


# ---- the files diffusers writes (safetensors), held open and read into aligned tensors ----------
def _dtypes() -> dict[str, Any]:
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U64": "uint64",
             "U32": "uint32", "U16": "uint16", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
             "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


class HeldFile:
    """A safetensors file kept open: its tensors stay readable after its name is removed.

    Each :meth:`read` returns fresh CPU tensors allocated by torch (aligned as torch aligns every
    tensor, or as the weight was before), filled with plain reads; never views at the file's own
    offsets."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._lock = threading.Lock()
        try:
            self.index = self._header()
        except BaseException:
            self._file.close()
            raise

    def _header(self) -> dict[str, tuple[Any, tuple[int, ...], int, int]]:
        """key -> (dtype, shape, offset in the file, bytes), checked against the file's size."""
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise OffloadUnreadable(f"{self.path} is {size} bytes: no safetensors header (cut short?)")
        (n,) = struct.unpack("<Q", self._pread(0, 8))
        if 8 + n > size:
            raise OffloadUnreadable(f"{self.path}: the header runs past the end of the file (cut short?)")
        dtypes = _dtypes()
        index = {}
        try:
            header = json.loads(self._pread(8, n))
            header.pop("__metadata__", None)
            for key, meta in header.items():
                dtype = dtypes.get(meta["dtype"])
                if dtype is None:
                    raise OffloadUnreadable(f"{self.path}: {key} has dtype {meta['dtype']}, which this torch cannot "
                                            "hold")
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
                if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or 8 + n + end > size:
                    raise OffloadUnreadable(f"{self.path}: {key}'s bytes are not all in the file (cut short?)")
                index[key] = (dtype, shape, 8 + n + begin, end - begin)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, not safetensors' layout
            raise OffloadUnreadable(f"{self.path}: not a safetensors header ({exc})") from None
        return index

    def _pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self._read_into(memoryview(buf), offset)
        return bytes(buf)

    def _read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``: positional reads where the OS has them (no file position
        shared with a forked process or another thread), else seek and read under a lock."""
        got, want = 0, len(view)
        while got < want:
            if _PREADV is not None:
                n = _PREADV(self._file.fileno(), [view[got:]], offset + got)
            else:
                with self._lock:
                    self._file.seek(offset + got)
                    n = self._file.readinto(view[got:])
            if not n:
                raise OffloadUnreadable(f"{self.path} ends before byte {offset + want} (cut short after it was "
                                        "written?)")
            got += n

    def read(self, skew: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Every tensor of the file, each in a fresh CPU tensor that starts on a 64-byte boundary,
        or ``skew[key]`` bytes past one (where the weight sat before it was offloaded: a
        checkpoint mapped on the CPU leaves weights at its own offsets, and some kernels take
        another path there)."""
        import torch

        out = {}
        for key, (dtype, shape, offset, nbytes) in self.index.items():
            past = (skew or {}).get(key, 0) % 64
            if past % dtype.itemsize:
                past = 0
            buf = torch.empty(nbytes + past, dtype=torch.uint8)[past:]
            if nbytes:
                self._read_into(memoryview(buf.numpy()).cast("B"), offset)
            out[key] = buf.view(dtype).view(shape)
        return out

    def close(self) -> None:
        self._file.close()
