"""Recovery: on an OOM, decide the next plan (the ladder), record and log the step, switch to
it; when nothing is left, park the pipeline and raise; roll back a one-way rung that broke a
component. Called *after* the failing code left its ``except`` block, so the failed attempt's
tensors are unreachable when memory is freed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NoReturn

from autofit.engine import measurements
from autofit.errors import AutoFitExhausted, CheckpointChanged, exhausted_message
from autofit.events import emit
from autofit.planning.context import Workload
from autofit.planning.explain import Verdict, judge, room_at_failure, shortfall
from autofit.facts.hardware import probe
from autofit.planning.ladder import next_plan
from autofit.facts.devices import memory_of
from autofit.engine.oom import OOMInfo, OOMKind, free_memory
from autofit.plan import Plan
from autofit.records import EscalationRecord
from autofit.planning.rungs import RUNGS, split_name
from autofit.engine.switch import suspended, switch, tear_down

if TYPE_CHECKING:
    from autofit.engine.runtime import Runtime


# An OOM the plan does not explain is retried this many times on the same plan, per stage and call.
SAME_PLAN_RETRIES = 1
# With no rung left, the same plan is retried after these waits (seconds) before giving up.
LAST_RUNG_BACKOFF = (0.5, 1.0, 2.0)
sleep = time.sleep  # tests replace it (tenacity's way: the side effect as a parameter)


def on_oom(rt: Runtime, stage: str, failure: OOMInfo, *, component: str | None, scope: str,
           from_plan: Plan | None = None) -> None:
    """Decide what to do about an OOM in ``stage`` under ``from_plan`` (default: the plan in
    force) and do it, so that the caller can retry:

    - a probe (a call on a lighter plan, see :mod:`autofit.engine.relax`) that ran out goes back to the
      plan it came down from;
    - an OOM the plan does not explain (another process's spike, a fragmented cache, no figure
      saying the plan is at fault: :mod:`autofit.planning.explain`) is retried once on the same plan;
    - otherwise the next rung of the stage's ladder;
    - with no rung left, the same plan again after a backoff, a bounded number of times.

    Raises :class:`AutoFitExhausted` when nothing is left or ``max_retries`` is reached."""
    state, call = rt.state, rt.state.call
    assert call is not None
    state.dirty = True
    t0 = time.perf_counter()
    free_memory(rt.device)
    origin = stage  # the stage whose OOM started this escalation
    plan = from_plan if from_plan is not None else state.plan
    while True:
        call.attempts += 1
        if call.attempts > rt.max_retries:
            exhausted(rt, stage, failure, f"max_retries={rt.max_retries} reached")
        host_oom = failure.kind is OOMKind.HOST and rt.device.type != "cpu"
        verdict = Verdict("host", "host RAM") if host_oom else _judge(rt, stage, plan, failure)
        if state.relax.probing is not None:
            target = state.relax.probe_failed(time.perf_counter() - call.started)
            record = _record(rt, stage, "probe_failed", failure, component, scope, target, verdict)
            emit("probe_failed", **record.event_fields(), wait=state.relax.wait, **rt.memory())
        elif not verdict.explained and call.same_plan_retries.get(stage, 0) < SAME_PLAN_RETRIES:
            call.same_plan_retries[stage] = call.same_plan_retries.get(stage, 0) + 1
            target = plan
            record = _record(rt, stage, "retry_same_plan", failure, component, scope, target, verdict)
            emit("retry_same_plan", **record.event_fields(), reason=verdict.detail, **rt.memory())
        else:
            # Sized from the OOM's figures only where they are this device's (an allocator that
            # counts bytes): on the CPU a CUDA-worded message describes some other device.
            need, budget = 0, None
            if not host_oom and memory_of(rt.device).measures_peaks:
                need = shortfall(failure.message or failure.head)
                measurements.raise_activation_floor(rt, stage, plan, failure.message or failure.head)
                # What this process could have had at the moment of failure (the OOM's own
                # figures: free plus what it held), else the budget probed now; memory other
                # processes took since preflight is not ours.
                budget = room_at_failure(failure.message or failure.head)
                if budget is None:
                    budget = probe(rt.device, max_vram=rt.max_vram, max_ram=rt.max_ram).budget_bytes
            target, action, skipped = _decide(rt, plan, (stage,) if stage == origin else (stage, origin), host_oom,
                                              need, budget)
            for name, reason in skipped:
                emit("rung_skipped", stage=stage, action=name, reason=reason, attempt=call.attempts)
            if target is None or action is None:
                if call.last_rung_retries >= len(LAST_RUNG_BACKOFF):
                    exhausted(rt, stage, failure, "no rung left that lowers this stage's peak, and retries of the "
                                                  "plan in force ran out too")
                wait = LAST_RUNG_BACKOFF[call.last_rung_retries]
                call.last_rung_retries += 1
                target = plan
                record = _record(rt, stage, "retry_same_plan", failure, component, scope, target, verdict, skipped)
                emit("retry_same_plan", **record.event_fields(),
                     reason=f"no rung left; retrying the plan in force after {wait:g} s", **rt.memory())
                sleep(wait)
                free_memory(rt.device)
            else:
                record = _record(rt, stage, action, failure, component, scope, target, verdict, skipped)
                emit("escalate", **record.event_fields(), explained=verdict.explained,
                     lossless=RUNGS[split_name(action)[0]].quality != "lossy", need_mib=round(need / 2**20, 2),
                     **rt.memory())
                state.relax.escalated_to(target)
                if verdict.cause != "others" or state.steering is None:
                    # An escalation steers the cache (the next process starts there) unless the
                    # OOM's own figures put it on another process's memory: explained, or not
                    # avoided by a retry of the same plan, it is no one-off.
                    state.steering = target
                choice = state.choice
                state.budget_at_escalation = choice.machine.budget_bytes if choice and choice.machine else None
        new_failure = switch(rt, target) if (target != state.plan or state.applied != target) else None
        if new_failure is None:
            call.seconds_lost += time.perf_counter() - t0
            measurements.restart(rt)
            emit("retry", stage=stage, attempt=call.attempts, scope=scope)
            return
        # The new plan ran out while its weights were being placed: a load-stage OOM, and the
        # ladder goes on from the plan that was being placed.
        failure, stage, scope, component, plan = new_failure, "load", "load", None, target
        free_memory(rt.device)


def _judge(rt: Runtime, stage: str, plan: Plan, failure: OOMInfo) -> Verdict:
    """Why the device ran out: the OOM's own figures, else the predicted peak against the budget."""
    state, choice = rt.state, rt.state.choice
    predicted = state.predicted.get(stage) if state.predicted_plan == plan else None
    budget = choice.machine.budget_bytes if choice is not None and choice.machine is not None else None
    return judge(failure.message or failure.head, predicted_peak=predicted, budget=budget or None)


def _record(rt: Runtime, stage: str, action: str, failure: OOMInfo, component: str | None, scope: str,
            target: Plan, verdict: Verdict, skipped: list[tuple[str, str]] | tuple = ()) -> EscalationRecord:
    call = rt.state.call
    assert call is not None
    record = EscalationRecord(stage=stage, action=action, error=failure.head, attempt=call.attempts,
                              component=component, oom_kind=failure.kind.value, scope=scope, plan=target.names,
                              skipped=tuple(skipped), cause=verdict.cause)
    rt.state.history.append(record)
    call.records.append(record)
    return record


def _decide(rt: Runtime, plan: Plan, stages: tuple[str, ...], host_oom: bool, need: int = 0,
            budget: int | None = None):
    """(next plan, rung applied, rungs skipped with why) for the first of ``stages`` with a rung left.
    Plans already on the way up from the planned plan are not taken again: two stages' OOMs
    would otherwise flip the plan between two rungs for ever."""
    ctx = rt.context()
    avoid = frozenset(rt.state.relax.path[:-1])
    skipped: list[tuple[str, str]] = []
    target = action = None
    for stage in stages:
        call = rt.state.call
        measured = rt.state.measured.get(measurements.floor_key(rt, call.shape if call is not None else Workload()))
        target, action, more = next_plan(plan, stage, host_oom=host_oom, ctx=ctx, avoid=avoid, need=need,
                                         measured=measured, budget=budget)
        skipped += more
        if target is not None:
            break
    return target, action, skipped


def exhausted(rt: Runtime, stage: str, failure: OOMInfo, why: str) -> NoReturn:
    """Park the pipeline, log, and raise :class:`AutoFitExhausted` saying what to do."""
    state, call = rt.state, rt.state.call
    records = list(call.records) if call else []
    plan, path = state.plan, state.relax.path
    park(rt)
    emit("exhausted", stage=stage, action="none", attempt=call.attempts if call else 0,
         reason=why, error=failure.head, plan=",".join(plan.names), **rt.memory())
    # What was tried: the plan in force and how it was reached from the planned plan, not only
    # this call's steps (the plan may have been escalated by earlier calls).
    on_path = {p.names for p in path}
    tried = [r.action for r in state.history if r.action in RUNGS and r.plan in on_path]
    retried = sum(r.action == "retry_same_plan" for r in records)
    if retried:
        tried.append(f"{retried} retr{'y' if retried == 1 else 'ies'} of the plan in force")
    raise AutoFitExhausted(
        exhausted_message(stage=stage, why=why, tried=tried, plan=plan.names, policy=rt.policy, error=failure.head),
        stage=stage,
        history=records,
    ) from failure.error  # the allocator's own error, its type and message (no frames)


def park(rt: Runtime) -> None:
    """After exhaustion: no hooks, weights on the CPU, nothing held; the next call re-places."""
    if rt.state.wrappers is not None:
        rt.state.wrappers.uninstall()
    try:
        tear_down(rt)
    finally:
        free_memory(rt.device)


def roll_back(rt: Runtime, stage: str, name: str, error: str) -> None:
    """A component failed (not with an OOM) on its first run after a one-way rung: restore its
    original weights, drop the rung for it, remember that in the plan cache, carry on."""
    state, call = rt.state, rt.state.call
    with suspended(rt):
        tear_down(rt)  # torn down: if the undo fails, the next call places it again
        rung = rt.ledger.entries[name].rung
        try:
            rt.ledger.undo(name)
        except CheckpointChanged as exc:
            raise CheckpointChanged(f"{exc} It was being undone because {name} failed with {error}") from None
        state.unusable.setdefault(rung, set()).add(name)
        still = any(w.rung == rung for w in rt.ledger.entries.values())
        target = state.plan if still else Plan(state.plan.placement, state.plan.extras - {rung})
        action = f"undo_{rung}"
        record = EscalationRecord(stage=stage, action=action, error=error[:200], attempt=call.attempts if call else 0,
                                  component=name, oom_kind="none", scope="stage", plan=target.names)
        state.history.append(record)
        if call is not None:
            call.records.append(record)
        emit("rolled_back", level="warning", stage=stage, action=action, component=name,
             attempt=record.attempt, error=error[:200], plan=",".join(target.names), marked_unusable=True)
        failure = switch(rt, target)
        state.dirty = True
        measurements.persist_unusable(rt)
    if failure is not None:
        on_oom(rt, "load", failure, component=None, scope="load", from_plan=target)
