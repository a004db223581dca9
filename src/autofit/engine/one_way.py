"""The ledger of one-way storage rungs (fp8, int8, nf4): which component each changed, how to
undo it, which are not yet seen to work, and which storage rungs the planner must not pick."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from autofit._diffusers import module_components
from autofit.errors import CheckpointChanged
from autofit.events import emit
from autofit.facts.footprint import Footprint
from autofit.facts.memory import host_available_bytes, snapshot
from autofit.plan import Plan, storing
from autofit.strategies import apply_fp8
from autofit.strategies import quantize
from autofit.strategies.casting import held_bytes, restore_original
from autofit.units import GIB



@dataclass(frozen=True, slots=True)
class OneWay:
    """A one-way rung applied to a component, and how to undo it (None: no copy could be kept)."""

    rung: str
    undo: Callable[[], None] | None


class OneWayLedger:
    """component -> the storage rung applied to it; components changed but not yet seen to work."""

    def __init__(self, pipe: Any, footprint: Footprint, device: torch.device, *, max_vram: int | None,
                 max_ram: int | None):
        self._pipe, self._footprint, self._device = pipe, footprint, device
        self._max_vram, self._max_ram = max_vram, max_ram
        self._entries: dict[str, OneWay] = {}
        self._unvalidated: set[str] = set()

    @property
    def entries(self) -> dict[str, OneWay]:
        """component -> the one-way rung applied to it (a copy)."""
        return dict(self._entries)

    @property
    def unvalidated(self) -> frozenset[str]:
        """Components changed one way and not yet seen to produce an output."""
        return frozenset(self._unvalidated)

    def locked(self) -> str | None:
        """The storage rung applied to some component without a way back, if any."""
        return next((w.rung for w in self._entries.values() if w.undo is None), None)

    def targets(self, plan: Plan, broken: dict[str, set[str]]) -> set[str]:
        """Components the plan's storage rung changes (minus those it broke before)."""
        level = plan.storage
        if level is None:
            return set()
        blocked = broken.get(level, set())
        flag = storing(level).targets  # the ComponentFootprint flag of the components it applies to
        return {c.name for c in self._footprint.components.values() if getattr(c, flag) and c.name not in blocked}

    def changes(self, target: Plan, broken: dict[str, set[str]]) -> tuple[list[str], set[str]]:
        """(components whose rung ``target`` undoes, components ``target``'s rung must change)."""
        undo = [n for n, w in self._entries.items() if w.rung != target.storage and w.undo is not None]
        kept = {n for n in self._entries if n not in undo}
        return undo, self.targets(target, broken) - kept

    def can_roll_back(self, name: str) -> bool:
        return name in self._unvalidated and name in self._entries and self._entries[name].undo is not None

    def validated(self, name: str) -> None:
        """``name`` produced an output under its one-way rung."""
        self._unvalidated.discard(name)

    def undo(self, name: str) -> None:
        """Undo the one-way rung on ``name``; if its checkpoint changed on disk, it stays applied for good."""
        way = self._entries[name]
        assert way.undo is not None
        try:
            way.undo()
        except CheckpointChanged:
            self._entries[name] = OneWay(way.rung, None)
            raise
        del self._entries[name]
        self._unvalidated.discard(name)

    def apply(self, level: str | None, names: set[str]) -> None:
        """Apply a one-way storage rung to torn-down components (their weights on the CPU)."""
        t0 = time.perf_counter()
        skip = frozenset(n for n in self._footprint.components if n not in names)
        if not storing(level).bitsandbytes:  # a cast (fp8): bitsandbytes rungs quantize below
            spare = host_available_bytes() if self._max_ram is None else min(host_available_bytes(), self._max_ram)
            cast, originals = apply_fp8(self._pipe, self._footprint, skip=skip, host_available=spare)
            comps = module_components(self._pipe)
            for n in cast:
                orig = originals.get(n)
                self._entries[n] = OneWay("fp8", (lambda m=comps[n], o=orig: restore_original(m, o)) if orig else None)
            self._unvalidated |= set(cast)
            emit("fp8_cast", stage="load", action="fp8", components=",".join(cast), reversible=",".join(originals),
                 undo_copy_gib=round(sum(held_bytes(o) for o in originals.values()) / GIB, 3))
            return
        undos = quantize.apply_quantization(self._pipe, self._footprint, level, self._device, skip=skip)
        for n, u in undos.items():
            self._entries[n] = OneWay(level, u)
        self._unvalidated |= set(undos)
        emit("quantized", stage="load", action=level, components=",".join(undos), reversible=",".join(undos),
             undo_copy_gib=round(sum(u.held_bytes for u in undos.values()) / GIB, 3),
             seconds=round(time.perf_counter() - t0, 3), **snapshot(self._device, self._max_vram))
