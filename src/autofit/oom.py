"""Is this exception an out-of-memory error, and of which memory? Freeing memory after one.

torch raises ``torch.OutOfMemoryError`` for the caching allocator, but other paths report the same
condition as a plain ``RuntimeError`` (cuDNN/cuBLAS workspace allocation, ROCm/HIP, XPU, MPS,
cudaMallocAsync, the CPU allocator). The wording is matched case-insensitively, and the
``__cause__``/``__context__`` chain is searched, since libraries often re-raise with ``from``.
"""

from __future__ import annotations

import enum
import gc
from dataclasses import dataclass

import torch

from .memory import release_pinned_cache

__all__ = ["OOMKind", "OOMInfo", "classify", "free_memory"]


class OOMKind(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"


@dataclass(frozen=True, slots=True)
class OOMInfo:
    """What is kept of an OOM after its exception is dropped: strings only, no frames or tensors."""

    kind: OOMKind
    head: str  # first line of the message, shortened
    type_name: str


# Device memory wordings (lower-case substrings).
_DEVICE_MARKERS = (
    "cuda out of memory",
    "cuda error: out of memory",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "cudamallocasync",  # "Allocation on device ... would exceed allowed memory" under cudaMallocAsync
    "hip out of memory",
    "hip error: out of memory",
    "hiperroroutofmemory",
    "xpu out of memory",
    "ur_result_error_out_of_device_memory",
    "out_of_device_memory",
    "mps backend out of memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "npu out of memory",
    "out of memory on device",
)
# Host memory wordings: the CPU allocator (Linux and Windows), pinned (page-locked) allocation.
_HOST_MARKERS = (
    "defaultcpuallocator: can't allocate memory",
    "defaultcpuallocator: not enough memory",
    "can't allocate memory: you tried to allocate",
    "not enough memory: you tried to allocate",
    "cachinghostallocator",
    "pinned memory",
    "cudahostalloc",
    "cannot allocate memory",
)
_CUDA_MALLOC_ASYNC_HINT = ("would exceed allowed memory", "out of memory")


def _head(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    sentences = line.split(". ")
    return ". ".join(sentences[:2])[:200]


def _raised_while_pinning(exc: BaseException) -> bool:
    """Pinning host memory reports "CUDA error: out of memory" like the device does; the frames
    it was raised from tell them apart."""
    from ._diffusers import PINNING_FUNCTIONS  # lazy: _diffusers imports stages, which imports us

    names = []
    tb = exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return any(n in PINNING_FUNCTIONS or "pin_memory" in n for n in names[-3:])


def _classify_one(exc: BaseException) -> OOMKind | None:
    if isinstance(exc, MemoryError):
        return OOMKind.HOST
    if not isinstance(exc, RuntimeError):
        return None
    msg = str(exc).lower()
    if any(m in msg for m in _HOST_MARKERS):
        return OOMKind.HOST
    device = isinstance(exc, torch.OutOfMemoryError) or (
        any(m in msg for m in _DEVICE_MARKERS)
        and ("cudamallocasync" not in msg or any(h in msg for h in _CUDA_MALLOC_ASYNC_HINT))
    )
    if not device:
        return None
    return OOMKind.HOST if _raised_while_pinning(exc) else OOMKind.DEVICE


def classify(exc: BaseException) -> OOMInfo | None:
    """Return what kind of OOM ``exc`` (or an exception in its cause/context chain) is, else None."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen or len(seen) > 16:
            continue
        seen.add(id(cur))
        kind = _classify_one(cur)
        if kind is not None:
            return OOMInfo(kind=kind, head=_head(cur), type_name=type(cur).__name__)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return None


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks to the driver. Call outside any ``except`` block."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        release_pinned_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
    elif device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()
