"""Stage peak bookkeeping, and storing what was learned (the plan that worked, the measured
activations, the rungs found broken) in the plan cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autofit.facts.devices import memory_of
from autofit.events import emit
from autofit.planning.explain import OOMFigures
from autofit.facts.footprint import Footprint
from autofit.planning.context import Workload
from autofit.planning.cost import activation_bytes, activation_factor, resident_bytes
from autofit.plan import Plan
from autofit.engine.preflight import plausible_activations, predicted_peaks

if TYPE_CHECKING:
    from autofit.engine.runtime import Runtime


def transition(rt: Runtime, stage: str | None) -> None:
    """Close the previous stage's peak measurement (CUDA) and open the next one. Each peak
    is kept with the plan it ran under: an escalation changes the plan mid-call."""
    call, plan = rt.state.call, rt.state.plan
    assert call is not None
    mem = memory_of(rt.device)
    if mem.measures_peaks:
        if call.stage is not None:
            peak = mem.peak()
            if call.stage_plans.get(call.stage) != plan:
                call.stage_peaks.pop(call.stage, None)  # measured under another plan
            if peak is not None:
                call.stage_peaks[call.stage] = max(call.stage_peaks.get(call.stage, 0), peak)
                call.stage_plans[call.stage] = plan
        if stage is not None:
            mem.reset_peak()
    call.stage = stage


def restart(rt: Runtime) -> None:
    """After a plan switch: the failing stage's peak so far is the failed attempt's (it sits
    near the budget), so its measurement starts again. Stages that completed keep theirs,
    with the plan they ran under."""
    call = rt.state.call
    if call is not None:
        call.stage_peaks.pop(call.stage, None)
    memory_of(rt.device).reset_peak()


def learned_activations(peaks: dict[str, int], plans: dict[str, Plan], plan: Plan, shape: Workload,
                        footprint: Footprint) -> dict[str, int]:
    """Activation bytes of each stage from its measured peak, less the weights resident under the
    plan it ran under (``plans``, else ``plan``). Stored unscaled: the planner applies the factor of
    the plan it predicts for (tiling, split batches), so a peak measured under tiling is not shrunk
    a second time."""
    out = {}
    for stage, peak in peaks.items():
        ran = plans.get(stage, plan)
        factor = activation_factor(ran, stage, shape)
        if factor > 0:
            out[stage] = int(max(peak - resident_bytes(ran, stage, footprint), 0) / factor)
    return out


def raise_activation_floor(rt: Runtime, stage: str, plan: Plan, message: str) -> int | None:
    """After a device OOM whose message states this process's bytes: the stage's peak under
    ``plan`` was at least those bytes plus the request, so its activations were at least that
    less the weights resident for the stage. Where the estimate (or an earlier measurement) says
    less, the floor replaces it: the ladder and the planner size the next plan from it. Returns
    the floor (unscaled, as stored), or None when the message has no such figures."""
    figures = OOMFigures.parse(message)
    held = figures.allocated if figures.allocated is not None else figures.process
    call = rt.state.call
    if held is None or not figures.requested:
        return None
    shape = call.shape if call is not None else Workload()
    key = floor_key(rt, shape)
    factor = activation_factor(plan, stage, shape)
    if factor <= 0:
        return None
    floor = int(max(held + figures.requested - resident_bytes(plan, stage, rt.footprint), 0) / factor)
    known = rt.state.measured.setdefault(key, {})
    if floor > known.get(stage, activation_bytes(stage, rt.footprint, shape, known)):
        known[stage] = floor
    return floor


def floor_key(rt: Runtime, shape: Workload) -> str:
    """Where a workload's activations are kept in this process: its plan-cache key, or, with no
    cache and no preflight, the workload itself."""
    return rt.state.key if rt.state.key is not None else f"workload:{shape!r}"


def remember(rt: Runtime, seconds: float) -> None:
    """Store the plan that worked (and the measured activations) under the workload's key."""
    state, call = rt.state, rt.state.call
    plan, choice, key = state.plan, state.choice, state.key
    peaks, plans = (call.stage_peaks, call.stage_plans) if call is not None else ({}, {})
    if call is not None:
        call.stage_peaks, call.stage_plans = {}, {}
    state.dirty = False
    before = dict(state.measured.get(key, {})) if key is not None else {}
    if choice is not None and choice.machine is not None and state.predicted_plan != plan:
        # The preflight prediction was for another plan: log the one for the plan that ran.
        state.predicted = predicted_peaks(rt, plan, choice, before)
        state.predicted_plan = plan
    shape = call.shape if call is not None else Workload()
    activations = {**before, **learned_activations(peaks, plans, plan, shape, rt.footprint)}
    if activations and key is not None:
        state.measured[key] = activations
    # Predicted beside measured, for the stages that ran under the plan in force now.
    now = {k: v for k, v in peaks.items() if plans.get(k, plan) == plan}
    if now:
        emit("stage_peaks", stage=",".join(now), action=",".join(plan.names) or "device", attempt=0,
             **{f"measured_{k}_gib": round(v / 2**30, 3) for k, v in now.items()},
             **{f"predicted_{k}_gib": round(v / 2**30, 3) for k, v in state.predicted.items() if k in now})

    # The resolution itself, for `autofit cache list` (the key holds only its 64K-pixel bucket).
    wl = choice.workload if choice is not None else None
    size = {"size": [wl.height, wl.width]} if wl is not None else {}

    def change(record: dict | None) -> dict:
        # Another process may have stored meanwhile: its broken rungs are kept, and each
        # stage keeps the larger activation measured (plans are predicted from them), unless the
        # stored one could not have been measured here or contradicts this process's measurement.
        stored = {k: int(v) for k, v in (record or {}).get("activations", {}).items()}
        device_total = choice.device_total if choice is not None else None
        stored, _ = plausible_activations(stored, shape, device_total)
        return {"plan": list(steer.names), "running": list(plan.names), "explained": steer == plan,
                "activations": {**stored, **merge_activations(stored, activations, key)},
                "seconds": round(seconds, 4),
                "key": choice.fields if choice is not None else {}, "unusable": _merged_unusable(rt, record),
                **size}

    # The plan that steers the next process: raised only by escalations the OOM's figures
    # explained (a spike from another process does not make every later process slower).
    steer = state.steering or plan
    _update_cache(rt, change)


# A stored activation this many times what this process measured for the same key is not a
# measurement of this workload on this machine (same resolution bucket, batch and device).
CONTRADICTS = 2.0


def merge_activations(stored: dict[str, int], measured: dict[str, int], key: str | None) -> dict[str, int]:
    """Per stage, the larger of the stored and the measured activation; a stored value that
    contradicts the measurement (``CONTRADICTS`` times it or more) is replaced by it."""
    out = {}
    for stage, value in measured.items():
        old = stored.get(stage, 0)
        if value > 0 and old >= CONTRADICTS * value:
            emit("cache_value_replaced", level="warning", stage=stage, action="none", key=key, stored=old,
                 measured=value, reason=f"stored {old / 2**30:.3f} GiB, measured {value / 2**30:.3f} GiB here")
            out[stage] = value
        else:
            out[stage] = max(value, old)
    return out


def persist_unusable(rt: Runtime) -> None:
    """Store the rungs found broken (with the plan in force) under the workload's key."""
    choice = rt.state.choice

    def change(record: dict | None) -> dict:
        record = record or {"key": choice.fields if choice is not None else {}}
        steer = rt.state.steering or rt.state.plan
        return {**record, "plan": list(steer.names), "unusable": _merged_unusable(rt, record)}

    _update_cache(rt, change)


def _merged_unusable(rt: Runtime, record: dict | None) -> dict[str, list[str]]:
    """This process's broken rungs together with those another process stored."""
    out = {k: set(v) for k, v in (record or {}).get("unusable", {}).items()}
    for k, v in rt.state.unusable.items():
        out.setdefault(k, set()).update(v)
    return {k: sorted(v) for k, v in out.items()}


def _update_cache(rt: Runtime, change: Any) -> None:
    key = rt.state.key
    if rt.cache is None or key is None:
        return
    try:
        rt.cache.update(key, change)
    except OSError as exc:  # a read-only or full cache must not fail the call
        emit("cache_write_failed", level="warning", stage="load", action="none", error=str(exc)[:200])
