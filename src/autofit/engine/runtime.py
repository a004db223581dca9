"""The wrapped pipeline's runtime: a thin coordinator. It builds the engine's objects, each the
owner of its state, and runs the call loop between them.

- :class:`~autofit.engine.placement.Placement`: where the weights are (the plan in force, what is
  placed, the one-way ledger, the host copies, the rungs found broken), and the moves around each stage;
- :class:`~autofit.engine.course.Course`: the plan to start from, its way up and back down, the
  plan that steers the plan cache;
- :class:`~autofit.engine.measurements.Measurements`: stage peaks, learned activations, the plan cache writes;
- :class:`~autofit.engine.preflight.Preflight`: the plan for a new workload;
- :class:`~autofit.engine.recovery.Recovery`: the step after an OOM;
- :class:`~autofit.engine.wrappers.StageWrappers`: the component wrappers, talking to this
  runtime through :class:`~autofit.engine.wrappers.StageHooks`;
- :class:`~autofit.engine.readings.Readings` and :class:`~autofit.engine.survey.Survey`: what the
  machine reads, and what plans are judged against.

A call: preflight chooses a plan for the workload; the placement places it; the stage wrappers
run each component; an OOM goes to recovery, which decides and has the placement switch. A
failed stage is retried in place; an OOM outside any component reruns the whole call with the
caller's generators restored to their state at the start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from autofit import _diffusers
from autofit.errors import AutoFitExhausted
from autofit.events import emit
from autofit.facts.cache import PlanCache
from autofit.facts.footprint import Footprint
from autofit.planning.context import Context, Workload
from autofit.planning.rungs import plan_refusal
from autofit.plan import Plan
from autofit.records import EscalationRecord
from autofit.strategies import compiling
from autofit.engine.course import Course
from autofit.engine.measurements import Measurements
from autofit.engine.oom import OOMInfo, classify
from autofit.engine.placement import Placement
from autofit.engine.preflight import Preflight, workload
from autofit.engine.readings import Readings
from autofit.engine.recovery import Recovery
from autofit.engine.relax import Relaxation
from autofit.engine.state import CallState, Choice, History, RngSnapshot
from autofit.engine.survey import Survey
from autofit.engine.wrappers import StageWrappers
from autofit.units import gib


class Runtime:
    """Implements :class:`~autofit.engine.wrappers.StageHooks` for its stage wrappers.
    ``readings`` and ``relaxation`` are the seams a test or an embedder may pass: what is read of
    the machine, and how probes back down are paced."""

    def __init__(self, pipe: Any, *, device: torch.device, policy: str, max_retries: int, plan: Plan,
                 applied: Plan | None, preflight: bool = True, cache: PlanCache | None = None,
                 max_vram: int | None = None, max_ram: int | None = None, readings: Readings | None = None,
                 relaxation: Relaxation[Plan] | None = None):
        self._pipe, self._device, self._policy = pipe, device, policy
        self._lock = threading.RLock()
        self._readings = readings if readings is not None else Readings(device, max_vram=max_vram, max_ram=max_ram)
        self._history = History()
        self._wrappers = StageWrappers(pipe, self)
        self._placement = Placement(pipe, device, applied=applied, max_vram=max_vram, max_ram=max_ram,
                                    suspend=self._wrappers.suspended)
        self._survey = Survey(pipe, self._placement, self._readings, policy)
        self._course = Course(plan, relaxation)
        self._measurements = Measurements(device, cache)
        self._preflight = Preflight(pipe, readings=self._readings, survey=self._survey, cache=cache, policy=policy,
                                    enabled=preflight)
        self._recovery = Recovery(placement=self._placement, course=self._course, measurements=self._measurements,
                                  survey=self._survey, readings=self._readings, history=self._history,
                                  wrappers=self._wrappers, policy=policy, max_retries=max_retries)
        self._choice: Choice | None = None  # the last workload preflight saw; None: plan afresh
        self._call: CallState | None = None
        self._last_call: dict[str, Any] = {}
        self._calls = 0  # calls that succeeded (proxy.autofit.summary())
        self._calls_recovered = 0  # of which recovered from at least one failure

    # ---- what the wrapper exposes (read-only: the objects change through their own methods) ---
    @property
    def pipe(self) -> Any:
        return self._pipe

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def lock(self) -> Any:  # a threading.RLock
        return self._lock

    @property
    def readings(self) -> Readings:
        return self._readings

    @property
    def history(self) -> History:
        return self._history

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def survey(self) -> Survey:
        return self._survey

    @property
    def course(self) -> Course:
        return self._course

    @property
    def measurements(self) -> Measurements:
        return self._measurements

    @property
    def calls(self) -> int:
        """Calls that succeeded."""
        return self._calls

    @property
    def calls_recovered(self) -> int:
        """Of which recovered from at least one failure."""
        return self._calls_recovered

    @property
    def plan(self) -> Plan:
        return self._placement.plan

    @property
    def footprint(self) -> Footprint:
        return self._placement.footprint

    @property
    def choice(self) -> Choice | None:
        return self._choice

    @property
    def last_call(self) -> dict[str, Any]:
        return dict(self._last_call)

    def memory(self) -> dict[str, float | None]:
        return self._readings.memory()

    def reset(self) -> None:
        """Plan again at the next call, from the plan autofit started with."""
        with self._lock:
            self._choice = None
            self._measurements.forget_plans()  # afresh: not the plans that ran before

    def context(self, workload: Workload | None = None) -> Context:
        """What the rung table, the ladder and the planner judge against now: the call's
        workload (else the last one preflight saw) and the budget preflight last probed."""
        choice, call = self._choice, self._call
        if workload is None:
            workload = call.shape if call is not None else (
                choice.workload if choice is not None and choice.workload else Workload())
        return self._survey.context(workload, machine=choice.machine if choice is not None else None)

    def adopt(self, enable: Callable[[], Any]) -> Any:
        """The user enables offloading through the proxy after wrapping: autofit's own placement
        is taken down first (so the two do not fight), then the user's is adopted as the plan to
        start from, exactly as when it was enabled before wrapping. Recovery escalates from it."""
        with self._lock:
            out = self._placement.take_down_for(enable)
            found = _diffusers.detect_placement(self._pipe)
            if found is not None:
                storage = self._placement.plan.storage
                plan = Plan(found, frozenset({storage} if storage else ()))
                self._placement.adopt(plan)
                self._course.adopted(plan)
                self._choice = None  # plan afresh (for the cache key) at the next call
                self._preflight.turn_off()
            return out

    def reshape(self, change: Callable[[], Any]) -> Any:
        """The user changes the modules or their weights through the proxy (LoRA, IP-Adapter and
        textual-inversion loaders, fusing): see :meth:`Placement.reshape`."""
        with self._lock:
            return self._placement.reshape(change)

    # ---- one call -------------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[..., Any] | None = None) -> Any:
        """Run the pipeline (or ``fn``, one of its methods that runs components) with recovery."""
        placement = self._placement
        with self._lock:
            call = self._call = CallState(workload(self._pipe, args, kwargs), RngSnapshot(kwargs))
            call.applied_at_start = placement.applied != placement.plan
            placement.refresh_components()
            self._measurements.begin_call()
            try:
                self._prepare(self._start_plan(args, kwargs))
                compiling.settle(self._pipe, self._placement.plan)  # compile= : the mode for the plan placed
                while True:
                    attempt_started = time.perf_counter()
                    result, failure = self._run_once(args, kwargs, fn)
                    if failure is None:
                        self._finish(call)
                        return result
                    call.seconds_lost += time.perf_counter() - attempt_started
                    # Pipeline code between component calls: blamed on the stage it feeds.
                    call.seconds_lost += self._recovery.on_oom(call, self._choice, self._wrappers.glue_stage(),
                                                               failure, component=None, scope="call")
                    call.rng.restore()
                    self._prepare(placement.plan)
            finally:
                self._call = None

    def _start_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        """The plan this call starts from: preflight's choice for a new workload, the plan autofit
        started with at the first call (or after ``reset``), else the plan in force, or one step
        back down from it (a probe)."""
        course, placement = self._course, self._placement
        if course.escalated and self._memory_came_back():
            self._choice = None  # plan again now, for the memory there is
            self._measurements.forget_plans()
        fresh = self._choice is None
        choice = self._preflight.choose(args, kwargs, last=self._choice, placement=placement,
                                        measured=self._measurements.measured, worked=self._measurements.worked,
                                        fallback=course.start if fresh else placement.plan)
        if choice is not None:
            # Taken before the switch: a plan that fails to place is not chosen again for this workload.
            self._choice = choice
            self._measurements.chose(choice)
            for rung, names in choice.broken.items():
                placement.mark_broken(rung, names)
            if choice.plan is not None:
                course.chosen(choice.plan)
                return choice.plan
        start = course.start if fresh else placement.plan
        if fresh or not course.path:
            course.chosen(start)
        return self._probe_down(start)

    def _probe_down(self, start: Plan) -> Plan:
        """After a run of successful calls on an escalated plan: one step back down, if the machine
        can hold it (see :mod:`autofit.engine.relax`)."""
        lighter = self._course.probe()
        if lighter is None:
            return start
        refused = plan_refusal(lighter, self.context())
        if refused is not None:
            # Not even tried: a plan that needs more host RAM than there is could bring the
            # kernel's OOM killer, which ends the process instead of raising.
            self._course.probe_refused()
            emit("probe_skipped", stage="load", action="probe", plan=",".join(lighter.names) or "device",
                 rung=refused[0], reason=refused[1])
            return start
        self._history.add(EscalationRecord(stage="load", action="probe", error="", attempt=0, component=None,
                                          oom_kind="none", scope="call", plan=lighter.names))
        emit("probe", stage="load", action="probe", plan=",".join(lighter.names) or "device",
             came_from=",".join(start.names) or "device", after_calls=self._course.wait)
        return lighter

    def _memory_came_back(self) -> bool:
        """Whether the device budget grew well past what it was when the plan was last escalated
        (another process let go): then the planner is asked again at once. CUDA only."""
        before = self._course.budget_at_escalation
        if before is None or self._device.type != "cuda":
            return False
        now = self._readings.hardware().budget_bytes
        if now < 1.25 * before:
            return False
        emit("memory_came_back", stage="load", action="replan", budget_gib=gib(now, 3),
             was_gib=gib(before, 3))
        self._course.budget_seen()
        return True

    def _prepare(self, target: Plan) -> None:
        """Put the weights where ``target`` says (the ``load`` stage), escalating on OOM. A
        failure that is not an OOM passes through with the plan in force unchanged."""
        call = self._call
        assert call is not None
        self._placement.check_intact()
        while True:
            failure = self._placement.place(target, call.shape)
            if failure is None:
                return
            call.seconds_lost += self._recovery.on_oom(call, self._choice, "load", failure, component=None,
                                                       scope="load", from_plan=target)
            target = self._placement.plan

    def _run_once(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                  fn: Callable[..., Any] | None = None) -> tuple[Any, OOMInfo | None]:
        assert self._call is not None
        self._call.entered = None
        self._wrappers.new_attempt()
        self._wrappers.install()
        failure: OOMInfo | None = None
        try:
            return (fn or self._pipe)(*args, **kwargs), None
        except AutoFitExhausted:
            raise
        except BaseException as exc:
            failure = classify(exc)
            if failure is None:
                raise
        finally:
            self._wrappers.uninstall()
        return None, failure

    def _finish(self, call: CallState) -> None:
        self._wrappers.remember()  # the order of its stages, to blame glue OOMs next time
        plan = self._placement.plan
        self._measurements.transition(None, plan)
        total = time.perf_counter() - call.started
        attempts = call.retries.attempts
        self._calls += 1
        self._calls_recovered += bool(attempts)
        self._last_call = {
            "seconds": round(total, 4),
            "attempts": attempts,
            "seconds_lost": round(call.seconds_lost, 4),
            "plan": plan.names,
            # peak allocated per stage, on any accelerator (autofit.facts.devices)
            "stage_peaks_gib": {k: gib(v, 3) for k, v in self._measurements.peaks_under(plan).items()},
        }
        if self._course.succeeded(plan):  # the probe held for a whole call: the step down stays
            self._history.add(EscalationRecord(stage="load", action="relaxed", error="", attempt=0, component=None,
                                              oom_kind="none", scope="call", plan=plan.names))
            emit("relaxed", stage="load", action="relaxed", plan=",".join(plan.names) or "device",
                 planned=self._course.path[-1] == self._course.planned)
            self._measurements.learned()
        self._last_call["probe_seconds_lost"] = round(self._course.probe_seconds_lost, 4)
        self._last_call.update(compiling.report(self._pipe))  # compile= : the call's compile seconds
        if self._measurements.dirty or attempts or call.applied_at_start:
            self._measurements.remember(total, plan=plan, steer=self._course.steering or plan, choice=self._choice,
                                       shape=call.shape, footprint=self._placement.footprint,
                                       broken=self._placement.broken, predict=self._preflight.predicted_peaks)
        if attempts:
            emit("recovered", attempts=attempts, seconds=round(total, 3), seconds_lost=round(call.seconds_lost, 3),
                 stages=",".join(r.stage for r in call.retries.records), plan=",".join(plan.names), **self.memory())

    # ---- the stage wrappers' hooks (StageHooks) ---------------------------------------------
    @property
    def denoise_chunks(self) -> int:
        call = self._call
        return self._placement.plan.denoise_chunks(call.shape.batch if call is not None else 1)

    def before(self, name: str, stage: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        call = self._call
        if call is not None:
            call.entered = stage
            if stage != self._measurements.stage:
                self._measurements.transition(stage, self._placement.plan)
        if stage == "denoise":
            return args, kwargs  # the hot path: nothing to do per step
        args, kwargs, shape = self._placement.before(call.shape if call else None, name, stage, args, kwargs)
        if call is not None and shape is not None:
            call.shape = shape
        return args, kwargs

    def after(self, name: str, stage: str) -> None:
        self._placement.after(name, stage)

    def on_oom(self, stage: str, component: str, failure: OOMInfo, seconds: float) -> None:
        """A component ran out of memory (called outside ``except``): escalate, then it retries."""
        call = self._call
        assert call is not None
        call.seconds_lost += seconds
        call.seconds_lost += self._recovery.on_oom(call, self._choice, stage, failure, component=component,
                                                   scope="stage")

    def can_roll_back(self, name: str) -> bool:
        return self._placement.ledger.can_roll_back(name)

    def roll_back(self, stage: str, name: str, error: str) -> None:
        call = self._call
        assert call is not None
        call.seconds_lost += self._recovery.roll_back(call, self._choice, stage, name, error)
