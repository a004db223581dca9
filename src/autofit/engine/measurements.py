"""Stage peak bookkeeping, and what was learned about memory (the activations each workload
needs, the prediction for the plan in force), stored in the plan cache with the plan that worked
and the rungs found broken. :class:`Measurements` alone changes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from autofit.facts.cache import PlanCache
from autofit.facts.devices import memory_of
from autofit.events import emit
from autofit.planning.explain import OOMFigures
from autofit.facts.footprint import Footprint
from autofit.planning.context import Workload
from autofit.planning.cost import activation_bytes, activation_factor, resident_bytes
from autofit.plan import Plan
from autofit.engine.state import Choice
from autofit.engine.preflight import plausible_activations
from autofit.units import GIB, gib


def floor_key(key: str | None, shape: Workload) -> str:
    """Where a workload's activations are kept in this process: its plan-cache key, or, with no
    cache and no preflight, the workload itself."""
    return key if key is not None else f"workload:{shape!r}"


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
                 measured=value, reason=f"stored {old / GIB:.3f} GiB, measured {value / GIB:.3f} GiB here")
            out[stage] = value
        else:
            out[stage] = max(value, old)
    return out


class Measurements:
    """The stage peaks of the call in progress, the activations learned per workload, the
    prediction for a plan, and whether something was learned that the plan cache should hear."""

    def __init__(self, device: torch.device, cache: PlanCache | None):
        self._device, self._cache = device, cache
        self._measured: dict[str, dict[str, int]] = {}  # cache key -> stage -> activation bytes
        self._worked: dict[str, Plan] = {}  # cache key -> the plan that steers (as the cache stores it)
        self._predicted: dict[str, int] = {}
        self._predicted_plan: Plan | None = None
        self._dirty = False
        self._stage: str | None = None  # the stage whose peak is being measured
        self._peaks: dict[str, int] = {}  # this call's peak per stage, with the plan it ran under
        self._plans: dict[str, Plan] = {}

    # ---- read-only -----------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def stage(self) -> str | None:
        """The stage whose peak is being measured (None: none)."""
        return self._stage

    def measured(self, key: str | None) -> dict[str, int] | None:
        """Activation bytes per stage learned for ``key`` (None: none)."""
        found = self._measured.get(key) if key is not None else None
        return dict(found) if found is not None else None

    def worked(self, key: str | None) -> Plan | None:
        """The plan a call of ``key``'s workload completed on in this process, as the plan cache
        would store it (raised only by explained escalations); None: none yet."""
        return self._worked.get(key) if key is not None else None

    def predicted_peak(self, stage: str, plan: Plan) -> int | None:
        """The predicted peak of ``stage`` when the prediction was for ``plan``."""
        return self._predicted.get(stage) if self._predicted_plan == plan else None

    def peaks_under(self, plan: Plan) -> dict[str, int]:
        """This call's stage peaks measured under ``plan``."""
        return {k: v for k, v in self._peaks.items() if self._plans.get(k, plan) == plan}

    # ---- what changes them ---------------------------------------------------------------------
    def forget_plans(self) -> None:
        """Plan afresh (``reset``, memory came back): the plans that ran here no longer count."""
        self._worked.clear()

    def learned(self) -> None:
        """Something happened that the plan cache should hear at the next success."""
        self._dirty = True

    def chose(self, choice: Choice) -> None:
        """Preflight chose: the activations it read from the plan cache, and its prediction."""
        if choice.measured is not None and choice.key is not None:
            self._measured[choice.key] = choice.measured
        if choice.plan is not None:
            self._predicted, self._predicted_plan = choice.predicted, choice.plan
            self._dirty = True

    def begin_call(self) -> None:
        self._stage, self._peaks, self._plans = None, {}, {}

    def transition(self, stage: str | None, plan: Plan) -> None:
        """Close the previous stage's peak measurement (CUDA) and open the next one. Each peak
        is kept with the plan it ran under: an escalation changes the plan mid-call."""
        mem = memory_of(self._device)
        if mem.measures_peaks:
            if self._stage is not None:
                peak = mem.peak()
                if self._plans.get(self._stage) != plan:
                    self._peaks.pop(self._stage, None)  # measured under another plan
                if peak is not None:
                    self._peaks[self._stage] = max(self._peaks.get(self._stage, 0), peak)
                    self._plans[self._stage] = plan
            if stage is not None:
                mem.reset_peak()
        self._stage = stage

    def restart(self) -> None:
        """After a plan switch: the failing stage's peak so far is the failed attempt's (it sits
        near the budget), so its measurement starts again. Stages that completed keep theirs,
        with the plan they ran under."""
        self._peaks.pop(self._stage, None)
        memory_of(self._device).reset_peak()

    def raise_floor(self, key: str, stage: str, plan: Plan, message: str, shape: Workload,
                    footprint: Footprint) -> int | None:
        """After a device OOM whose message states this process's bytes: the stage's peak under
        ``plan`` was at least those bytes plus the request, so its activations were at least that
        less the weights resident for the stage. Where the estimate (or an earlier measurement) says
        less, the floor replaces it: the ladder and the planner size the next plan from it. Returns
        the floor (unscaled, as stored), or None when the message has no such figures."""
        figures = OOMFigures.parse(message)
        held = figures.allocated if figures.allocated is not None else figures.process
        if held is None or not figures.requested:
            return None
        factor = activation_factor(plan, stage, shape)
        if factor <= 0:
            return None
        floor = int(max(held + figures.requested - resident_bytes(plan, stage, footprint), 0) / factor)
        known = self._measured.setdefault(key, {})
        if floor > known.get(stage, activation_bytes(stage, footprint, shape, known)):
            known[stage] = floor
        return floor

    def remember(self, seconds: float, *, plan: Plan, steer: Plan, choice: Choice | None, shape: Workload,
                 footprint: Footprint, broken: dict[str, set[str]],
                 predict: Callable[[Plan, Choice, dict[str, int]], dict[str, int]]) -> None:
        """Store the plan that worked (and the measured activations) under the workload's key.
        ``steer``: the plan that steers the next process, raised only by escalations the OOM's
        figures explained (a spike from another process does not make every later process slower)."""
        key = choice.key if choice is not None else None
        peaks, plans = self._peaks, self._plans
        self._peaks, self._plans = {}, {}
        self._dirty = False
        before = dict(self._measured.get(key, {})) if key is not None else {}
        if choice is not None and choice.machine is not None and self._predicted_plan != plan:
            # The preflight prediction was for another plan: log the one for the plan that ran.
            self._predicted, self._predicted_plan = predict(plan, choice, before), plan
        activations = {**before, **learned_activations(peaks, plans, plan, shape, footprint)}
        if activations and key is not None:
            self._measured[key] = activations
        if key is not None:
            self._worked[key] = steer
        # Predicted beside measured, for the stages that ran under the plan in force now.
        now = {k: v for k, v in peaks.items() if plans.get(k, plan) == plan}
        if now:
            emit("stage_peaks", stage=",".join(now), action=",".join(plan.names) or "device", attempt=0,
                 **{f"measured_{k}_gib": gib(v, 3) for k, v in now.items()},
                 **{f"predicted_{k}_gib": gib(v, 3) for k, v in self._predicted.items() if k in now})
        # The resolution itself, for `autofit cache list` (the key holds only its 64K-pixel bucket).
        wl = choice.workload if choice is not None else None
        size = {"size": [wl.height, wl.width]} if wl is not None else {}

        def change(record: dict | None) -> dict:
            # Another process may have stored meanwhile: its broken rungs are kept, and each
            # stage keeps the larger activation measured (plans are predicted from them), unless the
            # stored one could not have been measured here or contradicts this process's measurement.
            stored = {k: int(v) for k, v in (record or {}).get("activations", {}).items()}
            stored, _ = plausible_activations(stored, shape, choice.device_total if choice is not None else None)
            return {"plan": list(steer.names), "running": list(plan.names), "explained": steer == plan,
                    "activations": {**stored, **merge_activations(stored, activations, key)},
                    "seconds": round(seconds, 4),
                    "key": choice.fields if choice is not None else {}, "broken": _merged(broken, record),
                    **size}

        self._update_cache(key, change)

    def persist_broken(self, *, choice: Choice | None, steer: Plan, broken: dict[str, set[str]]) -> None:
        """Store the rungs found broken (with the plan that steers) under the workload's key."""

        def change(record: dict | None) -> dict:
            record = record or {"key": choice.fields if choice is not None else {}}
            return {**record, "plan": list(steer.names), "broken": _merged(broken, record)}

        self._update_cache(choice.key if choice is not None else None, change)

    def _update_cache(self, key: str | None, change: Any) -> None:
        if self._cache is None or key is None:
            return
        try:
            self._cache.update(key, change)
        except OSError as exc:  # a read-only or full cache must not fail the call
            emit("cache_write_failed", level="warning", stage="load", action="none", error=str(exc)[:200])


def _merged(broken: dict[str, set[str]], record: dict | None) -> dict[str, list[str]]:
    """This process's broken rungs together with those another process stored."""
    out = {k: set(v) for k, v in (record or {}).get("broken", {}).items()}
    for k, v in broken.items():
        out.setdefault(k, set()).update(v)
    return {k: sorted(v) for k, v in out.items()}
