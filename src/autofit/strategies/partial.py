"""Partial residency (the ``resident_stream:N`` placement): keep what fits on the device, stream
only the rest, ahead of use.

Each large component is cut into units: the items of its ModuleLists (blocks), or the items of
a block's own lists when the block is larger than 1/``cost.UNITS`` of the component. The
denoiser keeps N% of its bytes resident (everything outside the units, plus units); the units
picked to stream are spread evenly, so resident compute separates the copies. Large text
encoders (``cost.streamed_whole``) stream all their units. A streamed unit's weights live in host
memory only, as views into a few large chunks (page-locked where the device is CUDA/XPU: one
allocation per chunk, no per-tensor rounding); resident weights keep no host copy.

When a streamed unit starts, its copies (made ahead on a side stream) are waited for and the
next ``depth`` units in execution order are sent for (for a denoiser, wrapping around to the
next step's first units); when it ends its device copies are dropped. The arithmetic is the same as with everything resident: only where the weights sit
changes. On the CPU the same hooks run with plain copies and no stream, so tests exercise them.

Hooks are diffusers' public ``ModelHook``/``HookRegistry``; this module's state lives on each
component as ``_autofit_resident_stream`` and :func:`remove` puts every weight back on the CPU in
ordinary pageable memory, hooks gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from autofit import _diffusers
from autofit.planning import cost
from autofit.facts.components import role_of
from autofit.facts.devices import memory_of
from autofit.events import emit
from autofit.facts.memory import release_pinned_cache
from autofit.strategies.quantize import quantized_level
from autofit.units import gib

HOOK = "autofit_resident_stream"
_ATTR = "_autofit_resident_stream"
CHUNK_BYTES = 1 << 30
ALIGN = 512  # views into a chunk start on this boundary (any dtype, DMA friendly)
Allocator = Callable[[int], torch.Tensor]  # bytes -> a 1-D uint8 host tensor of at least that size


def default_allocator(device: torch.device) -> tuple[Allocator, bool]:
    """(allocator, pinned): page-locked chunks where copies to ``device`` can be asynchronous."""
    if memory_of(device).can_pin:
        return (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True)), True
    return (lambda n: torch.empty(n, dtype=torch.uint8)), False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _plain(t: torch.Tensor) -> bool:
    # Quantized subclasses (bitsandbytes) keep state outside the tensor: they stay resident.
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _entries(module: torch.nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    for sub in module.modules():
        for table in _diffusers.tensor_tables(sub):
            for name, t in table.items():
                if t is not None:
                    yield table, name, t


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(_nbytes(t) for t in {id(t): t for _, _, t in _entries(module)}.values())


def _has_list(module: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) for m in module.modules())


def find_units(module: torch.nn.Module, cap: int) -> list[tuple[str, torch.nn.Module]]:
    """The blocks of ``module`` (items of its ModuleLists and Sequentials, however deep), a block
    larger than ``cap`` replaced by its own blocks where it has some; registration order."""
    out: list[tuple[str, torch.nn.Module]] = []

    def visit(m: torch.nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            q = f"{prefix}{name}"
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                for i, item in enumerate(child):
                    size = _module_bytes(item)
                    if size > cap and _has_list(item):
                        visit(item, f"{q}.{i}.")
                    elif size:
                        out.append((f"{q}.{i}", item))
            else:
                visit(child, f"{q}.")

    visit(module, "")
    return out


def spread(sizes: list[int], needed: int, avoid: set[int] = frozenset()) -> list[int]:
    """Indices of units to stream: the fewest, evenly spaced, whose bytes reach ``needed``."""
    pool = [i for i in range(len(sizes)) if i not in avoid]
    if needed <= 0 or not pool:
        return []
    for k in range(1, len(pool) + 1):
        picked = sorted({pool[int((j + 0.5) * len(pool) / k)] for j in range(k)})
        if sum(sizes[i] for i in picked) >= needed:
            return picked
    return pool


def pack(sizes: list[int], chunk: int = CHUNK_BYTES) -> tuple[list[int], list[tuple[int, int]]]:
    """Chunk sizes, and (chunk, offset) per tensor: first fit, largest first. A new chunk holds
    up to the largest power of two not above what is left (or one tensor larger than that), so a
    pinned allocator that rounds each block up to a power of two wastes little."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    left = sum(_aligned(s) for s in sizes)
    caps: list[int] = []
    used: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for i in order:
        need = _aligned(sizes[i])
        slot = next((c for c in range(len(caps)) if used[c] + need <= caps[c]), None)
        if slot is None:
            cap = min(chunk, 1 << (left.bit_length() - 1)) if left else need
            caps.append(max(cap, need))
            used.append(0)
            slot = len(caps) - 1
        where[i] = (slot, used[slot])
        used[slot] += need
        left -= need
    return used, where


@dataclass(eq=False)
class _Unit:
    name: str
    module: torch.nn.Module
    slots: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)  # (table, name, host view)
    copies: list[torch.Tensor] | None = None  # on the device while the unit runs
    pending: tuple[list[torch.Tensor], Any] | None = None  # prefetched copies and their event


def _hook_class() -> type:
    """diffusers' ModelHook, subclassed on first use (diffusers is imported lazily)."""
    from diffusers.hooks import ModelHook

    class UnitHook(ModelHook):
        def __init__(self, streamer: "Streamer", unit: _Unit):
            super().__init__()
            self.streamer, self.unit = streamer, unit

        def pre_forward(self, module, *args, **kwargs):
            self.streamer.enter(self.unit)
            return args, kwargs

        def post_forward(self, module, output):
            self.streamer.leave(self.unit)
            return output

    return UnitHook


class Streamer:
    """One component partly resident on ``device``: its streamed units, chunks and hooks."""

    def __init__(self, name: str, module: torch.nn.Module, device: torch.device, *, resident: float,
                 depth: int = cost.PREFETCH_DEPTH, wrap: bool = True, allocator: Allocator | None = None,
                 pinned: bool | None = None):
        self.name, self.module, self.device, self.depth = name, module, device, depth
        # wrap: the last unit sends for the first ones (a denoiser runs again next step); a text
        # encoder runs once a call, and copies held until the next call would crowd the denoiser.
        self.wrap = wrap
        if allocator is None:
            allocator, default_pinned = default_allocator(device)
            pinned = default_pinned if pinned is None else pinned
        self._alloc, self.pinned = allocator, bool(pinned)
        backend = getattr(torch, device.type, None)
        self._backend = backend if device.type in ("cuda", "xpu") and backend is not None else None
        self._side = self._backend.Stream(device) if self._backend is not None else None
        self.units: list[_Unit] = []
        self.chunks: list[torch.Tensor] = []
        self._order: list[_Unit] = []
        self._seen: list[_Unit] = []
        self._frozen = False
        self._on: set[_Unit] = set()
        self.resident_bytes = self.streamed_bytes = 0
        self._install(resident)

    # ---- placing ----------------------------------------------------------------------------
    def _install(self, resident: float) -> None:
        module = self.module
        total = _module_bytes(module)
        found = find_units(module, max(total // cost.UNITS, 1))
        owners: dict[int, set[int]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for i, (_, unit) in enumerate(found):
            for _, _, t in _entries(unit):
                owners.setdefault(id(t), set()).add(i)
                tensors[id(t)] = t
        in_units = {k for k, o in owners.items() if len(o) == 1}
        # A tensor also used outside its unit (tied weights) stays resident.
        outside = {id(t) for _, _, t in self._outside_entries(module, found)}
        own = {k for k in in_units if k not in outside and _plain(tensors[k])}
        sizes = [sum(_nbytes(tensors[k]) for k in {id(t) for _, _, t in _entries(u)} if k in own) for _, u in found]
        first = next(iter(module.parameters()), None)  # pipelines read a component's device from it
        avoid = {i for i, (_, u) in enumerate(found) if first is not None and any(t is first for _, _, t in _entries(u))}
        picked = spread(sizes, total - int(resident * total), avoid)
        streamed_ids: dict[int, torch.Tensor] = {}
        unit_entries: list[tuple[int, list[tuple[dict, str, torch.Tensor]]]] = []
        for i in picked:
            entries, seen = [], set()
            for table, name, t in _entries(found[i][1]):
                if id(t) in own and (id(table), name) not in seen:
                    seen.add((id(table), name))
                    entries.append((table, name, t))
                    streamed_ids[id(t)] = t
            unit_entries.append((i, entries))
        places: dict[int, list[tuple[dict, str]]] = {}
        for table, name, t in _entries(module):
            places.setdefault(id(t), []).append((table, name))

        def swap(t: torch.Tensor, new: torch.Tensor) -> None:
            for table, name in places[id(t)]:
                self._put(table, name, table[name], new)

        views = self._host_views(list(streamed_ids.values()), swap)
        for key, at in places.items():
            if key not in views:  # resident: to the device
                t = at[0][0][at[0][1]]
                swap(t, t.detach().to(self.device))
        for i, entries in unit_entries:
            unit = _Unit(found[i][0], found[i][1])
            unit.slots = [(table, name, views[id(t)]) for table, name, t in entries]
            self.units.append(unit)
        self._order = list(self.units)
        hook_class = _hook_class()
        from diffusers.hooks import HookRegistry

        for unit in self.units:
            HookRegistry.check_if_exists_or_initialize(unit.module).register_hook(hook_class(self, unit), HOOK)
        self.streamed_bytes = sum(_nbytes(v) for v in views.values())
        self.resident_bytes = total - self.streamed_bytes

    @staticmethod
    def _outside_entries(module: torch.nn.Module, found: list[tuple[str, torch.nn.Module]]):
        """Entries of modules outside every unit (a tensor used there too must stay resident)."""
        inside = {id(m) for _, u in found for m in u.modules()}
        for sub in module.modules():
            if id(sub) in inside:
                continue
            for table in _diffusers.tensor_tables(sub):
                for name, t in table.items():
                    if t is not None:
                        yield table, name, t

    def _host_views(self, tensors: list[torch.Tensor], swap: Callable[[torch.Tensor, torch.Tensor], None]
                    ) -> dict[int, torch.Tensor]:
        """Copies of ``tensors`` as views into a few large host chunks, each swapped in (``swap``)
        as soon as it is made, chunk by chunk: the host holds the weights plus one chunk at most,
        not the weights twice."""
        sizes = [_nbytes(t) for t in tensors]
        used, where = pack(sizes)
        self.chunks = []
        views = {}
        for i in sorted(range(len(tensors)), key=lambda i: where[i]):
            (c, off), n, t = where[i], sizes[i], tensors[i]
            if c == len(self.chunks):
                self.chunks.append(self._chunk(used[c]))
            view = self.chunks[c][off:off + n].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
            views[id(t)] = view
            swap(t, view)
        return views

    def _chunk(self, n: int) -> torch.Tensor:
        try:
            return self._alloc(n)
        except RuntimeError as exc:  # pinned memory exhausted: pageable still works, slower
            if not self.pinned:
                raise
            emit("pin_failed", level="warning", stage="load", action="pageable", component=self.name,
                 error=str(exc)[:120])
            self._alloc, self.pinned = (lambda m: torch.empty(m, dtype=torch.uint8)), False
            return self._alloc(n)

    @staticmethod
    def _put(table: dict, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
        if isinstance(old, torch.nn.Parameter):
            old.data = new  # the same Parameter object: ties and optimizers' references hold
        else:
            table[name] = new

    # ---- running ----------------------------------------------------------------------------
    def enter(self, unit: _Unit) -> None:
        self._observe(unit)
        for stale in [u for u in self._on if u is not unit]:  # left on by a forward that raised
            self.leave(stale)
        self._onload(unit)
        self._prefetch_after(unit)

    def leave(self, unit: _Unit) -> None:
        for (table, name, host), _ in zip(unit.slots, unit.copies or ()):
            self._put(table, name, table[name], host)
        unit.copies = None
        self._on.discard(unit)

    def _observe(self, unit: _Unit) -> None:
        """Learn the execution order on the first pass (registration order until then)."""
        if self._frozen:
            return
        if unit in self._seen:
            self._frozen = True
        else:
            self._seen.append(unit)
            self._frozen = len(self._seen) == len(self.units)
        if self._frozen:
            self._order = self._seen + [u for u in self.units if u not in self._seen]

    def _copy(self, unit: _Unit) -> list[torch.Tensor]:
        return [torch.empty(host.shape, dtype=host.dtype, device=self.device).copy_(host, non_blocking=self.pinned)
                for _, _, host in unit.slots]

    def _onload(self, unit: _Unit) -> None:
        if unit in self._on:
            return
        if unit.pending is not None:
            copies, event = unit.pending
            unit.pending = None
            if event is not None:
                stream = self._backend.current_stream(self.device)
                stream.wait_event(event)
                for c in copies:
                    c.record_stream(stream)  # freed after the compute stream is done with it
        else:
            copies = self._copy(unit)
        for (table, name, host), c in zip(unit.slots, copies):
            self._put(table, name, table[name], c)
        unit.copies = copies
        self._on.add(unit)

    def _prefetch_after(self, unit: _Unit) -> None:
        order = self._order
        if not order or self.depth <= 0:
            return
        at = order.index(unit)
        ahead = range(1, min(self.depth, len(order) - 1) + 1)
        window = [order[(at + k) % len(order)] for k in ahead if self.wrap or at + k < len(order)]
        for u in order:
            if u.pending is not None and u not in window:
                u.pending = None  # the order changed: not needed next
        for u in window:
            if u.pending is None and u not in self._on:
                if self._side is None:
                    u.pending = (self._copy(u), None)
                else:
                    with self._backend.stream(self._side):
                        copies = self._copy(u)
                        u.pending = (copies, self._side.record_event())

    # ---- leaving ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Hooks gone, streamed weights back in ordinary pageable memory, chunks freed. Resident
        weights stay where they are (the caller moves whole components next)."""
        if self._side is not None:
            self._side.synchronize()
        for unit in self.units:
            registry = getattr(unit.module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(HOOK, recurse=False)
            if unit in self._on:
                self.leave(unit)
            unit.pending = None
            for table, name, host in unit.slots:
                current = table[name]
                if current.data_ptr() != host.data_ptr():
                    continue  # replaced since (a plan switch cast or moved it): leave it
                copy = torch.empty(host.shape, dtype=host.dtype)
                copy.copy_(host)
                self._put(table, name, current, copy)
        self.units, self.chunks, self._order, self._seen = [], [], [], []


def streamer_of(module: torch.nn.Module) -> Streamer | None:
    return module.__dict__.get(_ATTR)


def apply(components: dict[str, torch.nn.Module], device: torch.device, percent: int, *,
          allocator: Allocator | None = None, pinned: bool | None = None) -> dict[str, Streamer]:
    """Make the denoisers ``percent``% resident and stream the large text encoders whole, their
    resident parts moved to ``device``; other components are left to the caller. Components are
    expected on the CPU (torn down)."""
    out = {}
    for name, module in components.items():
        if streamer_of(module) is not None or quantized_level(module):
            continue  # bitsandbytes components stay whole on the device (cost.kept_on_device)
        role = role_of(name, module)
        if role == "denoise":
            share = percent / 100
        elif cost.streamed_whole(role, type(module).__name__, _module_bytes(module)):
            share = 0.0
        else:
            continue
        s = Streamer(name, module, device, resident=share, wrap=role == "denoise", allocator=allocator, pinned=pinned)
        module.__dict__[_ATTR] = s
        out[name] = s
        emit("resident_stream", stage="load", action="place", component=name, percent=round(share * 100),
             resident_gib=gib(s.resident_bytes, 3), streamed_gib=gib(s.streamed_bytes, 3),
             units=len(s.units), chunks=len(s.chunks), pinned=s.pinned)
    return out


def remove(components: dict[str, torch.nn.Module]) -> bool:
    """Undo :func:`apply` on every component that has it; True when one had."""
    found = pinned = False
    for module in components.values():
        s = streamer_of(module)
        if s is not None:
            pinned |= s.pinned
            s.remove()
            del module.__dict__[_ATTR]
            found = True
    if pinned:  # the chunks go back to the OS, not to torch's pinned cache
        release_pinned_cache()
    return found
