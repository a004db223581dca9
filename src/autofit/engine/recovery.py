"""Recovery: on an OOM, decide the next step and have it taken.

Deciding is pure (:func:`triage`, :func:`climb`: the facts of the OOM and the call's
:class:`~autofit.engine.state.Retries` in, a :class:`Step` out), as tenacity hands its retry state
to its policies. :class:`Recovery` gathers the facts, records and logs the step, and asks
:class:`~autofit.engine.placement.Placement` to switch; when nothing is left, it parks the
pipeline and raises. It is called *after* the failing code left its ``except`` block, so the
failed attempt's tensors are unreachable when memory is freed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NoReturn

from autofit.errors import AutoFitExhausted, CheckpointChanged, exhausted_message
from autofit.events import emit
from autofit.facts.devices import memory_of
from autofit.planning.context import Context
from autofit.planning.explain import Verdict, judge, room_at_failure, shortfall
from autofit.planning.ladder import next_plan
from autofit.planning.rungs import RUNGS
from autofit.plan import split_name
from autofit.plan import Plan
from autofit.records import EscalationRecord
from autofit.engine.course import Course
from autofit.engine.measurements import Measurements, floor_key
from autofit.engine.oom import OOMInfo, OOMKind, free_memory
from autofit.engine.placement import Placement
from autofit.engine.readings import Readings
from autofit.engine.state import CallState, Choice, History, Retries
from autofit.engine.survey import Survey
from autofit.engine.wrappers import StageWrappers

sleep = time.sleep  # tests replace it (tenacity's way: the side effect as a parameter)


@dataclass(frozen=True, slots=True)
class Step:
    """What to do about one OOM. ``kind``: ``"probe_back"`` (a probe ran out: back to the plan it
    came down from), ``"retry"`` (an OOM the plan does not explain: the same plan once more),
    ``"escalate"`` (the next rung), ``"backoff"`` (no rung left: the same plan after ``wait``
    seconds) or ``"give_up"``. ``action`` is what the escalation record says."""

    kind: str
    target: Plan | None = None
    action: str = ""
    reason: str = ""
    wait: float = 0.0
    need: int = 0  # bytes the OOM's figures say were missing
    skipped: tuple[tuple[str, str], ...] = ()


def triage(stage: str, plan: Plan, verdict: Verdict, probing: Plan | None, retries: Retries) -> Step | None:
    """The steps that need no ladder: a probe (a call on a lighter plan, see
    :mod:`autofit.engine.relax`) that ran out goes back to the plan it came down from; an OOM the
    plan does not explain (another process's spike, a fragmented cache: :mod:`autofit.planning.explain`)
    is retried on the same plan, a bounded number of times. None: climb the ladder."""
    if probing is not None:
        return Step("probe_back", probing, "probe_failed")
    if not verdict.explained and retries.same_plan_left(stage):
        return Step("retry", plan, "retry_same_plan", reason=verdict.detail)
    return None


def climb(plan: Plan, stages: tuple[str, ...], ctx: Context, *, host_oom: bool, avoid: frozenset[Plan], need: int,
          measured: dict[str, int] | None, budget: int | None, retries: Retries) -> Step:
    """The next rung of the first of ``stages`` with one left; with none left, the same plan
    after a backoff, a bounded number of times; then give up. Plans already on the way up from the
    planned plan (``avoid``) are not taken again: two stages' OOMs would otherwise flip the plan
    between two rungs for ever."""
    skipped: list[tuple[str, str]] = []
    target = action = None
    for stage in stages:
        target, action, more = next_plan(plan, stage, host_oom=host_oom, ctx=ctx, avoid=avoid, need=need,
                                         measured=measured, budget=budget)
        skipped += more
        if target is not None:
            break
    if target is not None and action is not None:
        return Step("escalate", target, action, need=need, skipped=tuple(skipped))
    wait = retries.backoff()
    if wait is None:
        return Step("give_up", reason="no rung left that lowers this stage's peak, and retries of the plan in force "
                                      "ran out too", skipped=tuple(skipped))
    return Step("backoff", plan, "retry_same_plan", reason=f"no rung left; retrying the plan in force after {wait:g} s",
                wait=wait, skipped=tuple(skipped))


def plan_of(step: Step) -> Plan:
    assert step.target is not None, f"a {step.kind} step has no plan"
    return step.target


class Recovery:
    """Takes the steps :func:`triage` and :func:`climb` decide, on the engine's objects."""

    def __init__(self, *, placement: Placement, course: Course, measurements: Measurements, survey: Survey,
                 readings: Readings, history: History, wrappers: StageWrappers, policy: str, max_retries: int):
        self._placement, self._course, self._measurements = placement, course, measurements
        self._survey, self._readings, self._history, self._wrappers = survey, readings, history, wrappers
        self._policy, self._max_retries = policy, max_retries

    def on_oom(self, call: CallState, choice: Choice | None, stage: str, failure: OOMInfo, *,
               component: str | None, scope: str, from_plan: Plan | None = None) -> float:
        """Decide what to do about an OOM in ``stage`` under ``from_plan`` (default: the plan in
        force) and do it, so that the caller can retry. Returns the seconds it took. Raises
        :class:`AutoFitExhausted` when nothing is left or ``max_retries`` is reached."""
        device, placement = self._readings.device, self._placement
        self._measurements.learned()
        t0 = time.perf_counter()
        free_memory(device)
        origin = stage  # the stage whose OOM started this escalation
        plan = from_plan if from_plan is not None else placement.plan
        while True:
            if call.retries.attempt() > self._max_retries:
                self._exhausted(call, stage, failure, f"max_retries={self._max_retries} reached")
            host_oom = failure.kind is OOMKind.HOST and device.type != "cpu"
            verdict = Verdict("host", "host RAM") if host_oom else self._judge(stage, plan, failure, choice)
            step = triage(stage, plan, verdict, self._course.probing, call.retries)
            if step is None:
                step = self._climb(call, choice, (stage,) if stage == origin else (stage, origin), plan, failure,
                                   host_oom)
            target = self._take(step, call, choice, stage, failure, component, scope, verdict)
            switched = target != placement.plan or placement.applied != target
            new_failure = placement.switch(target, call.shape) if switched else None
            if new_failure is None:
                self._measurements.restart()
                emit("retry", stage=stage, attempt=call.retries.attempts, scope=scope)
                return time.perf_counter() - t0
            # The new plan ran out while its weights were being placed: a load-stage OOM, and the
            # ladder goes on from the plan that was being placed.
            failure, stage, scope, component, plan = new_failure, "load", "load", None, target
            free_memory(device)

    def _judge(self, stage: str, plan: Plan, failure: OOMInfo, choice: Choice | None) -> Verdict:
        """Why the device ran out: the OOM's own figures, else the predicted peak against the budget."""
        budget = choice.budget if choice is not None else None
        return judge(failure.message or failure.head, predicted_peak=self._measurements.predicted_peak(stage, plan),
                     budget=budget or None)

    def _climb(self, call: CallState, choice: Choice | None, stages: tuple[str, ...], plan: Plan, failure: OOMInfo,
               host_oom: bool) -> Step:
        """The facts the ladder sizes the next plan from, then :func:`climb`. Sized from the
        OOM's figures only where they are this device's (an allocator that counts bytes): on the
        CPU a CUDA-worded message describes some other device."""
        key = floor_key(choice.key if choice is not None else None, call.shape)
        need, budget = 0, None
        if not host_oom and memory_of(self._readings.device).measures_peaks:
            message = failure.message or failure.head
            need = shortfall(message)
            self._measurements.raise_floor(key, stages[0], plan, message, call.shape, self._placement.footprint)
            # What this process could have had at the moment of failure (the OOM's own
            # figures: free plus what it held), else the budget probed now; memory other
            # processes took since preflight is not ours.
            budget = room_at_failure(message)
            if budget is None:
                budget = self._readings.hardware().budget_bytes
        ctx = self._survey.context(call.shape, machine=choice.machine if choice is not None else None)
        return climb(plan, stages, ctx, host_oom=host_oom, avoid=frozenset(self._course.path[:-1]), need=need,
                     measured=self._measurements.measured(key), budget=budget, retries=call.retries)

    def _take(self, step: Step, call: CallState, choice: Choice | None, stage: str, failure: OOMInfo,
              component: str | None, scope: str, verdict: Verdict) -> Plan:
        """Record and log ``step``, and change the course as it says; returns the plan to switch to."""
        retries, course, memory = call.retries, self._course, self._readings.memory
        if step.kind == "probe_back":
            target = course.probe_failed(time.perf_counter() - call.started)
            record = self._record(retries, stage, step.action, failure, component, scope, target, verdict)
            emit("probe_failed", **record.event_fields(), wait=course.wait, **memory())
            return target
        if step.kind == "retry":
            retries.retried_same_plan(stage)
            record = self._record(retries, stage, step.action, failure, component, scope, step.target, verdict)
            emit("retry_same_plan", **record.event_fields(), reason=step.reason, **memory())
            return plan_of(step)
        for name, reason in step.skipped:
            emit("rung_skipped", stage=stage, action=name, reason=reason, attempt=retries.attempts)
        if step.kind == "give_up":
            self._exhausted(call, stage, failure, step.reason)
        action, target, need = step.action, plan_of(step), step.need
        record = self._record(retries, stage, action, failure, component, scope, target, verdict, step.skipped)
        if step.kind == "backoff":
            retries.backed_off()
            emit("retry_same_plan", **record.event_fields(), reason=step.reason, **memory())
            sleep(step.wait)
            free_memory(self._readings.device)
            return target
        emit("escalate", **record.event_fields(), explained=verdict.explained,
             lossless=RUNGS[split_name(action)[0]].quality != "lossy", need_mib=round(need / 2**20, 2), **memory())
        # An escalation steers the cache (the next process starts there) unless the OOM's own
        # figures put it on another process's memory: explained, or not avoided by a retry of
        # the same plan, it is no one-off.
        course.escalated_to(target, steer=verdict.cause != "others", budget=choice.budget if choice else None)
        return target

    def _record(self, retries: Retries, stage: str, action: str, failure: OOMInfo, component: str | None, scope: str,
                target: Plan, verdict: Verdict, skipped: tuple[tuple[str, str], ...] = ()) -> EscalationRecord:
        record = EscalationRecord(stage=stage, action=action, error=failure.head, attempt=retries.attempts,
                                  component=component, oom_kind=failure.kind.value, scope=scope, plan=target.names,
                                  skipped=tuple(skipped), cause=verdict.cause)
        self._history.add(record)
        retries.add(record)
        return record

    def _exhausted(self, call: CallState, stage: str, failure: OOMInfo, why: str) -> NoReturn:
        """Park the pipeline, log, and raise :class:`AutoFitExhausted` saying what to do."""
        records = list(call.retries.records)
        plan, path = self._placement.plan, self._course.path
        self.tear_down()
        emit("exhausted", stage=stage, action="none", attempt=call.retries.attempts,
             reason=why, error=failure.head, plan=",".join(plan.names), **self._readings.memory())
        # What was tried: the plan in force and how it was reached from the planned plan, not only
        # this call's steps (the plan may have been escalated by earlier calls).
        on_path = {p.names for p in path}
        tried = [r.action for r in self._history.records if r.action in RUNGS and r.plan in on_path]
        retried = sum(r.action == "retry_same_plan" for r in records)
        if retried:
            tried.append(f"{retried} retr{'y' if retried == 1 else 'ies'} of the plan in force")
        raise AutoFitExhausted(
            exhausted_message(stage=stage, why=why, tried=tried, plan=plan.names, policy=self._policy,
                              error=failure.head),
            stage=stage,
            history=records,
        ) from failure.error  # the allocator's own error, its type and message (no frames)

    def tear_down(self) -> None:
        """After exhaustion: no hooks, weights on the CPU, nothing held; the next call re-places."""
        self._wrappers.uninstall()
        try:
            self._placement.tear_down()
        finally:
            free_memory(self._readings.device)

    def roll_back(self, call: CallState, choice: Choice | None, stage: str, name: str, error: str) -> float:
        """A component failed (not with an OOM) on its first run after a one-way rung: restore its
        original weights, drop the rung for it, remember that in the plan cache, carry on.
        Returns the seconds an OOM while placing the plan without it took to recover."""
        placement = self._placement
        with placement.suspended():
            try:
                rung, target = placement.undo_one_way(name)
            except CheckpointChanged as exc:
                raise CheckpointChanged(f"{exc} It was being undone because {name} failed with {error}") from None
            action = f"undo_{rung}"
            record = EscalationRecord(stage=stage, action=action, error=error[:200], attempt=call.retries.attempts,
                                      component=name, oom_kind="none", scope="stage", plan=target.names)
            self._history.add(record)
            call.retries.add(record)
            emit("rolled_back", level="warning", stage=stage, action=action, component=name,
                 attempt=record.attempt, error=error[:200], plan=",".join(target.names), marked_broken=True)
            failure = placement.switch(target, call.shape)
            self._measurements.learned()
            self._measurements.persist_broken(choice=choice, steer=self._course.steering or placement.plan,
                                                broken=placement.broken)
        if failure is None:
            return 0.0
        return self.on_oom(call, choice, "load", failure, component=None, scope="load", from_plan=target)
