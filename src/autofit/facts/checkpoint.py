"""The safetensors files a component was loaded from, as the copy that makes a one-way rung
(fp8 casting, nf4/int8 quantization) undoable without keeping the original weights in host RAM.

A tensor is only ever restored from disk after it was compared, bit for bit, with the file
(after the dtype cast ``from_pretrained`` applied). A weight the user changed after loading (a
fused LoRA, an edited layer) fails that comparison and is kept in RAM instead, so nothing they
had is lost. A file that changes on disk afterwards is refused at restore time, before anything
is touched.

Files are read with plain reads into a reusable buffer, not memory-mapped: a checkpoint
rewritten in place while autofit reads it (a training job saving into the folder) gives a short
read, counted as a mismatch, instead of a SIGBUS that would kill the process.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from autofit import _diffusers
from autofit.errors import CheckpointChanged


# safetensors dtype names -> torch dtypes (those a diffusers or transformers checkpoint holds).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_header(path: "str | Path") -> tuple[dict, int]:
    """(header, offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors_header(path: "str | Path") -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes), without reading weights."""
    return _read_header(path)[0]


@dataclass(frozen=True, slots=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the file
    nbytes: int


class Checkpoint:
    """Read-only view of a component folder's ``*.safetensors`` files (every variant and shard)."""

    def __init__(self, folder: Path, files: list[Path], aliases: dict[str, tuple[str, ...]] | None = None):
        self.folder = folder
        # key -> the other names of the same tensor (tied weights: a checkpoint holds one of them).
        self._aliases = aliases or {}
        # key -> entries, several when the folder holds variants (fp16 and fp32 files).
        self._where: dict[str, list[_Entry]] = {}
        for f in files:
            header, base = _read_header(f)
            for key, meta in header.items():
                dtype = _DTYPES.get(meta["dtype"])
                if dtype is None:
                    continue
                shape = tuple(meta["shape"])
                begin, end = meta["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize:
                    continue  # inconsistent header entry: never matched
                self._where.setdefault(key, []).append(_Entry(f, dtype, shape, base + begin, end - begin))
        self._matched: dict[str, _Entry] = {}  # key -> the entry its live tensor equalled
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._scratch = threading.local()  # per thread: the comparison runs in a worker

    @classmethod
    def of(cls, module: torch.nn.Module) -> Checkpoint | None:
        """The local folder ``module`` was loaded from, if it holds safetensors files."""
        path = _diffusers.source_folder(module)
        if not path:
            return None
        folder = Path(path)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        try:
            return cls(folder, files, _tied_names(module)) if files else None
        except Exception:  # unreadable, truncated or not a safetensors header: no checkpoint
            return None

    def _entries(self, key: str) -> list[_Entry]:
        """The file entries of ``key``, or of a name it is tied to when the file has no ``key``."""
        found = self._where.get(key)
        if found:
            return found
        return [e for alias in self._aliases.get(key, ()) for e in self._where.get(alias, ())]

    def covers(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """Whether every (key, tensor) has an entry of the same shape (headers only, no reads)."""
        for key, t in tensors:
            if not any(e.shape == tuple(t.shape) for e in self._entries(key)):
                return False
        return True

    def _read(self, e: _Entry, scratch: bool) -> torch.Tensor:
        """The entry's tensor, read from disk (into this thread's reusable buffer if ``scratch``)."""
        if scratch:
            buf = getattr(self._scratch, "buf", None)
            if buf is None or buf.numel() < e.nbytes:
                buf = self._scratch.buf = torch.empty(max(e.nbytes, 1), dtype=torch.uint8)
            buf = buf[: e.nbytes]
        else:
            buf = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.offset)
            got = 0
            while got < e.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise EOFError(f"{e.path} ends before {e.offset + e.nbytes} bytes (truncated?)")
                got += n
        return buf.view(e.dtype).view(e.shape)

    def drop_scratch(self) -> None:
        """Free this thread's read buffer (the worker's goes with its thread)."""
        self._scratch.__dict__.pop("buf", None)

    def same(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` equals the file's ``key`` cast to its dtype, bit for bit (-0.0 is not
        0.0); remembers that entry. An entry that cannot be read counts as different."""
        for e in self._entries(key):
            if e.shape != tuple(tensor.shape):
                continue
            try:
                stamp = _stamp(e.path)
                stored = self._read(e, scratch=True)
                if stored.dtype != tensor.dtype or stored.device != tensor.device:
                    stored = stored.to(device=tensor.device, dtype=tensor.dtype)
                equal = _bitwise_equal(stored, tensor.detach())
            except Exception:  # truncated, unreadable, vanished: try the next entry
                continue
            if equal:
                self._matched[key] = e
                self._stamps.setdefault(e.path, stamp)
                return True
        return False

    def check_unchanged(self, keys: Iterable[str]) -> None:
        """Raise CheckpointChanged unless the files holding ``keys`` are as they were compared."""
        for key in keys:
            path = self._matched[key].path
            try:
                same = _stamp(path) == self._stamps[path]
            except OSError:  # deleted or moved away
                same = False
            if not same:
                raise CheckpointChanged(
                    f"{path} changed on disk (or is gone) after autofit checked {self.folder.name}'s weights "
                    "against it, so the original weights cannot be restored from it; the component keeps its "
                    "current weights. Reload the pipeline to get the originals back."
                )

    def load(self, key: str, dtype: torch.dtype, stride: tuple[int, ...] | None = None) -> torch.Tensor:
        """A fresh CPU tensor of ``key`` as it was compared (same file, same dtype cast), laid out
        with ``stride`` when that is a dense layout (channels_last weights stay channels_last)."""
        stored = self._read(self._matched[key], scratch=False)
        if stride is not None and stride != stored.stride() and _dense(stored.shape, stride):
            return torch.empty_strided(stored.shape, stride, dtype=dtype).copy_(stored)
        return stored.to(dtype) if stored.dtype != dtype else stored  # a fresh buffer already


def _tied_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """name -> the other names of the same tensor, for tensors reachable under several names."""
    names: dict[int, list[str]] = {}
    for n, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return {n: tuple(o for o in group if o != n) for group in names.values() if len(group) > 1 for n in group}


def _dense(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """A permutation of a contiguous layout: no gaps, no overlap (expanded or sliced strides are not)."""
    expected = 1
    for st, size in sorted((st, size) for size, st in zip(shape, stride) if size != 1):
        if st != expected:
            return False
        expected *= size
    return True


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on the bits: -0.0 and 0.0 differ, a NaN equals the same NaN."""
    as_int = _SAME_SIZE_INT.get(a.element_size())
    if a.dtype != b.dtype or as_int is None or a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(as_int), b.view(as_int))


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
