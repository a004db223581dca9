"""Memory figures for the log: allocated, reserved, free and the budget, in GiB."""

from __future__ import annotations

import bisect
import platform
from pathlib import Path, PurePosixPath

import psutil
import torch

from autofit import _diffusers
from autofit.facts.devices import memory_of
from autofit.facts.footprint import pinned_size
from autofit.units import GIB


def device_budget_bytes(device: torch.device, max_vram: int | None = None) -> int | None:
    """The device memory this process may use: the total, lowered by a per-process fraction
    (``torch.cuda.set_per_process_memory_fraction``, which NVML and ``mem_get_info`` ignore) and by
    an explicit ``max_vram``."""
    budget: int | None = None
    mem = memory_of(device)
    if mem.kind == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = 1.0
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            try:
                fraction = float(getter(device))
            except Exception:  # older drivers/builds: fall back to the whole card
                fraction = 1.0
        budget = int(total * fraction)
    elif mem.kind == "accelerator":
        got = mem.free_and_total()
        budget = got[1] if got is not None else None
    elif device.type == "cpu":
        budget = psutil.virtual_memory().total
    if max_vram is not None:
        budget = max_vram if budget is None else min(budget, max_vram)
    return budget


def snapshot(device: torch.device, max_vram: int | None = None) -> dict[str, float | None]:
    """Flat, rounded memory fields for a log event: the device allocator's figures, or on the CPU
    (where the device is the host) the process's resident set as ``rss_gib``."""
    mem = memory_of(device)
    budget = device_budget_bytes(device, max_vram)
    got = mem.free_and_total()
    free = got[0] if got is not None else None
    allocated, reserved = mem.allocated(), mem.reserved()

    def gib(v: int | None) -> float | None:
        return None if v is None else round(v / GIB, 3)

    if allocated is None:
        return {"rss_gib": gib(mem.process_bytes()[1]), "free_gib": gib(free), "budget_gib": gib(budget)}
    if free is not None and budget is not None:
        free = min(free, max(budget - (reserved or allocated), 0))
    return {
        "allocated_gib": gib(allocated),
        "reserved_gib": gib(reserved),
        "free_gib": gib(free),
        "budget_gib": gib(budget),
    }


_NO_LIMIT = 1 << 60  # memory.max "max", v1's 2**63 - page: no limit


def _read_int(path: object) -> int | None:
    """The integer in a cgroup file, or None (missing, unreadable, "max")."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_stat(path: object, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` found in a memory.stat file, 0 when none is."""
    found: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] in keys:
                    found[parts[0]] = int(parts[1])
    except (OSError, ValueError):
        return 0
    return next((found[k] for k in keys if k in found), 0)


def _cgroup_paths(proc_cgroup: str) -> dict[int, str]:
    """{version: this process's cgroup path} from /proc/self/cgroup: the v2 line "0::/path", and
    the v1 line whose controllers include "memory"."""
    paths: dict[int, str] = {}
    for line in proc_cgroup.splitlines():
        hier, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hier == "0" and controllers == "":
            paths.setdefault(2, path)
        elif "memory" in controllers.split(","):
            paths.setdefault(1, path)
    return paths


def _cgroup_levels(mount: object, path: str) -> list[tuple[object, str]]:
    """(directory, cgroup path) from the process's cgroup up to the mount's root. Where the nested
    directory is not there (a cgroup namespace shows the container's own cgroup as the root, or
    /proc/self/cgroup was unreadable), the root alone."""
    mount = Path(mount)
    rel = PurePosixPath("/", path or "/")
    levels = []
    if (mount / str(rel).lstrip("/")).is_dir():
        for p in (rel, *rel.parents):
            levels.append((mount / str(p).lstrip("/"), str(p)))
    if not levels or levels[-1][1] != "/":
        levels.append((mount, "/"))
    return levels


def cgroup_memory(*, _root: object = "/sys/fs/cgroup", _proc_cgroup: str | None = None) -> dict[str, int | str] | None:
    """The tightest cgroup memory limit on this process, or None where there is none: ``limit``,
    ``usage`` (bytes, page cache included), ``inactive_file`` (page cache the kernel reclaims before
    an OOM kill), ``available`` (limit - (usage - inactive_file), at least 0), ``path`` (the
    cgroup's path, "/" for the root or a namespaced container), ``version`` (1 or 2).

    Every level from the process's own cgroup (/proc/self/cgroup) up to the root is read, since a
    parent's limit applies to its children too; the level leaving the least available wins.
    ``_root`` and ``_proc_cgroup`` (the text of /proc/self/cgroup) are for tests."""
    root = Path(_root)
    if _proc_cgroup is None:
        try:
            _proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            _proc_cgroup = ""
    paths = _cgroup_paths(_proc_cgroup)
    # (version, mount, limit file, usage file, memory.stat keys for the inactive page cache)
    layouts = (
        (2, root, "memory.max", "memory.current", ("inactive_file",)),
        (1, root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file")),
    )
    best: dict[str, int | str] | None = None
    for version, mount, limit_file, usage_file, keys in layouts:
        for directory, path in _cgroup_levels(mount, paths.get(version, "/")):
            limit = _read_int(directory / limit_file)
            if limit is None or limit >= _NO_LIMIT:
                continue
            usage = _read_int(directory / usage_file)
            if usage is None:
                continue
            inactive = min(_read_stat(directory / "memory.stat", keys), usage)
            available = max(limit - (usage - inactive), 0)
            if best is None or available < best["available"]:
                best = dict(limit=limit, usage=usage, inactive_file=inactive, available=available, path=path,
                            version=version)
    return best


def host_available_bytes(*, _root: object = "/sys/fs/cgroup", _proc_cgroup: str | None = None) -> int:
    """Host RAM available to this process, honouring a cgroup (container, Slurm job, systemd slice)
    limit when one is set: the process's own cgroup and its parents, page cache the kernel would
    reclaim counted as available (see ``cgroup_memory``)."""
    available = psutil.virtual_memory().available
    cgroup = cgroup_memory(_root=_root, _proc_cgroup=_proc_cgroup)
    if cgroup is not None:
        available = min(available, cgroup["available"])
    return available


# Page-locked (pinned) host memory. NVIDIA's driver caps it at about half the RAM under Windows
# (WDDM) and WSL2, where pinning more fails or stalls (microsoft/WSL#8447; ComfyUI budgets 40%
# there). On Linux the only cap is the RAM itself: pinned pages cannot be swapped out, so the RAM
# available without swap (which is what host_available_bytes reports) is also what can be pinned.
PINNED_FRACTION_WINDOWS = 0.4


def pinned_ceiling(host_total: int, *, system: str | None = None, release: str | None = None) -> tuple[int, str]:
    """(bytes of host RAM that can be page-locked in all, why)."""
    system = platform.system() if system is None else system
    release = platform.release() if release is None else release
    if system == "Windows" or "microsoft" in release.lower():
        where = "Windows" if system == "Windows" else "WSL2"
        return int(PINNED_FRACTION_WINDOWS * host_total), f"{where}: the driver pins about half the RAM at most"
    return host_total, "no driver limit; pinned pages cannot be swapped"


def pinned_in_use() -> int:
    """Bytes torch's pinned (host) allocator holds, blocks in use and cached alike."""
    if not torch.cuda.is_available():
        return 0
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except Exception:  # older builds without host allocator statistics
        return 0


def pinned_room(room: int, held_pinned: int = 0) -> int:
    """What of ``room`` (host RAM) can be page-locked: the ceiling, less what torch's pinned
    allocator holds beyond ``held_pinned`` (a pipeline's own pinned copies, which a plan switch
    reuses or frees)."""
    ceiling, _ = pinned_ceiling(psutil.virtual_memory().total)
    return max(min(room, ceiling - max(pinned_in_use() - held_pinned, 0)), 0)


def release_pinned_cache() -> None:
    """Return the pinned blocks torch's host allocator caches to the OS. Without this, the pinned
    copies of a plan switched away from (group offload with streams, per-call buffers) stay
    page-locked for the life of the process, out of reach of anything but later pinned copies."""
    accelerator = getattr(torch, "accelerator", None)
    available = getattr(accelerator, "is_available", None)
    if not (available() if available is not None else torch.cuda.is_available()):
        return  # no accelerator, no pinned memory
    _diffusers.empty_host_cache()


def _file_backed_ranges() -> list[tuple[int, int]] | None:
    """Address ranges of this process mapped from files (sorted), or None where /proc is missing."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        path = parts[5].strip() if len(parts) == 6 else ""
        # Files only: device mappings (/dev/nvidiactl backs CUDA's pinned memory), memfd and
        # SysV segments are shared memory, not page cache the kernel can drop.
        if parts[4:5] != ["0"] and path.startswith("/") and not path.startswith(("/dev/", "/memfd:", "/SYSV")):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


def held_on_host(modules, extra=()) -> tuple[int, int]:
    """(bytes, pinned bytes) of the given modules' tensors (and ``extra`` tensors) that sit in
    host RAM a plan switch releases or reuses: pinned tensors (counted at their allocator size)
    and anonymous memory. Tensors memory-mapped from a checkpoint (diffusers loads safetensors in
    their stored dtype that way) do not count: their pages are page cache, which the RAM
    available already includes. Without /proc (not Linux) only pinned tensors count. Each
    storage counts once, whole (views of one fused tensor share it)."""
    ranges = _file_backed_ranges()
    starts = [lo for lo, _ in ranges or ()]
    seen: set[int] = set()
    total = pinned = 0

    def visit(t: torch.Tensor) -> None:
        nonlocal total, pinned
        if t.device.type != "cpu" or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # wrapper subclasses without storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in seen:
            return
        seen.add(key)
        try:
            is_pinned = t.is_pinned()
        except Exception:  # subclasses that do not implement it (torchao's quantized tensors)
            is_pinned = False
        if is_pinned:
            total += nbytes
            pinned += pinned_size(nbytes)
            return
        if ranges is None:
            return  # page cache and anonymous memory cannot be told apart here
        i = bisect.bisect_right(starts, key) - 1
        if i >= 0 and key < ranges[i][1]:
            return  # mapped from a file: page cache
        total += nbytes

    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            visit(t)
    for t in extra:
        visit(t)
    return total, pinned
