"""Is this exception an out-of-memory error, and of which memory? Freeing memory after one.

torch raises ``torch.OutOfMemoryError`` for the caching allocator, but other paths report the same
condition as a plain ``RuntimeError`` (cuDNN/cuBLAS workspace allocation, ROCm/HIP, XPU, MPS,
cudaMallocAsync, the CPU allocator). The wording is matched case-insensitively.

Only an ``Exception`` is ever an OOM: a ``KeyboardInterrupt`` or ``SystemExit`` raised while an
OOM was being handled passes through untouched. Besides the raised exception itself, the
``__cause__`` chain is followed (``raise X from oom``: the raiser says the OOM caused it). The
``__context__`` (an exception raised *while handling* an OOM) counts only when the raised
exception says so, by quoting the OOM's message (``raise RuntimeError(f"... {e}")``); any other
error raised in an OOM handler (a user's ``ValueError`` in a fallback path) is that error, not an
OOM.
"""

from __future__ import annotations

import enum
import gc
from dataclasses import dataclass

import torch

from . import _diffusers
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
    message: str = ""  # the message, up to 2,000 characters: its figures say why (autofit.explain)


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
    "cudahostalloc",
    "error code 12 (cannot allocate memory)",
    "[errno 12] cannot allocate memory",
)
_CUDA_MALLOC_ASYNC_HINT = ("would exceed allowed memory", "out of memory")


def _head(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    sentences = line.split(". ")
    return ". ".join(sentences[:2])[:200]


def _raised_while_pinning(exc: BaseException) -> bool:
    """Raised by one of diffusers' functions that pin host memory (found by code object, not by
    name) within the last frames. autofit's own pinned buffers (HostShadows) never let a pinning
    failure out: they fall back to pageable memory."""
    pinning_code = _diffusers.pinning_code()
    codes = []
    tb = exc.__traceback__
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return any(c in pinning_code for c in codes[-3:])


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


def _info(kind: OOMKind, exc: BaseException) -> OOMInfo:
    """The one place an :class:`OOMInfo` is built from an exception."""
    return OOMInfo(kind=kind, head=_head(exc), message=str(exc)[:2000])


def _quotes(outer: BaseException, inner: BaseException) -> bool:
    """``outer`` says it wraps ``inner``: its message holds the first line of inner's."""
    lines = str(inner).strip().splitlines()
    return bool(lines) and len(lines[0]) >= 12 and lines[0] in str(outer)


def classify(exc: BaseException) -> OOMInfo | None:
    """What kind of OOM ``exc`` is, else None: the exception itself, an exception in its
    ``__cause__`` chain, or its ``__context__`` when ``exc`` quotes that context's message.
    Never a ``BaseException`` that is not an ``Exception``."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and isinstance(cur, Exception) and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        kind = _classify_one(cur)
        if kind is not None:
            return _info(kind, cur)
        nxt = cur.__cause__
        if nxt is None and cur.__context__ is not None and not cur.__suppress_context__ \
                and _quotes(cur, cur.__context__):
            nxt = cur.__context__
        cur = nxt
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
