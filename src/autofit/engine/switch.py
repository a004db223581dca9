"""The plan switch: the only writer of the plan in force, and a transaction.

``switch(rt, target)`` places the weights as ``target`` says, then makes it the plan in force.
A failure that is not an OOM puts the previous plan back (or, if even that fails, tears down)
and passes through: the plan in force stays the previous one. An OOM while placing leaves the
previous plan in force with nothing placed (the next switch starts from a teardown) and is
returned, so that recovery escalates from the plan that was being placed.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager

from autofit import _diffusers
from autofit._diffusers import module_components
from autofit.facts.devices import memory_of
from autofit.events import emit
from autofit.facts.memory import release_pinned_cache
from autofit.engine.moves import enforce_residency
from autofit.engine.oom import OOMInfo, classify, free_memory
from autofit.plan import Plan
from autofit.strategies import configure_vae, place, teardown
from autofit.strategies.placement import unpin

if TYPE_CHECKING:
    from autofit.engine.runtime import Runtime


def suspended(rt: Runtime) -> ContextManager[None]:
    """The stage wrappers off while rungs are applied: rungs go *under* the wrappers."""
    wrappers = rt.state.wrappers
    return wrappers.suspended() if wrappers is not None else nullcontext()


def switch(rt: Runtime, target: Plan) -> OOMInfo | None:
    """Make ``target`` the plan in force; returns the OOM if placing its weights ran out."""
    state = rt.state
    previous, previous_applied = state.plan, state.applied
    failure: OOMInfo | None = None
    with suspended(rt):
        state.applied = None  # until the weights are where ``target`` says
        try:
            _apply(rt, previous_applied, target)
        except BaseException as exc:
            failure = classify(exc)
            if failure is None:
                _restore(rt, previous, target, exc)
                raise
    if failure is not None:
        return failure  # outside ``except``: the failed attempt's frames are gone
    state._plan = state.applied = target
    state.denoise_chunks = target.denoise_chunks(state.call.shape.batch if state.call else 1)
    return None


def adopted(rt: Runtime, plan: Plan) -> None:
    """The weights already are where ``plan`` says (the user placed them): make it the plan in
    force and the plan to start from, with no move."""
    state = rt.state
    state._plan = state.applied = state.initial_plan = plan
    state.choice = None  # plan afresh (for the cache key) at the next call
    state.relax.plan_chosen(plan)
    state.steering = plan


def tear_down(rt: Runtime) -> None:
    """No hooks, weights on the CPU, nothing placed: the next switch places the plan in force."""
    with suspended(rt):
        try:
            teardown(rt.pipe)
        finally:
            rt.state.applied = None


def holds_hooks(pipe: object) -> bool:
    """Offload hooks (accelerate's or diffusers' group offloading) on any component."""
    return any(
        _diffusers.has_accelerate_hooks(m) or _diffusers.group_offload_config(m) is not None
        for m in module_components(pipe).values()
    )


def _restore(rt: Runtime, previous: Plan, target: Plan, exc: BaseException) -> None:
    """Not an OOM: put back the plan that was in force before the error passes through."""
    try:
        _apply(rt, None, previous)
        rt.state.applied = previous
    except BaseException as again:  # leave it consistent at least
        emit("rollback_failed", level="error", stage="load", action="teardown", error=str(again)[:200])
        teardown(rt.pipe)
    emit("rolled_back", level="warning", stage="load", action=",".join(target.names),
         error=f"{type(exc).__name__}: {str(exc)[:200]}", plan=",".join(previous.names))


def _apply(rt: Runtime, current: Plan | None, target: Plan) -> None:
    """Move the weights from where ``current`` put them (None: unknown) to where ``target`` says."""
    pipe, device, state = rt.pipe, rt.device, rt.state
    undo, todo = rt.ledger.changes(target, state.unusable)
    storage_change = bool(undo or todo)
    same_placement = current is not None and current.placement == target.placement
    hooked = holds_hooks(pipe)
    if same_placement and not storage_change:
        if target.placement == "device":
            place(pipe, target, device)
        elif current is not None and current.extras != target.extras:
            enforce_residency(rt, target)
    elif target.placement == "device" and not hooked and not storage_change:
        # From a plain pipeline: no teardown round trip through the CPU, only the moves.
        place(pipe, target, device, force=True)
    else:
        teardown(pipe)
        rt.shadows.drop()
        free_memory(device)
        if todo or target.placement not in ("group_leaf_stream", "device"):
            # Weights left in a streamed plan's pinned copies would stay page-locked (and
            # rounded up) under a plan that keeps them in host RAM; the low-memory stream
            # variant pins one group at a time, so it too starts from pageable weights; and
            # a storage rung may keep the originals as its undo copy.
            unpinned = unpin(pipe)
            if unpinned:
                emit("unpinned", stage="load", action=",".join(target.names), gib=round(unpinned / 2**30, 3))
        for name in undo:
            rt.ledger.undo(name)
        if todo:
            rt.ledger.apply(target.storage, todo)
        place(pipe, target, device)
        if memory_of(device).can_pin:
            release_pinned_cache()  # pinned copies freed by moving their weights to the device
    for name, vae in rt.vaes.items():
        configure_vae(
            vae,
            original=rt.vae_original[name],
            slicing="vae_slicing" in target.extras,
            tiling=target.tiling,
            latent_hw=state.call.shape.latent_hw if state.call else None,
        )
