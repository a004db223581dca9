"""The wrapped pipeline's runtime: it owns the state and runs the call loop, and hands each job
to the module named for it.

A call: preflight (:mod:`autofit.engine.preflight`) chooses a plan for the workload; the switch
(:mod:`autofit.engine.switch`) places the weights; the stage wrappers (:mod:`autofit.engine.wrappers`) run
each component, moving weights around it (:mod:`autofit.engine.moves`) and measuring each stage's peak
(:mod:`autofit.engine.measurements`); an OOM goes to recovery (:mod:`autofit.engine.recovery`), which asks the
ladder for the next plan and switches to it. A failed stage is retried in place; an OOM outside
any component reruns the whole call with the caller's generators restored to their state at the
start.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from collections.abc import Callable
from typing import Any

import torch

from autofit import disk
from autofit.engine import measurements, moves, preflight, recovery
from autofit.facts.components import is_vae
from autofit._diffusers import module_components
from autofit.errors import AutoFitExhausted
from autofit.events import emit
from autofit.facts.hardware import probe
from autofit.planning.context import Context, Machine, PipelineFacts, Workload
from autofit.facts.footprint import Footprint, measure
from autofit.facts.memory import held_on_host, host_available_bytes, pinned_room, snapshot
from autofit.engine.oom import OOMInfo, classify
from autofit.records import EscalationRecord
from autofit.engine.one_way import OneWayLedger
from autofit.plan import Plan
from autofit.planning.rungs import plan_refusal
from autofit.facts.cache import PlanCache
from autofit.engine.state import CallState, RngSnapshot, WrapperState
from autofit import _diffusers
from autofit.strategies import UserVae
from autofit.strategies import compiling, quantize
from autofit.strategies.residency import HostShadows
from autofit.strategies.vae import can_slice, can_tile
from autofit.engine.switch import adopted, holds_hooks, switch, tear_down
from autofit.engine.wrappers import StageWrappers


class Runtime:
    def __init__(
        self,
        pipe: Any,
        *,
        device: torch.device,
        policy: str,
        max_retries: int,
        plan: Plan,
        applied: Plan | None,
        preflight: bool = True,
        cache: PlanCache | None = None,
        max_vram: int | None = None,
        max_ram: int | None = None,
    ):
        self.pipe = pipe
        self.device = device
        self.policy = policy
        self.max_retries = max_retries
        self.preflight = preflight  # False: an explicit start plan or adopted offloading is kept
        self.cache = cache
        self.max_vram = max_vram
        self.max_ram = max_ram
        self.footprint: Footprint = measure(pipe)
        # The plan in force starts as what the pipeline is: its adopted offloading, else plain.
        self.state = WrapperState(plan=applied if applied is not None else Plan(), applied=applied,
                                  initial_plan=plan)
        self.ledger = OneWayLedger(pipe, self.footprint, device, max_vram=max_vram, max_ram=max_ram)
        self.shadows = HostShadows(device)
        self.comps: dict[str, torch.nn.Module] = module_components(pipe)
        for name, module in self.comps.items():
            if quantize.quantized_level(module) == "int8":
                fixed = quantize.adopt_int8(module)
                if fixed:
                    emit("int8_state_follows_weight", stage="load", action="adopt", component=name, layers=fixed)
        self.vaes = {n: m for n, m in self.comps.items() if is_vae(m)}
        self.vae_original = {n: UserVae(m) for n, m in self.vaes.items()}  # follows the user's later changes

    # ---- what the wrapper exposes --------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.state.plan

    @property
    def lock(self):
        return self.state.lock

    def memory(self) -> dict[str, float | None]:
        return snapshot(self.device, self.max_vram)

    def reset(self) -> None:
        """Plan again at the next call, from the plan autofit started with."""
        with self.state.lock:
            self.state.choice = None

    # ---- facts for the ladder and the planner ----------------------------------------------
    def host_room(self) -> tuple[int, int]:
        """(host RAM, pinned host RAM) a plan may hold. The pipeline's weights already in host RAM
        count as room: a plan switch releases or reuses them (a pipeline loaded on the CPU that
        then goes to model offload needs no RAM beyond what it has). Capped by ``max_ram``."""
        held, held_pinned = held_on_host(self.comps.values(), self.shadows.tensors())
        room = host_available_bytes() + held
        if self.max_ram is not None:
            room = min(room, self.max_ram)
        return room, pinned_room(room, held_pinned)

    def context(self, workload: Workload | None = None, *, unusable: dict[str, set[str]] | None = None,
                machine: Machine | None = None) -> Context:
        """What the rung table, the ladder and the planner judge against now: host room now, the
        budget preflight last probed, the pipeline's facts, and the call's workload. ``unusable``
        adds broken rungs not yet in the state (the plan cache's)."""
        vaes = list(self.vaes.values())
        room, pinned = self.host_room()
        choice = self.state.choice
        base = machine or (choice.machine if choice is not None and choice.machine is not None else None)
        if base is None:
            base = Machine(0, room, self.device.type, quant_missing=quantize.missing(self.device.type))
        machine = replace(base, host_available_bytes=room, pinned_available_bytes=pinned,
                          disk_available_bytes=disk.free_bytes(), disk_unusable=disk.unusable())
        broken = {(r, n) for r, names in self.state.unusable.items() for n in names}
        broken |= {(r, n) for r, names in (unusable or {}).items() for n in names}
        pipeline = PipelineFacts(
            footprint=self.footprint,
            has_offload_seq=getattr(self.pipe, "model_cpu_offload_seq", None) is not None,
            vae_can_tile=bool(vaes) and all(can_tile(v) for v in vaes),
            vae_can_slice=bool(vaes) and all(can_slice(v) for v in vaes),
            fp8_supported=hasattr(torch, "float8_e4m3fn"),
            broken=frozenset(broken),
            storage_locked=self.ledger.locked(),
            has_bnb=any(quantize.quantized_level(m) for m in self.comps.values()),
        )
        if workload is None:
            call = self.state.call
            workload = call.shape if call is not None else (choice.workload if choice and choice.workload else Workload())
        return Context(machine, pipeline, workload, self.policy)

    def adopt(self, enable: Callable[[], Any]) -> Any:
        """The user enables offloading through the proxy after wrapping: autofit's own placement
        is taken down first (so the two do not fight), then the user's is adopted as the plan to
        start from, exactly as when it was enabled before wrapping. Recovery escalates from it."""
        with self.lock:
            tear_down(self)
            self.shadows.drop()
            out = enable()
            placement = _diffusers.detect_placement(self.pipe)
            if placement is not None:
                storage = self.plan.storage
                adopted(self, Plan(placement, frozenset({storage} if storage else ())))
                self.preflight = False
            return out

    def reshape(self, change: Callable[[], Any]) -> Any:
        """The user changes the modules or their weights through the proxy (LoRA, IP-Adapter and
        textual-inversion loaders, fusing): a placement that holds offload hooks or streamed
        copies is taken down first, so the loader sees plain modules (diffusers' loaders undo and
        redo only the offloading they know, without the device autofit placed on), and the plan in
        force is placed again, new modules included, at the next call. Weights plainly on the
        device stay there: the loaders create the new ones next to them. In components stored in
        fp8, the new layers are made in the compute dtype (peft would make them fp8). The
        footprint is measured again afterwards."""
        with self.lock:
            applied = self.state.applied
            plain = applied is not None and applied.placement == "device" and not self.shadows.tensors() \
                and not holds_hooks(self.pipe)
            if applied is not None and not plain:
                tear_down(self)
                self.shadows.drop()
            try:
                with ExitStack() as stack:
                    for module in module_components(self.pipe).values():
                        stack.enter_context(_diffusers.new_layers_in_compute_dtype(module))
                    return change()
            finally:
                # The weights changed (a LoRA's layers added, or removed): predictions and the
                # plan cache key follow them, so the next call plans for the pipeline as it is.
                self.footprint = measure(self.pipe)

    # ---- one call -------------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[..., Any] | None = None) -> Any:
        """Run the pipeline (or ``fn``, one of its methods that runs components) with recovery."""
        state = self.state
        with state.lock:
            call = state.call = CallState(preflight.workload(self.pipe, args, kwargs), RngSnapshot(kwargs))
            call.applied_at_start = state.applied != state.plan
            self.comps = module_components(self.pipe)  # once per call: pipe.components is not free
            try:
                self._prepare(self._start_plan(args, kwargs))
                compiling.settle(self.pipe, state.plan)  # compile= : the mode for the plan placed
                # Chunks count images: with classifier-free guidance a chunk keeps an image's pair.
                state.denoise_chunks = state.plan.denoise_chunks(call.shape.batch)
                while True:
                    attempt_started = time.perf_counter()
                    result, failure = self._run_once(args, kwargs, fn)
                    if failure is None:
                        self._finish()
                        return result
                    call.seconds_lost += time.perf_counter() - attempt_started
                    # Pipeline code between component calls: blamed on the stage it feeds.
                    recovery.on_oom(self, state.wrappers.glue_stage(), failure, component=None, scope="call")
                    call.rng.restore()
                    self._prepare(state.plan)
            finally:
                state.wrappers = None
                state.call = None

    def _start_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        """The plan this call starts from: preflight's choice for a new workload, the plan autofit
        started with at the first call (or after ``reset``), else the plan in force."""
        state = self.state
        if state.relax.escalated and self._memory_came_back():
            state.choice = None  # plan again now, for the memory there is
        fresh = state.choice is None
        choice = preflight.choose(self, args, kwargs)
        if choice is not None:
            # Taken before the switch: a plan that fails to place is not chosen again for this workload.
            state.choice = choice
            if choice.measured is not None and choice.key is not None:
                state.measured[choice.key] = choice.measured
            for rung, names in choice.unusable.items():
                state.unusable.setdefault(rung, set()).update(names)
            if choice.plan is not None:
                state.predicted, state.predicted_plan = choice.predicted, choice.plan
                state.dirty = True
                state.relax.plan_chosen(choice.plan)
                state.steering = choice.plan
                return choice.plan
        start = state.initial_plan if fresh else state.plan
        if fresh or not state.relax.path:
            state.relax.plan_chosen(start)
            state.steering = start
        lighter = state.relax.probe(time.perf_counter() - state.started)
        if lighter is None:
            return start
        refused = plan_refusal(lighter, self.context())
        if refused is not None:
            # Not even tried: a plan that needs more host RAM than there is could bring the
            # kernel's OOM killer, which ends the process instead of raising.
            state.relax.probe_refused()
            emit("probe_skipped", stage="load", action="probe", plan=",".join(lighter.names) or "device",
                 rung=refused[0], reason=refused[1])
            return start
        record = EscalationRecord(stage="load", action="probe", error="", attempt=0, component=None, oom_kind="none",
                                  scope="call", plan=lighter.names)
        state.history.append(record)
        emit("probe", stage="load", action="probe", plan=",".join(lighter.names) or "device",
             came_from=",".join(start.names) or "device", after_calls=state.relax.wait)
        return lighter

    def _memory_came_back(self) -> bool:
        """Whether the device budget grew well past what it was when the plan was last escalated
        (another process let go): then the planner is asked again at once. CUDA only."""
        before = self.state.budget_at_escalation
        if before is None or self.device.type != "cuda":
            return False
        now = probe(self.device, max_vram=self.max_vram, max_ram=self.max_ram).budget_bytes
        if now < 1.25 * before:
            return False
        emit("memory_came_back", stage="load", action="replan", budget_gib=round(now / 2**30, 3),
             was_gib=round(before / 2**30, 3))
        self.state.budget_at_escalation = None
        return True

    def _prepare(self, target: Plan) -> None:
        """Put the weights where ``target`` says (the ``load`` stage), escalating on OOM. A
        failure that is not an OOM passes through with the plan in force unchanged."""
        state = self.state
        if state.applied is not None and not _diffusers.placement_intact(self.pipe, state.applied.placement):
            state.applied = None  # taken down behind our back (a pipeline sharing the components)
        while True:
            failure: OOMInfo | None = None
            if state.applied == target and state.plan == target:
                try:
                    moves.enforce_residency(self, target)
                except BaseException as exc:
                    failure = classify(exc)
                    if failure is None:
                        raise
            else:
                failure = switch(self, target)
            if failure is None:
                return
            recovery.on_oom(self, "load", failure, component=None, scope="load", from_plan=target)
            target = state.plan

    def _run_once(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                  fn: Callable[..., Any] | None = None) -> tuple[Any, OOMInfo | None]:
        wrappers = self.state.wrappers = StageWrappers(self.pipe, self)
        self.state.call.entered = None
        wrappers.install()
        failure: OOMInfo | None = None
        try:
            return (fn or self.pipe)(*args, **kwargs), None
        except AutoFitExhausted:
            raise
        except BaseException as exc:
            failure = classify(exc)
            if failure is None:
                raise
        finally:
            wrappers.uninstall()
        return None, failure

    def _finish(self) -> None:
        state, call = self.state, self.state.call
        assert call is not None
        if state.wrappers is not None:
            state.wrappers.remember()  # the order of its stages, to blame glue OOMs next time
        measurements.transition(self, None)
        total = time.perf_counter() - call.started
        plan = state.plan
        stage_peaks = {k: round(v / 2**30, 3) for k, v in call.stage_peaks.items()
                       if call.stage_plans.get(k, plan) == plan}  # the plan reported below
        state.calls += 1
        state.calls_recovered += bool(call.attempts)
        state.last_call = {
            "seconds": round(total, 4),
            "attempts": call.attempts,
            "seconds_lost": round(call.seconds_lost, 4),
            "plan": plan.names,
            "stage_peaks_gib": stage_peaks,  # peak allocated per stage, on any accelerator (autofit.facts.devices)
        }
        if state.relax.probing is not None:
            state.relax.call_succeeded()  # the probe held for a whole call: the step down stays
            if state.steering not in state.relax.path:
                state.steering = plan
            record = EscalationRecord(stage="load", action="relaxed", error="", attempt=0, component=None,
                                      oom_kind="none", scope="call", plan=plan.names)
            state.history.append(record)
            emit("relaxed", stage="load", action="relaxed", plan=",".join(plan.names) or "device",
                 planned=state.relax.path[-1] == state.relax.planned)
            state.dirty = True
        else:
            state.relax.call_succeeded()
        state.last_call["probe_seconds_lost"] = round(state.relax.probe_seconds_lost, 4)
        state.last_call.update(compiling.report(self.pipe))  # compile= : the call's compile seconds
        if state.dirty or call.attempts or call.applied_at_start:
            measurements.remember(self, total)
        if call.attempts:
            emit("recovered", attempts=call.attempts, seconds=round(total, 3), seconds_lost=round(call.seconds_lost, 3),
                 stages=",".join(r.stage for r in call.records), plan=",".join(plan.names), **self.memory())

    # ---- the stage wrappers' hooks ---------------------------------------------------------
    @property
    def denoise_chunks(self) -> int:
        return self.state.denoise_chunks

    def before(self, name: str, stage: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        call = self.state.call
        if call is not None:
            call.entered = stage
            if stage != call.stage:
                measurements.transition(self, stage)
        if stage == "denoise":
            return args, kwargs  # the hot path: nothing to do per step
        return moves.before(self, name, stage, args, kwargs)

    def after(self, name: str, stage: str) -> None:
        if self.ledger.unvalidated:
            self.ledger.validated(name)  # its one-way rung has now produced an output
        moves.after(self, name, stage)

    def recover(self, stage: str, component: str, failure: OOMInfo, seconds: float) -> None:
        """A component ran out of memory (called outside ``except``): escalate, then it retries."""
        if self.state.call is not None:
            self.state.call.seconds_lost += seconds
        recovery.on_oom(self, stage, failure, component=component, scope="stage")

    def can_roll_back(self, name: str) -> bool:
        return self.ledger.can_roll_back(name)

    def roll_back(self, stage: str, name: str, error: str) -> None:
        recovery.roll_back(self, stage, name, error)
