"""Where the weights are: the plan in force, what is placed, the one-way ledger, the host copies,
the rungs found broken. :class:`Placement` alone changes them (read-only properties, methods).

``switch(target)`` places the weights as ``target`` says, then makes it the plan in force: a
transaction. A failure that is not an OOM puts the previous plan back (or, if even that fails,
tears down) and passes through: the plan in force stays the previous one. An OOM while placing
leaves the previous plan in force with nothing placed (the next switch starts from a tear-down)
and is returned, so that recovery escalates from the plan that was being placed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any, ContextManager

import torch

from autofit import _diffusers
from autofit._diffusers import module_components
from autofit.events import emit
from autofit.facts.components import is_vae
from autofit.facts.devices import memory_of
from autofit.facts.footprint import Footprint, measure
from autofit.facts.memory import release_pinned_cache
from autofit.engine.moves import Modules, Moves
from autofit.engine.one_way import OneWayLedger
from autofit.engine.oom import OOMInfo, classify, free_memory
from autofit.plan import Plan
from autofit.planning.context import Workload
from autofit import strategies
from autofit.strategies import UserVae, configure_vae, place, quantize
from autofit.strategies.placement import unpin
from autofit.strategies.residency import HostShadows
from autofit.units import gib


def holds_hooks(pipe: object) -> bool:
    """Offload hooks (accelerate's or diffusers' group offloading) on any component."""
    return any(
        _diffusers.has_accelerate_hooks(m) or _diffusers.group_offload_config(m) is not None
        for m in module_components(pipe).values()
    )


class Placement:
    """The weights of one pipeline and the plan they are placed for.

    ``suspend()`` takes the stage wrappers off while rungs are applied (rungs go *under* them)."""

    def __init__(self, pipe: Any, device: torch.device, *, applied: Plan | None, max_vram: int | None,
                 max_ram: int | None, suspend: Callable[[], ContextManager[None]]):
        self._pipe, self._device, self._suspend = pipe, device, suspend
        # The plan in force starts as what the pipeline is: its adopted offloading, else plain.
        self._plan = applied if applied is not None else Plan()
        self._applied = applied  # the plan the weights are placed for; None: to place
        self._broken: dict[str, set[str]] = {}  # rung -> components it broke (plan cache too)
        self._footprint = measure(pipe)
        self._ledger = OneWayLedger(pipe, self._footprint, device, max_vram=max_vram, max_ram=max_ram)
        self._shadows = HostShadows(device)
        self._comps: Modules = module_components(pipe)
        for name, module in self._comps.items():
            if quantize.holds_int8(module):
                fixed = quantize.adopt_int8(module)
                if fixed:
                    emit("int8_state_follows_weight", stage="load", action="adopt", component=name, layers=fixed)
        self._vaes = {n: m for n, m in self._comps.items() if is_vae(m)}
        self._vae_original = {n: UserVae(m) for n, m in self._vaes.items()}  # follows the user's later changes
        self._moves = Moves(pipe, device, self._shadows, self._vae_original)

    # ---- what it holds (read-only) ---------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan in force."""
        return self._plan

    @property
    def applied(self) -> Plan | None:
        """The plan the weights are placed for; None: the next call places them first."""
        return self._applied

    @property
    def ledger(self) -> OneWayLedger:
        return self._ledger

    @property
    def shadows(self) -> HostShadows:
        return self._shadows

    @property
    def footprint(self) -> Footprint:
        return self._footprint

    @property
    def components(self) -> Mapping[str, torch.nn.Module]:
        return self._comps

    @property
    def vaes(self) -> Mapping[str, torch.nn.Module]:
        return self._vaes

    @property
    def broken(self) -> dict[str, set[str]]:
        """rung -> the components it broke (a copy)."""
        return {k: set(v) for k, v in self._broken.items()}

    # ---- changes ---------------------------------------------------------------------------
    def refresh_components(self) -> None:
        """Once per call: ``pipe.components`` is not free, and the user may have swapped one."""
        self._comps = module_components(self._pipe)

    def mark_broken(self, rung: str, components: Any) -> None:
        """``rung`` broke ``components`` (a roll back, or the plan cache, says so)."""
        self._broken.setdefault(rung, set()).update(components)

    def forget(self) -> None:
        """Nothing counts as placed: the next call places the plan in force again."""
        self._applied = None

    def check_intact(self) -> None:
        """Forget the placement if it was taken down behind our back (a pipeline sharing the components)."""
        if self._applied is not None and not _diffusers.placement_intact(self._pipe, self._applied.placement):
            self._applied = None

    def place(self, target: Plan, shape: Workload | None) -> OOMInfo | None:
        """Make ``target`` placed and in force: re-assert where the weights belong if it already
        is, else switch. Returns the OOM if that ran out."""
        if self._applied == target and self._plan == target:
            try:
                self._moves.enforce_residency(target, self._vaes)
            except BaseException as exc:
                failure = classify(exc)
                if failure is None:
                    raise
                return failure
            return None
        return self.switch(target, shape)

    def switch(self, target: Plan, shape: Workload | None = None) -> OOMInfo | None:
        """Make ``target`` the plan in force; returns the OOM if placing its weights ran out."""
        previous, previous_applied = self._plan, self._applied
        failure: OOMInfo | None = None
        with self._suspend():
            self._applied = None  # until the weights are where ``target`` says
            try:
                self._apply(previous_applied, target, shape)
            except BaseException as exc:
                failure = classify(exc)
                if failure is None:
                    self._restore(previous, target, exc)
                    raise
        if failure is not None:
            return failure  # outside ``except``: the failed attempt's frames are gone
        self._plan = self._applied = target
        return None

    def adopt(self, plan: Plan) -> None:
        """The weights already are where ``plan`` says (the user placed them): it is in force, with no move."""
        self._plan = self._applied = plan

    def tear_down(self) -> None:
        """No hooks, weights on the CPU, nothing placed: the next switch places the plan in force."""
        with self._suspend():
            try:
                strategies.tear_down(self._pipe)
            finally:
                self._applied = None

    def take_down_for(self, enable: Callable[[], Any]) -> Any:
        """The user enables offloading: autofit's placement comes down first (so the two do not
        fight), then ``enable()`` runs. Returns its result."""
        self.tear_down()
        self._shadows.drop()
        return enable()

    def reshape(self, change: Callable[[], Any]) -> Any:
        """Run ``change`` (a LoRA, IP-Adapter or textual-inversion loader, fusing) on plain
        modules: a placement that holds offload hooks or streamed copies is taken down first, so
        the loader sees plain modules (diffusers' loaders undo and redo only the offloading they
        know), and placed again at the next call. Weights plainly on the device stay there: the
        loaders create the new ones next to them. In components stored in fp8, the new layers are
        made in the compute dtype (peft would make them fp8). The footprint is measured again."""
        applied = self._applied
        plain = applied is not None and not applied.offloads and not self._shadows.tensors() \
            and not holds_hooks(self._pipe)
        if applied is not None and not plain:
            self.tear_down()
            self._shadows.drop()
        try:
            with ExitStack() as stack:
                for module in module_components(self._pipe).values():
                    stack.enter_context(_diffusers.new_layers_in_compute_dtype(module))
                return change()
        finally:
            # The weights changed (a LoRA's layers added, or removed): predictions and the
            # plan cache key follow them, so the next call plans for the pipeline as it is.
            self._footprint = measure(self._pipe)

    def undo_one_way(self, name: str) -> tuple[str, Plan]:
        """Restore ``name``'s original weights (a one-way rung broke it), torn down first: if the
        undo fails, the next call places it again. Returns the rung and the plan without it
        for ``name`` (the plan in force if another component still holds the rung)."""
        self.tear_down()
        rung = self._ledger.entries[name].rung
        self._ledger.undo(name)
        self.mark_broken(rung, {name})
        still = any(w.rung == rung for w in self._ledger.entries.values())
        return rung, self._plan if still else Plan(self._plan.placement, self._plan.extras - {rung})

    def suspended(self) -> ContextManager[None]:
        return self._suspend()

    # ---- the moves around each stage -----------------------------------------------------------
    def before(self, shape: Workload | None, name: str, stage: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], Workload | None]:
        return self._moves.before(self._plan, self._comps, shape, name, stage, args, kwargs)

    def after(self, name: str, stage: str) -> None:
        if self._ledger.unvalidated:
            self._ledger.validated(name)  # its one-way rung has now produced an output
        self._moves.after(self._plan, self._comps, name, stage)

    # ---- the transaction's parts ---------------------------------------------------------------
    def _restore(self, previous: Plan, target: Plan, exc: BaseException) -> None:
        """Not an OOM: put back the plan that was in force before the error passes through."""
        try:
            self._apply(None, previous, None)
            self._applied = previous
        except BaseException as again:  # leave it consistent at least
            emit("rollback_failed", level="error", stage="load", action="tear_down", error=str(again)[:200])
            strategies.tear_down(self._pipe)
        emit("rolled_back", level="warning", stage="load", action=",".join(target.names),
             error=f"{type(exc).__name__}: {str(exc)[:200]}", plan=",".join(previous.names))

    def _apply(self, current: Plan | None, target: Plan, shape: Workload | None) -> None:
        """Move the weights from where ``current`` put them (None: unknown) to where ``target`` says."""
        pipe, device = self._pipe, self._device
        undo, todo = self._ledger.changes(target, self._broken)
        storage_change = bool(undo or todo)
        same_placement = current is not None and current.placement == target.placement
        if same_placement and not storage_change:
            if not target.offloads:
                place(pipe, target, device)
            elif current is not None and current.extras != target.extras:
                self._moves.enforce_residency(target, self._vaes)
        elif not target.offloads and not holds_hooks(pipe) and not storage_change:
            # From a plain pipeline: no tear-down round trip through the CPU, only the moves.
            place(pipe, target, device, force=True)
        else:
            self._replace(target, undo, todo)
        for name, vae in self._vaes.items():
            configure_vae(vae, original=self._vae_original[name], slicing=target.decode_sliced,
                          tiling=target.tiling, latent_hw=shape.latent_hw if shape else None)

    def _replace(self, target: Plan, undo: list[str], todo: set[str]) -> None:
        """Tear down, undo and apply the storage rungs, place ``target`` from scratch."""
        pipe, device = self._pipe, self._device
        strategies.tear_down(pipe)
        self._shadows.drop()
        free_memory(device)
        if todo or target.placing.host_pageable:
            # Weights left in a streamed plan's pinned copies would stay page-locked (and
            # rounded up) under a plan that keeps them in host RAM; the low-memory stream
            # variant pins one group at a time, so it too starts from pageable weights; and
            # a storage rung may keep the originals as its undo copy.
            unpinned = unpin(pipe)
            if unpinned:
                emit("unpinned", stage="load", action=",".join(target.names), gib=gib(unpinned, 3))
        for name in undo:
            self._ledger.undo(name)
        if todo:
            self._ledger.apply(target.storage, todo)
        place(pipe, target, device)
        if memory_of(device).can_pin:
            release_pinned_cache()  # pinned copies freed by moving their weights to the device
