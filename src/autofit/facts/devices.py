"""The device layer: what memory a device has, holds and peaked at, whether host memory can be
pinned for it, and how to empty its caches. Every reader of device memory goes through here.

Three kinds of device:

- CUDA (and ROCm, which torch calls ``cuda``): ``torch.cuda``; NVML, where present, is read by
  :mod:`autofit.facts.hardware` for memory other processes hold.
- Any other accelerator torch knows through ``torch.accelerator`` (XPU, MPS, a PrivateUse1
  backend such as :mod:`autofit.testing.simdev`): its generic memory API, by device index.
- The CPU: the device *is* the host. Nothing is measured per stage (no allocator statistics);
  what the log shows for it is the process's resident set, named as such.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psutil
import torch

__all__ = ["DeviceMemory", "memory_of"]


@dataclass(frozen=True)
class DeviceMemory:
    """The memory reader of one device (see :func:`memory_of`)."""

    device: torch.device
    kind: str  # "cuda", "accelerator" or "host"

    # ---- what the device can tell ----------------------------------------------------------
    @property
    def measures_peaks(self) -> bool:
        """Whether the allocator counts this process's bytes and their peak (not on the CPU)."""
        return self.kind != "host"

    @property
    def can_pin(self) -> bool:
        """Whether host memory can be page-locked for copies to this device."""
        if self.kind == "host":
            return False
        if self.kind == "cuda":
            return True
        return self.device.type != "mps"  # unified memory: nothing to pin

    def _index(self) -> int:
        if self.device.index is not None:
            return self.device.index
        if self.kind == "cuda":
            return torch.cuda.current_device()
        return torch.accelerator.current_device_index()

    def _statistic(self, name: str) -> int | None:
        """An allocator statistic both ``torch.cuda`` and ``torch.accelerator`` name ``name``
        (None on the CPU, or where a backend does not keep it)."""
        if self.kind == "cuda":
            return int(getattr(torch.cuda, name)(self._index()))
        if self.kind == "accelerator":
            return _or_none(lambda: int(getattr(torch.accelerator, name)(self._index())))
        return None

    def allocated(self) -> int | None:
        """Bytes this process's tensors hold on the device (None on the CPU)."""
        return self._statistic("memory_allocated")

    def reserved(self) -> int | None:
        """Bytes the allocator holds on the device, in use or cached (None on the CPU)."""
        return self._statistic("memory_reserved")

    def peak(self) -> int | None:
        """The most bytes allocated since the last :meth:`reset_peak` (None where not counted)."""
        return self._statistic("max_memory_allocated")

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self._index())
        elif self.kind == "accelerator":
            with contextlib.suppress(Exception):
                torch.accelerator.reset_peak_memory_stats(self._index())

    def free_and_total(self) -> tuple[int, int] | None:
        """(free, total) bytes as the driver or backend reports them; the host's for the CPU."""
        if self.kind == "cuda":
            free, total = torch.cuda.mem_get_info(self._index())
            return int(free), int(total)
        if self.kind == "accelerator":
            got = _or_none(lambda: torch.accelerator.get_memory_info(self._index()))
            if got is not None:
                return int(got[0]), int(got[1])
            if self.device.type == "mps" and hasattr(torch, "mps"):
                total = psutil.virtual_memory().total
                return max(total - int(torch.mps.driver_allocated_memory()), 0), total
            return None
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def process_bytes(self) -> tuple[str, int]:
        """What this process holds, for the log: ("allocated", bytes) on a device, ("rss",
        bytes) on the CPU, where the resident set is the only honest figure."""
        allocated = self.allocated()
        if allocated is not None:
            return "allocated", allocated
        return "rss", int(psutil.Process().memory_info().rss)

    # ---- what can be done ------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self._index())
        elif self.kind == "accelerator":
            with contextlib.suppress(Exception):
                torch.accelerator.synchronize(self._index())

    def empty_cache(self) -> None:
        """Return the allocator's cached blocks to the driver (nothing to do on the CPU)."""
        if self.kind == "cuda":
            torch.cuda.empty_cache()
        elif self.kind == "accelerator":
            with contextlib.suppress(Exception):
                torch.accelerator.empty_cache()


def _or_none(read):  # noqa: ANN001, ANN202 - a backend may lack a statistic: "unknown", not a crash
    try:
        return read()
    except Exception:
        return None


def memory_of(device: torch.device | str) -> DeviceMemory:
    """The memory reader for ``device``: CUDA's own API, the generic accelerator API for any
    other accelerator torch has, the host's figures for the CPU (or an accelerator not present)."""
    device = torch.device(device)
    if device.type == "cuda":
        return DeviceMemory(device, "cuda" if torch.cuda.is_available() else "host")
    if device.type == "cpu" or device.type == "meta":
        return DeviceMemory(device, "host")
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None
    if current is not None and current.type == device.type:
        return DeviceMemory(device, "accelerator")
    return DeviceMemory(device, "host")
