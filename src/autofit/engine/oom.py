"""Is this exception an out-of-memory error, and of which memory? Freeing memory after one.

Decided by the exception's type first: ``torch.OutOfMemoryError`` (the caching allocators of
CUDA, ROCm, XPU, cudaMallocAsync) is a device OOM, Python's ``MemoryError`` and an ``OSError``
with ``errno.ENOMEM`` (a failed ``mmap``) a host OOM. Some paths report the condition as a plain
``RuntimeError``; those count only when the message *starts* the way the library that raises it
writes it (cuBLAS/cuDNN/cuFFT/cuSOLVER status codes, ``CUDA error: out of memory``, HIP, MPS,
XPU's Unified Runtime code, the CPU allocator; see ``DEVICE_SPELLINGS`` and ``HOST_SPELLINGS``),
never because a phrase appears somewhere in a message: a user's ``RuntimeError("... CUDA out of
memory ...")`` is the user's error and passes through untouched.

Only an ``Exception`` is ever an OOM: a ``KeyboardInterrupt`` or ``SystemExit`` raised while an
OOM was being handled passes through untouched. Besides the raised exception itself, the
``__cause__`` chain is followed (``raise X from oom``: the raiser says the OOM caused it). The
``__context__`` (an exception raised *while handling* an OOM) counts only when the raised
exception says so, by quoting the OOM's message (``raise RuntimeError(f"... {e}")``); any other
error raised in an OOM handler (a user's ``ValueError`` in a fallback path) is that error, not an
OOM.
"""

from __future__ import annotations

import copy
import enum
import errno
import gc
import re
from dataclasses import dataclass, field

import torch

from autofit import _diffusers
from autofit.facts.devices import memory_of
from autofit.facts.memory import release_pinned_cache

__all__ = ["OOMKind", "OOMInfo", "classify", "free_memory", "DEVICE_SPELLINGS", "HOST_SPELLINGS"]


class OOMKind(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"


@dataclass(frozen=True, slots=True)
class OOMInfo:
    """What is kept of an OOM after its exception is dropped: strings, and the exception itself
    stripped of its traceback (no frames, so none of the failed attempt's tensors), kept to be the
    ``__cause__`` of :class:`autofit.AutoFitExhausted` when recovery gives up."""

    kind: OOMKind
    head: str  # first line of the message, shortened
    message: str = ""  # the message, up to 2,000 characters: its figures say why (autofit.planning.explain)
    error: BaseException | None = field(default=None, compare=False, repr=False)


# A c10 check failure prefixes the message with where it failed: "[enforce fail at alloc_cpu.cpp:127]
# err == 0. DefaultCPUAllocator: ..." (the condition text ends with ". ").
_ENFORCE = r"(?:\[enforce fail at [^\]\n]+\][^\n]*?\.\s+)?"


def _spelled(*patterns: str) -> re.Pattern[str]:
    """Messages that start (after an optional c10 enforce prefix) with one of ``patterns``."""
    return re.compile(_ENFORCE + "(?:" + "|".join(patterns) + ")")


# Plain RuntimeErrors (incl. torch.AcceleratorError) that report device memory, as the libraries
# write them. Matched at the start of the message, case-sensitively.
DEVICE_SPELLINGS = _spelled(
    r"CUDA out of memory\. Tried to allocate ",  # older torch raised the allocator's OOM as RuntimeError
    r"CUDA error: out of memory(?:\n|$)",  # cudaErrorMemoryAllocation through C10_CUDA_CHECK
    r"CUDA driver error: out of memory(?:\n|$)",
    r"(?:CUDA|HIP) error: (?:CUBLAS|HIPBLAS|ROCBLAS)_STATUS_ALLOC_FAILED\b",
    r"(?:CUDA|HIP) error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate\(handle\)`",  # its alloc
    r"cuDNN error: CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)\b",
    r"cuFFT error: CUFFT_ALLOC_FAILED\b",
    r"cusolver error: CUSOLVER_STATUS_ALLOC_FAILED\b",
    r"CUDA error: CUSPARSE_STATUS_ALLOC_FAILED\b",
    r"HIP out of memory\. Tried to allocate ",
    r"HIP error: out of memory(?:\n|$)",
    r"hipErrorOutOfMemory\b",
    r"MPS backend out of memory \(",
    r"XPU out of memory\. Tried to allocate ",
    r"NPU out of memory\. Tried to allocate ",
    r"(?:level_zero|opencl|UR) backend failed with error: \d+ \(UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY\)",
)
# The CPU allocator (Linux and Windows wording); c10's CPU allocator raises a plain RuntimeError.
HOST_SPELLINGS = _spelled(
    r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate \d+ bytes",
)
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
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return OOMKind.HOST
    if isinstance(exc, torch.OutOfMemoryError):
        device = True
    elif isinstance(exc, RuntimeError):  # incl. torch.AcceleratorError (CUDA errors)
        msg = str(exc)
        if HOST_SPELLINGS.match(msg):
            return OOMKind.HOST
        device = DEVICE_SPELLINGS.match(msg) is not None
    else:
        return None
    if not device:
        return None
    return OOMKind.HOST if _raised_while_pinning(exc) else OOMKind.DEVICE


def _info(kind: OOMKind, exc: BaseException) -> OOMInfo:
    """The one place an :class:`OOMInfo` is built from an exception."""
    return OOMInfo(kind=kind, head=_head(exc), message=str(exc)[:2000], error=_without_frames(exc))


def _without_frames(exc: BaseException) -> BaseException | None:
    """A copy of ``exc`` (its type, message and attributes) without traceback or chain: kept to
    be reported, it must not keep the failed attempt's frames, and their tensors, alive."""
    try:
        twin = copy.copy(exc)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return None
    twin.__traceback__ = None
    twin.__cause__ = twin.__context__ = None
    return twin


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
    mem = memory_of(device)
    if mem.kind != "host":
        mem.synchronize()
        mem.empty_cache()
        if mem.can_pin:
            release_pinned_cache()
