"""Is an OOM explained by the plan in force, or by something that passes (another process's spike,
a fragmented cache)? Pure: message text and numbers in, a verdict out; no torch, no I/O.

torch's caching allocator says at the moment of failure how the device was shared: "Tried to
allocate X. GPU 0 has a total capacity of C of which F is free. ... this process has P memory in
use. Of the allocated memory A is allocated by PyTorch, and R is reserved by PyTorch but
unallocated." Those figures are the ground truth of that moment, better than any probe taken
after. Where the message has none (cuDNN/cuBLAS workspace failures, "CUDA error: out of memory"),
the plan's predicted peak is compared with the budget now.

- ``plan``: this process's own memory (plus the request) filled the device, or the plan's
  predicted peak exceeds the budget now. Explained: escalate.
- ``fragmentation``: the cache holds at least the request reserved but unallocated. Emptying it
  is the remedy: retry the same plan.
- ``others``: the process was well under the device's capacity; other processes held the rest.
- ``unknown``: no figure says the plan is at fault.
The last three are unexplained: the same plan is retried once before the ladder is climbed, and
an escalation they force does not steer the plan cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autofit.units import GIB, UNITS

_SIZE = r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B)"
_PATTERNS = {
    "requested": r"tried to allocate " + _SIZE,
    "capacity": r"total capacity of " + _SIZE,
    "free": r"of which " + _SIZE + r" is free",
    "process": r"this process has " + _SIZE + r" memory in use",
    "allocated": r"of the allocated memory " + _SIZE + r" is allocated by pytorch",
    # set_per_process_memory_fraction's cap: CUDA writes "20.00 GiB allowed; " before "Of the
    # allocated memory" (c10/cuda/CUDACachingAllocator.cpp); "with" is accepted for older texts.
    "allowed": r"(?:with )?" + _SIZE + r" allowed;",
    "reserved_unallocated": _SIZE + r" is reserved by pytorch but unallocated",
}
# The process counts as having filled the device when its memory plus the request reaches this
# share of what it may use (the rest is the driver's, the context's and rounding).
OWN_SHARE = 0.85
EXPLAINED = frozenset({"plan"})


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * UNITS[unit.lower()])


@dataclass(frozen=True, slots=True)
class OOMFigures:
    """The figures an allocator's OOM message states (None where it states none)."""

    requested: int | None = None
    capacity: int | None = None
    free: int | None = None
    process: int | None = None
    allocated: int | None = None
    allowed: int | None = None  # set_per_process_memory_fraction's cap, when one is set
    reserved_unallocated: int | None = None

    @classmethod
    def parse(cls, message: str) -> OOMFigures:
        text = " ".join(message.split()).lower()
        found = {}
        for name, pattern in _PATTERNS.items():
            m = re.search(pattern.lower(), text)
            if m:
                found[name] = _bytes(m.group(1), m.group(2))
        return cls(**found)

    @property
    def others(self) -> int | None:
        """Device memory other processes (and the driver) held at the moment of failure."""
        if self.capacity is None or self.free is None or self.process is None:
            return None
        return max(self.capacity - self.free - self.process, 0)


@dataclass(frozen=True, slots=True)
class Verdict:
    cause: str  # plan | fragmentation | others | unknown
    detail: str

    @property
    def explained(self) -> bool:
        return self.cause in EXPLAINED


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def judge(message: str, *, predicted_peak: int | None = None, budget: int | None = None) -> Verdict:
    """Why a device OOM happened, from its message and, failing figures there, the plan's
    predicted peak for the failing stage against the budget now."""
    f = OOMFigures.parse(message)
    need = f.requested or 0
    if f.reserved_unallocated is not None and need and f.reserved_unallocated >= need:
        return Verdict("fragmentation", f"{_gib(f.reserved_unallocated)} reserved but unallocated >= the "
                                        f"{_gib(need)} asked for")
    if f.process is not None and (f.allowed or f.capacity):
        limit = f.allowed or f.capacity
        assert limit is not None
        if f.process + need >= OWN_SHARE * limit:
            return Verdict("plan", f"this process held {_gib(f.process)} of {_gib(limit)} and asked for {_gib(need)}")
        others = f.others
        held = f" (others held {_gib(others)})" if others is not None else ""
        return Verdict("others", f"this process held only {_gib(f.process)} of {_gib(limit)}{held}")
    if predicted_peak is not None and budget is not None:
        if predicted_peak > budget:
            return Verdict("plan", f"predicted peak {_gib(predicted_peak)} > budget {_gib(budget)}")
        return Verdict("unknown", f"predicted peak {_gib(predicted_peak)} fits the budget {_gib(budget)}")
    return Verdict("unknown", "no memory figures")


def shortfall(message: str) -> int:
    """The bytes the failed allocation lacked, from the OOM's own figures: what it asked for less
    what the process could still have had (the per-process cap less what it held, else the
    device's free memory). 0 when the message states no such figures (cuDNN, "CUDA error: out of
    memory"): the ladder then takes the first rung that lowers the peak."""
    f = OOMFigures.parse(message)
    if not f.requested:
        return 0
    if f.allowed is not None and f.process is not None:
        room = max(f.allowed - f.process, 0)
    elif f.free is not None:
        room = f.free
    else:
        return 0
    return max(f.requested - room, 1)


def room_at_failure(message: str) -> int | None:
    """The device memory this process could have used when the OOM was raised: the per-process
    cap when one is stated, else what was free plus what the process held. None without figures."""
    f = OOMFigures.parse(message)
    if f.allowed is not None:
        return f.allowed
    if f.free is not None and f.process is not None:
        return f.free + f.process
    return None
