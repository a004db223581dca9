"""What the machine offers: device memory (total, free, used by other processes, this process's
budget), host RAM (cgroup-aware), and host-to-device bandwidths."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import psutil
import torch

from autofit.facts.devices import memory_of
from autofit.facts.memory import device_budget_bytes, host_available_bytes, pinned_ceiling, pinned_room

# Measured on an H200 (shared/reference/gpu-facts.md): 1 GiB host-to-device copies.
DEFAULT_PINNED_GBPS = 55.5
DEFAULT_PAGEABLE_GBPS = 8.9


@dataclass(frozen=True, slots=True)
class MachineReading:
    device_type: str
    device_name: str
    total_bytes: int
    free_bytes: int
    other_processes_bytes: int | None
    budget_bytes: int
    host_total_bytes: int
    host_available_bytes: int
    configured_budget_bytes: int = 0  # total, fraction and max_vram only: stable, for cache keys
    pinned_gbps: float = DEFAULT_PINNED_GBPS
    pageable_gbps: float = DEFAULT_PAGEABLE_GBPS
    source: str = "torch"
    # Page-locked host RAM: the most that can be pinned in all, why, and what is left of it now
    # (also within host_available_bytes). Pinned copies make offloading 6x faster (gpu-facts).
    pinned_limit_bytes: int = 0
    pinned_limit_reason: str = ""
    pinned_available_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _uuid_text(raw) -> str | None:
    """A device UUID as text ("GPU-...", "MIG-..." or torch's bare hex), or None when unknown."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = text.strip().strip("\0")
    if not text.replace("-", "").strip("0"):  # empty or all zeros: the build does not fill it in
        return None
    return text


def _pci_bus_id(props) -> str | None:
    """torch's device properties as NVML's PCI bus id ("00000000:3b:00.0"), or None without them."""
    domain, bus, dev = (getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    if not all(isinstance(v, int) for v in (domain, bus, dev)) or not (domain or bus or dev):
        return None
    return f"{domain:08x}:{bus:02x}:{dev:02x}.0"


def _nvml_lookup(fn, key: str):
    """Call an NVML lookup with ``key`` as str, then as bytes (older pynvml takes only bytes)."""
    try:
        return fn(key)
    except Exception:
        return fn(key.encode())


def _mig_enabled(nvml, handle) -> bool:
    get = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if get is None:
        return False
    try:
        current = get(handle)[0]
    except Exception:  # NVMLError_NotSupported: a GPU without MIG
        return False
    return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _nvml_handle(nvml, uuid: str | None, pci_bus_id: str | None):
    """NVML's handle for torch's device, found by UUID, else PCI bus id, never by index: NVML ignores
    CUDA_VISIBLE_DEVICES, so its index 0 is another GPU than torch's cuda:0 when that is set. None for
    a MIG slice (NVML's memory figures are the whole GPU's) or when neither finds it."""
    if "MIG-" in os.environ.get("CUDA_VISIBLE_DEVICES", "") or (uuid and uuid.startswith("MIG-")):
        return None
    handle = None
    if uuid:
        if not uuid.startswith("GPU-"):  # torch prints the bare hex; NVML spells it GPU-... or MIG-...
            try:
                _nvml_lookup(nvml.nvmlDeviceGetHandleByUUID, "MIG-" + uuid)
                return None
            except Exception:
                uuid = "GPU-" + uuid
        try:
            handle = _nvml_lookup(nvml.nvmlDeviceGetHandleByUUID, uuid)
        except Exception:
            handle = None
    if handle is None and pci_bus_id:
        try:
            handle = _nvml_lookup(nvml.nvmlDeviceGetHandleByPciBusId, pci_bus_id)
        except Exception:
            handle = None
    if handle is None or _mig_enabled(nvml, handle):  # a MIG slice shares its parent's PCI bus id
        return None
    return handle


def _nvml_read(nvml, uuid: str | None, pci_bus_id: str | None) -> tuple[int, int, int | None, str] | None:
    """(total, free, used by other processes, name) of the device NVML knows by ``uuid`` or
    ``pci_bus_id``; None when it cannot say (see _nvml_handle)."""
    try:
        nvml.nvmlInit()
        try:
            handle = _nvml_handle(nvml, uuid, pci_bus_id)
            if handle is None:
                return None
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            others = 0
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid != os.getpid() and proc.usedGpuMemory:
                    others += int(proc.usedGpuMemory)
            return int(mem.total), int(mem.free), others, name
        finally:
            nvml.nvmlShutdown()
    except Exception:  # NVML present but unusable (containers without the driver lib...)
        return None


def _nvml(index: int) -> tuple[int, int, int | None, str] | None:
    """(total, free, used by other processes, name) of torch's cuda:index from NVML, or None
    without it (read_machine then uses torch's mem_get_info, which honours CUDA_VISIBLE_DEVICES)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        props = torch.cuda.get_device_properties(index)
        uuid, bus_id = _uuid_text(getattr(props, "uuid", None)), _pci_bus_id(props)
    except Exception:
        return None
    return _nvml_read(pynvml, uuid, bus_id)


def read_machine(
    device: torch.device | str,
    *,
    max_vram: int | None = None,
    max_ram: int | None = None,
) -> MachineReading:
    """Read the machine. The budget honours ``set_per_process_memory_fraction`` (which NVML and
    ``mem_get_info`` ignore), an explicit ``max_vram``, and memory other processes hold."""
    device = torch.device(device)
    host_total = psutil.virtual_memory().total
    host_avail = host_available_bytes()
    if max_ram is not None:
        host_avail = min(host_avail, max_ram)
    ceiling, why = pinned_ceiling(host_total)
    pinned = {"pinned_limit_bytes": ceiling, "pinned_limit_reason": why, "pinned_available_bytes": pinned_room(host_avail)}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index or 0
        nv = _nvml(index)
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        others = None
        source = "torch"
        if nv is not None:
            total, free, others, name = nv[0], nv[1], nv[2], nv[3]
            source = "nvml"
        configured = device_budget_bytes(torch.device("cuda", index), max_vram) or total
        # Memory held by other processes is not ours to use, whatever the fraction says.
        held_here = torch.cuda.memory_reserved(index)
        budget = min(configured, free + held_here)
        return MachineReading("cuda", name, total, free, others, budget, host_total, host_avail, configured,
                        source=source, **pinned)
    if device.type == "cpu":
        budget = min(host_avail, max_vram) if max_vram is not None else host_avail
        configured = min(host_total, max_vram) if max_vram is not None else host_total
        return MachineReading("cpu", "cpu", host_total, host_avail, None, budget, host_total, host_avail, configured,
                        pinned_gbps=20.0, pageable_gbps=20.0, source="psutil", **pinned)
    # Other accelerators: what torch exposes (autofit.facts.devices). As on CUDA, what this
    # process's allocator holds is its own to use: free alone would shrink the budget by the
    # weights already placed, and a second workload would be planned for less than there is.
    memory = memory_of(device)
    got = memory.free_and_total()
    free, total = got if got is not None else (0, 0)
    configured = min(total, max_vram) if max_vram is not None else total
    budget = min(configured, free + (memory.reserved() or 0)) if got is not None else 0
    return MachineReading(device.type, device.type, total, free, None, budget, host_total, host_avail, configured, **pinned)
