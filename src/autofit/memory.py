"""Memory figures for the log: allocated, reserved, free and the budget, in GiB."""

from __future__ import annotations

import psutil
import torch

GIB = 1024**3


def device_budget_bytes(device: torch.device, max_vram: int | None = None) -> int | None:
    """The device memory this process may use: the total, lowered by a per-process fraction
    (``torch.cuda.set_per_process_memory_fraction``, which NVML and ``mem_get_info`` ignore) and by
    an explicit ``max_vram``."""
    budget: int | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = 1.0
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            try:
                fraction = float(getter(device))
            except Exception:  # older drivers/builds: fall back to the whole card
                fraction = 1.0
        budget = int(total * fraction)
    elif device.type == "cpu":
        budget = psutil.virtual_memory().total
    if max_vram is not None:
        budget = max_vram if budget is None else min(budget, max_vram)
    return budget


def snapshot(device: torch.device, max_vram: int | None = None) -> dict[str, float | None]:
    """Flat, rounded memory fields for a log event."""
    if device.type == "cuda" and torch.cuda.is_available():
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        driver_free, _ = torch.cuda.mem_get_info(device)
        budget = device_budget_bytes(device, max_vram)
        free = driver_free if budget is None else min(driver_free, max(budget - reserved, 0))
    else:
        rss = psutil.Process().memory_info().rss
        allocated = reserved = rss
        free = psutil.virtual_memory().available
        budget = device_budget_bytes(device, max_vram)

    def gib(v: int | None) -> float | None:
        return None if v is None else round(v / GIB, 3)

    return {
        "allocated_gib": gib(allocated),
        "reserved_gib": gib(reserved),
        "free_gib": gib(free),
        "budget_gib": gib(budget),
    }


def host_available_bytes() -> int:
    """Host RAM available to this process, honouring a cgroup (container) limit when one is set."""
    available = psutil.virtual_memory().available
    for path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            limit = int(raw)
            with open(usage_path) as f:
                used = int(f.read().strip())
            if limit < (1 << 60):
                available = min(available, max(limit - used, 0))
        except (OSError, ValueError):
            continue
    return available
