"""The recovery loop and its state: plan, history, the call in progress.

A failed stage is retried in place by the stage wrappers (:mod:`autofit.stages`), which call
:meth:`Runtime.recover` *after* leaving their ``except`` block, so the failed attempt's tensors
are already unreachable when memory is freed and the plan changes. An OOM outside any component
reruns the whole call with the caller's generators restored to their state at the start.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import _diffusers
from .errors import AutoFitExhausted, CheckpointChanged
from .events import emit
from .footprint import Footprint, measure
from .ladder import SPECS, Facts, next_plan
from .memory import held_on_host, host_available_bytes, pinned_room, release_pinned_cache, snapshot
from .oom import OOMInfo, OOMKind, classify, free_memory
from .plan import CallShape, Plan
from .cache import PlanCache
from .stages import StageTracker, module_components, role_of
from .strategies import VaeSettings, apply_fp8, configure_vae, place, teardown
from .strategies import quantize
from .strategies.casting import held_bytes, restore_original
from .strategies.placement import CPU, module_device, on_demand, unpin
from .strategies.residency import HostShadows
from .strategies.vae import can_slice, can_tile


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    """One escalation step: what failed where, and what was applied."""

    stage: str
    action: str
    error: str
    attempt: int
    component: str | None
    oom_kind: str
    scope: str  # "stage": retried in place; "call": whole call rerun; "load": while placing weights
    plan: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OneWay:
    """A one-way rung applied to a component, and how to undo it (None: no copy could be kept)."""

    strategy: str
    undo: Callable[[], None] | None


@dataclass(slots=True)
class CallState:
    started: float
    shape: CallShape
    attempts: int = 0
    seconds_lost: float = 0.0
    records: list[EscalationRecord] = field(default_factory=list)


def _shape_from_kwargs(args: Sequence[Any], kwargs: dict[str, Any]) -> CallShape:
    prompt = kwargs.get("prompt", args[0] if args else None)
    n_prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    per = kwargs.get("num_images_per_prompt") or 1
    return CallShape(batch=n_prompts * int(per), height=kwargs.get("height"), width=kwargs.get("width"))


def _generators(kwargs: dict[str, Any]) -> list[torch.Generator]:
    gen = kwargs.get("generator")
    if isinstance(gen, torch.Generator):
        return [gen]
    if isinstance(gen, (list, tuple)):
        return [g for g in gen if isinstance(g, torch.Generator)]
    return []


@functools.lru_cache(maxsize=32)
def _call_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a pipeline class's ``__call__`` (height, num_frames, steps, guidance)."""
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


class _RngSnapshot:
    """The caller's generators and the global RNGs at the start of a call."""

    def __init__(self, kwargs: dict[str, Any]):
        self._gens = [(g, g.get_state()) for g in _generators(kwargs)]
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        for g, state in self._gens:
            g.set_state(state)
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


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
        cache: "PlanCache | None" = None,
        max_vram: int | None = None,
        max_ram: int | None = None,
    ):
        self.pipe = pipe
        self.device = device
        self.policy = policy
        self.max_retries = max_retries
        self.plan = plan
        self.initial_plan = plan
        self.history: list[EscalationRecord] = []
        self.footprint: Footprint = measure(pipe)
        self.lock = threading.RLock()
        self._applied: Plan | None = applied
        self._call: CallState | None = None
        self._tracker: StageTracker | None = None
        self._comps: dict[str, torch.nn.Module] = module_components(pipe)
        self._shadows = HostShadows(device)
        self.preflight = preflight
        self.cache = cache
        self.max_vram = max_vram
        self.max_ram = max_ram
        self._key: str | None = None  # plan-cache key of the workload the plan was chosen for
        self._fixed_plan = not preflight  # an explicit start plan or adopted offloading is kept
        self.predicted: dict[str, int] = {}
        self._predicted_plan: Plan | None = None
        self._machine: Any = None  # the planner's Machine and Workload of the current workload
        self._wl: Any = None
        self.measured: dict[str, dict[str, int]] = {}  # key -> stage -> measured activation bytes
        self._stage: str | None = None
        self._stage_peaks: dict[str, int] = {}
        self._stage_plans: dict[str, Plan] = {}  # the plan each stage's peak was measured under
        self._dirty = False
        self._applied_this_call = False
        self._signature: tuple[int, int, int, int] | None = None  # workload of the last plan choice
        self.denoise_chunks = 1
        # One-way rungs: component -> (storage rung, undo or None when no copy could be kept),
        # components changed but not yet seen to work, and (strategy -> components) found broken,
        # remembered in the plan cache.
        self._one_way: dict[str, OneWay] = {}
        self._unvalidated: set[str] = set()
        self.unusable: dict[str, set[str]] = {}
        self.last_call: dict[str, Any] = {}
        comps = module_components(pipe)
        for name, module in comps.items():
            if quantize.quantized_level(module) == "int8":
                fixed = quantize.adopt_int8(module)
                if fixed:
                    emit("int8_state_follows_weight", stage="load", action="adopt", component=name, layers=fixed)
        self._vaes = {n: m for n, m in comps.items() if role_of(n) == "decode"}
        self._vae_original = {n: VaeSettings.read(m) for n, m in self._vaes.items()}

    # ---- facts for the ladder -------------------------------------------------------------
    def host_room(self) -> tuple[int, int]:
        """(host RAM, pinned host RAM) a plan may hold. The pipeline's weights already in host RAM
        count as room: a plan switch releases or reuses them (a pipeline loaded on the CPU that
        then goes to model offload needs no RAM beyond what it has). Capped by ``max_ram``."""
        held, held_pinned = held_on_host(self._comps.values(), self._shadows.tensors())
        room = host_available_bytes() + held
        if self.max_ram is not None:
            room = min(room, self.max_ram)
        return room, pinned_room(room, held_pinned)

    def facts(self) -> Facts:
        vaes = list(self._vaes.values())
        room, pinned = self.host_room()
        return Facts(
            footprint=self.footprint,
            device_type=self.device.type,
            host_available=room,
            pinned_available=pinned,
            has_offload_seq=getattr(self.pipe, "model_cpu_offload_seq", None) is not None,
            vae_can_tile=bool(vaes) and all(can_tile(v) for v in vaes),
            vae_can_slice=bool(vaes) and all(can_slice(v) for v in vaes),
            fp8_supported=hasattr(torch, "float8_e4m3fn"),
            fp8_blocked=frozenset(self.unusable.get("fp8", ())),
            quant_missing=quantize.missing(self.device.type),
            quant_blocked=frozenset((s, n) for s in quantize.LEVELS for n in self.unusable.get(s, ())),
            storage_locked=self._storage_locked(),
            has_bnb=any(quantize.quantized_level(m) for m in self._comps.values()),
        )

    def _storage_locked(self) -> str | None:
        """The storage rung applied to some component without a way back, if any."""
        return next((w.strategy for w in self._one_way.values() if w.undo is None), None)

    def memory(self) -> dict[str, float | None]:
        return snapshot(self.device, self.max_vram)

    # ---- one call -------------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.lock:
            self._call = CallState(time.perf_counter(), _shape_from_kwargs(args, kwargs))
            self._applied_this_call = self._applied != self.plan
            self._comps = module_components(self.pipe)  # once per call: pipe.components is not free
            self._stage, self._stage_peaks, self._stage_plans = None, {}, {}
            rng = _RngSnapshot(kwargs)
            try:
                self._choose_plan(args, kwargs)
                self._prepare()
                # Chunks count images: with classifier-free guidance a chunk keeps an image's pair.
                self.denoise_chunks = self.plan.denoise_chunks(self._call.shape.batch)
                while True:
                    attempt_started = time.perf_counter()
                    result, failure = self._run_once(args, kwargs)
                    if failure is None:
                        self._finish()
                        return result
                    stage = self._tracker.last_stage if self._tracker and self._tracker.last_stage else "encode"
                    self._call.seconds_lost += time.perf_counter() - attempt_started
                    self._escalate(stage, failure, component=None, scope="call")
                    rng.restore()
                    self._prepare()
            finally:
                self._tracker = None
                self._call = None

    def _run_once(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, OOMInfo | None]:
        self._tracker = StageTracker(self.pipe, self)
        self._tracker.install()
        failure: OOMInfo | None = None
        try:
            return self.pipe(*args, **kwargs), None
        except AutoFitExhausted:
            raise
        except BaseException as exc:
            failure = classify(exc)
            if failure is None:
                raise
        finally:
            if self._tracker is not None:
                self._tracker.uninstall()
        return None, failure

    def _finish(self) -> None:
        cs = self._call
        assert cs is not None
        self._stage_transition(None)
        total = time.perf_counter() - cs.started
        stage_peaks = {k: round(v / 2**30, 3) for k, v in self._stage_peaks.items()
                       if self._stage_plans.get(k, self.plan) == self.plan}  # the plan reported below
        self.last_call = {
            "seconds": round(total, 4),
            "attempts": cs.attempts,
            "seconds_lost": round(cs.seconds_lost, 4),
            "plan": self.plan.names,
            "stage_peaks_gib": stage_peaks,  # CUDA only: max_memory_allocated per stage
        }
        if self._dirty or cs.attempts or self._applied_this_call:
            self._remember(total)
        if cs.attempts:
            emit(
                "recovered",
                attempts=cs.attempts,
                seconds=round(total, 3),
                seconds_lost=round(cs.seconds_lost, 3),
                stages=",".join(r.stage for r in cs.records),
                plan=",".join(self.plan.names),
                **self.memory(),
            )

    # ---- load stage -----------------------------------------------------------------------
    def _prepare(self) -> None:
        """Put the weights where the plan says (the ``load`` stage), escalating on OOM."""
        while True:
            failure: OOMInfo | None = None
            try:
                if self._applied != self.plan:
                    self._switch(self.plan)
                else:
                    self._enforce_residency()
            except BaseException as exc:
                failure = classify(exc)
                if failure is None:
                    raise
            if failure is None:
                return
            self._escalate("load", failure, component=None, scope="load")

    def _enforce_residency(self) -> None:
        """Undo per-call moves (weights moved off the device for decode) and re-assert plan
        invariants that diffusers may have reset (it re-hooks every component after each call)."""
        if self.plan.placement == "device":
            for name, module in module_components(self.pipe).items():
                here = module_device(module)
                if on_demand(name, self.plan):
                    if here not in (None, CPU):
                        self._shadows.offload(module)
                elif here not in (None, self.device):
                    self._shadows.onload(module)
        elif "vae_cpu" in self.plan.extras:
            for vae in self._vaes.values():
                _diffusers.remove_component_hooks(vae)
                if module_device(vae) != CPU:
                    vae.to(CPU)

    # ---- stage hooks, called by the wrappers ----------------------------------------------
    def before(self, name: str, stage: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if stage != self._stage:
            self._stage_transition(stage)
        if stage == "denoise":
            return args, kwargs  # the hot path: nothing to do per step
        plan = self.plan
        module = self._comps.get(name)
        if stage == "encode" and plan.placement == "device" and "offload_encoders" in plan.extras:
            if module is not None and module_device(module) != self.device:
                self._shadows.onload(module)
            # Pipelines send the inputs to where the encoder was (diffusers asks the module for
            # its execution device): bring them along, as accelerate's hooks would.
            args, kwargs = _to_device(args, self.device), _to_device(kwargs, self.device)
        elif stage == "decode":
            z = args[0] if args else kwargs.get("z")
            if isinstance(z, torch.Tensor) and z.dim() >= 4 and self._call is not None:
                self._call.shape = replace(
                    self._call.shape, batch=int(z.shape[0]), latent_hw=(int(z.shape[-2]), int(z.shape[-1]))
                )
            if module is not None:
                configure_vae(
                    module,
                    original=self._vae_original[name],
                    slicing="vae_slicing" in plan.extras,
                    tiling=plan.tiling,
                    latent_hw=self._call.shape.latent_hw if self._call else None,
                )
            if plan.placement == "device" and "offload_for_decode" in plan.extras:
                for other, m in self._comps.items():
                    if role_of(other) != "decode" and module_device(m) == self.device:
                        self._shadows.offload(m)
            if "vae_cpu" in plan.extras:
                args, kwargs = _to_device(args, CPU), _to_device(kwargs, CPU)
        return args, kwargs

    def after(self, name: str, stage: str) -> None:
        if self._unvalidated:
            self._unvalidated.discard(name)  # its one-way rung has now produced an output
        plan = self.plan
        if stage == "encode" and plan.placement == "device" and "offload_encoders" in plan.extras:
            module = self._comps.get(name)
            if module is not None:
                self._shadows.offload(module)

    def recover(self, stage: str, component: str, failure: OOMInfo, seconds: float) -> None:
        """Called by a stage wrapper after its component ran out of memory (outside ``except``)."""
        if self._call is not None:
            self._call.seconds_lost += seconds
        self._escalate(stage, failure, component=component, scope="stage")

    # ---- one-way rungs that break a component ------------------------------------------------
    def can_roll_back(self, name: str) -> bool:
        return name in self._unvalidated and name in self._one_way and self._one_way[name].undo is not None

    def roll_back(self, stage: str, name: str, error: str) -> None:
        """A component failed (not with an OOM) on its first run after a one-way rung: restore its
        original weights, drop the rung for it, remember that in the plan cache, carry on."""
        tracker = self._tracker
        reinstall = tracker is not None and tracker.installed
        if reinstall:
            tracker.uninstall()
        try:
            teardown(self.pipe)
            self._applied = None  # torn down: if the undo fails, the next call places it again
            strategy = self._one_way[name].strategy
            try:
                self._undo_one_way(name)
            except CheckpointChanged as exc:
                raise CheckpointChanged(f"{exc} It was being undone because {name} failed with {error}") from None
            self.unusable.setdefault(strategy, set()).add(name)
            still = any(w.strategy == strategy for w in self._one_way.values())
            target = self.plan if still else Plan(self.plan.placement, self.plan.extras - {strategy})
            action = f"undo_{strategy}"
            record = EscalationRecord(stage=stage, action=action, error=error[:200],
                                      attempt=self._call.attempts if self._call else 0, component=name,
                                      oom_kind="none", scope="stage", plan=target.names)
            self.history.append(record)
            if self._call is not None:
                self._call.records.append(record)
            emit("rolled_back", level="warning", stage=stage, action=action, component=name,
                 attempt=record.attempt, error=error[:200], plan=",".join(target.names),
                 marked_unusable=True)
            self.plan, self._applied = target, None
            self._apply(None, target)
            self._applied = target
            self._dirty = True
            self._persist_unusable()
        finally:
            if reinstall and tracker is not None:
                tracker.install()

    def _undo_one_way(self, name: str) -> None:
        """Undo the one-way rung on ``name``; if its checkpoint changed on disk, it stays applied for good."""
        way = self._one_way[name]
        assert way.undo is not None
        try:
            way.undo()
        except CheckpointChanged:
            self._one_way[name] = OneWay(way.strategy, None)
            raise
        del self._one_way[name]
        self._unvalidated.discard(name)

    def _merged_unusable(self, record: dict | None) -> dict[str, list[str]]:
        """This process's broken rungs together with those another process stored."""
        out = {k: set(v) for k, v in (record or {}).get("unusable", {}).items()}
        for k, v in self.unusable.items():
            out.setdefault(k, set()).update(v)
        return {k: sorted(v) for k, v in out.items()}

    def _persist_unusable(self) -> None:
        if self.cache is None or self._key is None:
            return
        def change(record: dict | None) -> dict:
            record = record or {"key": getattr(self, "_fields", {})}
            return {**record, "plan": list(self.plan.names), "unusable": self._merged_unusable(record)}

        try:
            self.cache.update(self._key, change)
        except OSError as exc:
            emit("cache_write_failed", level="warning", stage="load", action="none", error=str(exc)[:200])

    # ---- escalation -----------------------------------------------------------------------
    def _escalate(self, stage: str, failure: OOMInfo, *, component: str | None, scope: str) -> None:
        cs = self._call
        assert cs is not None
        self._dirty = True
        t0 = time.perf_counter()
        free_memory(self.device)
        origin = stage  # the stage whose OOM started this escalation
        while True:
            cs.attempts += 1
            host_oom = failure.kind is OOMKind.HOST and self.device.type != "cpu"
            if cs.attempts > self.max_retries:
                self._exhausted(stage, failure, f"max_retries={self.max_retries} reached")
            facts = self.facts()
            target, action, skipped = next_plan(
                self.plan, stage, host_oom=host_oom, facts=facts, shape=cs.shape, policy=self.policy
            )
            if target is None and stage != origin:
                # Applying a rung ran out although it was predicted to move nothing onto the
                # device: go on down the ladder of the stage that asked for the rung.
                target, action, more = next_plan(
                    self.plan, origin, host_oom=host_oom, facts=facts, shape=cs.shape, policy=self.policy
                )
                skipped += more
            for name, reason in skipped:
                emit("rung_skipped", stage=stage, action=name, reason=reason, attempt=cs.attempts)
            if target is None or action is None:
                self._exhausted(stage, failure, "no rung left that lowers this stage's peak")
            record = EscalationRecord(
                stage=stage,
                action=action,
                error=failure.head,
                attempt=cs.attempts,
                component=component,
                oom_kind=failure.kind.value,
                scope=scope,
                plan=target.names,
                skipped=tuple(skipped),
            )
            self.history.append(record)
            cs.records.append(record)
            emit(
                "escalate",
                stage=stage,
                action=action,
                attempt=cs.attempts,
                component=component,
                scope=scope,
                oom=failure.kind.value,
                error=failure.head,
                lossless=SPECS[action].quality != "lossy",
                plan=",".join(target.names),
                **self.memory(),
            )
            new_failure: OOMInfo | None = None
            try:
                self._switch(target)
            except BaseException as exc:
                new_failure = classify(exc)
                if new_failure is None:
                    raise
            if new_failure is None:
                cs.seconds_lost += time.perf_counter() - t0
                self._restart_peaks()
                emit("retry", stage=stage, attempt=cs.attempts, scope=scope, **self.memory())
                return
            # The new plan ran out while its weights were being placed: a load-stage OOM.
            failure, stage, scope, component = new_failure, "load", "load", None
            free_memory(self.device)

    def _exhausted(self, stage: str, failure: OOMInfo, why: str) -> None:
        cs = self._call
        records = list(cs.records) if cs else []
        self._park()
        emit(
            "exhausted",
            level="warning",
            stage=stage,
            action="none",
            attempt=cs.attempts if cs else 0,
            reason=why,
            error=failure.head,
            plan=",".join(self.plan.names),
            **self.memory(),
        )
        tried = ", ".join(r.action for r in records) or "nothing"
        raise AutoFitExhausted(
            f"autofit could not fit the {stage} stage ({why}). Tried: {tried}. Last error: {failure.head}. "
            f"What to do: allow lossy rungs with autofit(pipe, policy='balanced'), lower the resolution "
            f"or batch size, or free device memory held by other processes. The pipeline is still usable.",
            stage=stage,
            history=records,
        )

    def _park(self) -> None:
        """After exhaustion: no hooks, weights on the CPU, nothing held; the next call re-places."""
        if self._tracker is not None:
            self._tracker.uninstall()
        try:
            teardown(self.pipe)
        finally:
            self._applied = None
            free_memory(self.device)

    # ---- plan switches (transactions) -----------------------------------------------------
    def _switch(self, target: Plan) -> None:
        tracker = self._tracker
        reinstall = tracker is not None and tracker.installed
        if reinstall:
            tracker.uninstall()  # strategies go *under* the stage wrappers
        previous, previous_applied = self.plan, self._applied
        self.plan, self._applied = target, None
        try:
            self._apply(previous_applied, target)
            self._applied = target
            self.denoise_chunks = target.denoise_chunks(self._call.shape.batch if self._call else 1)
        except BaseException as exc:
            if classify(exc) is None:
                # Not an OOM: put back the plan that was in force, then let the error through.
                self.plan = previous
                try:
                    self._apply(None, previous)
                    self._applied = previous
                except BaseException as again:  # leave it consistent at least
                    emit("rollback_failed", level="error", stage="load", action="teardown", error=str(again)[:200])
                    teardown(self.pipe)
                emit("rolled_back", level="warning", stage="load", action=",".join(target.names),
                     error=f"{type(exc).__name__}: {str(exc)[:200]}", plan=",".join(previous.names))
            raise
        finally:
            if reinstall and tracker is not None:
                tracker.install()

    def _apply(self, current: Plan | None, target: Plan) -> None:
        undo = [n for n, w in self._one_way.items() if w.strategy != target.storage and w.undo is not None]
        kept = {n for n, w in self._one_way.items() if n not in undo}
        todo = self._storage_targets(target) - kept
        storage_change = bool(undo or todo)
        same_placement = current is not None and current.placement == target.placement
        hooked = any(
            _diffusers.has_accelerate_hooks(m) or _diffusers.group_offload_config(m) is not None
            for m in module_components(self.pipe).values()
        )
        if same_placement and not storage_change:
            if target.placement == "device":
                place(self.pipe, target, self.device)
            elif current is not None and current.extras != target.extras:
                self._enforce_residency()
        elif target.placement == "device" and not hooked and not storage_change:
            # From a plain pipeline: no teardown round trip through the CPU, only the moves.
            place(self.pipe, target, self.device, force=True)
        else:
            teardown(self.pipe)
            self._shadows.drop()
            free_memory(self.device)
            if todo or target.placement not in ("group_leaf_stream", "device"):
                # Weights left in a streamed plan's pinned copies would stay page-locked (and
                # rounded up) under a plan that keeps them in host RAM; the low-memory stream
                # variant pins one group at a time, so it too starts from pageable weights; and
                # a storage rung may keep the originals as its undo copy.
                unpinned = unpin(self.pipe)
                if unpinned:
                    emit("unpinned", stage="load", action=",".join(target.names), gib=round(unpinned / 2**30, 3))
            for name in undo:
                self._undo_one_way(name)
            if todo:
                self._apply_storage(target.storage, todo)
            place(self.pipe, target, self.device)
            if self.device.type == "cuda":
                release_pinned_cache()  # pinned copies freed by moving their weights to the device
        for name, vae in self._vaes.items():
            configure_vae(
                vae,
                original=self._vae_original[name],
                slicing="vae_slicing" in target.extras,
                tiling=target.tiling,
                latent_hw=self._call.shape.latent_hw if self._call else None,
            )

    def _forbidden_storage(self) -> frozenset[str]:
        """Storage rungs the planner must not pick: broken on every target before, not installed,
        or another rung already applied for good."""
        out = set()
        for level in ("fp8", "int8", "nf4"):
            probe_plan = Plan(extras=frozenset({level}))
            if not self._storage_targets(probe_plan):
                out.add(level)
        if quantize.missing(self.device.type):
            out |= {"int8", "nf4"}
        locked = self._storage_locked()
        if locked:
            out |= {"fp8", "int8", "nf4"} - {locked}
        return frozenset(out)

    def _storage_targets(self, plan: Plan) -> set[str]:
        """Components the plan's storage rung changes (minus those it broke before)."""
        level = plan.storage
        if level is None:
            return set()
        blocked = self.unusable.get(level, set())
        ok = (lambda c: c.fp8_ok) if level == "fp8" else (lambda c: c.quant_ok)
        return {c.name for c in self.footprint.components.values() if ok(c) and c.name not in blocked}

    def _apply_storage(self, level: str | None, names: set[str]) -> None:
        """Apply a one-way storage rung to torn-down components (their weights on the CPU)."""
        t0 = time.perf_counter()
        skip = frozenset(n for n in self.footprint.components if n not in names)
        if level == "fp8":
            spare = host_available_bytes() if self.max_ram is None else min(host_available_bytes(), self.max_ram)
            cast, originals = apply_fp8(self.pipe, self.footprint, skip=skip, host_available=spare)
            comps = module_components(self.pipe)
            for n in cast:
                orig = originals.get(n)
                self._one_way[n] = OneWay("fp8", (lambda m=comps[n], o=orig: restore_original(m, o)) if orig else None)
            self._unvalidated |= set(cast)
            emit("fp8_cast", stage="load", action="fp8", components=",".join(cast), reversible=",".join(originals),
                 undo_copy_gib=round(sum(held_bytes(o) for o in originals.values()) / 2**30, 3))
            return
        undos = quantize.apply_quantization(self.pipe, self.footprint, level, self.device, skip=skip)
        for n, u in undos.items():
            self._one_way[n] = OneWay(level, u)
        self._unvalidated |= set(undos)
        emit("quantized", stage="load", action=level, components=",".join(undos), reversible=",".join(undos),
             undo_copy_gib=round(sum(u.held_bytes for u in undos.values()) / 2**30, 3),
             seconds=round(time.perf_counter() - t0, 3), **self.memory())

    # ---- preflight, plan cache, measured stage peaks ---------------------------------------
    def _workload(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        from .planner import Workload

        pipe = self.pipe
        # What the call leaves out is what the pipeline's own defaults say (a video pipeline makes
        # 81 or 121 frames when num_frames is not passed, not one).
        given = {**_call_defaults(type(pipe)), **{k: v for k, v in kwargs.items() if v is not None}}
        default = None
        if getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
            default = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        h = given.get("height") or default or 1024
        w = given.get("width") or default or 1024
        frames = int(given.get("num_frames") or 1)
        shape = _shape_from_kwargs(args, kwargs)
        steps = int(given.get("num_inference_steps") or 30)
        guidance = given.get("guidance_scale", 5.0)
        cfg = bool(guidance and guidance > 1) and "Flux" not in type(pipe).__name__
        # Wan, CogVideoX, HunyuanVideo name it one way, LTX the other.
        temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio",
                                                                               None)
        return Workload(height=int(h), width=int(w), frames=frames, batch=shape.batch, steps=steps, cfg=cfg,
                        temporal_factor=int(temporal) if isinstance(temporal, int) and temporal > 0 else 4)

    def _choose_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """At the first call of a workload: the cached plan if one worked before, else the
        planner's pick. Later calls of the same workload keep the plan that works."""
        if self.cache is None and (self._fixed_plan or not self.preflight):
            return
        from . import cache as cache_mod
        from .hardware import probe
        from .planner import Machine, choose, predict

        wl = self._workload(args, kwargs)
        signature = (wl.height, wl.width, wl.frames, wl.batch, wl.cfg)
        if signature == self._signature:
            return  # same workload as the last call: keep the plan that works (no probe per call)
        self._signature = signature
        hw = probe(self.device, max_vram=self.max_vram, max_ram=self.max_ram)
        fields = cache_mod.key_fields(
            pipeline=type(self.pipe).__name__, footprint=self.footprint, height=wl.height, width=wl.width,
            frames=wl.frames, batch=wl.batch, device_name=hw.device_name, budget_bytes=hw.configured_budget_bytes,
            policy=self.policy, cfg=wl.cfg,
        )
        key = cache_mod.make_key(fields)
        if key == self._key:
            return
        self._key, self._fields, self._wl = key, fields, wl
        room, pinned = self.host_room()
        machine = Machine(hw.budget_bytes, room, hw.device_type, hw.pinned_gbps, hw.pageable_gbps,
                          quant_missing=quantize.missing(self.device.type), pinned_available_bytes=pinned)
        self._machine = machine
        record = self.cache.get(key) if self.cache is not None else None
        source = "planner"
        if record is not None:
            for strategy, names in record.get("unusable", {}).items():
                self.unusable.setdefault(strategy, set()).update(names)
        if self._fixed_plan:
            return  # an explicit or adopted plan is kept; the key still serves the cache
        if record is not None:
            try:
                chosen = Plan.from_names(tuple(record["plan"]))
                self.measured[key] = {k: int(v) for k, v in record.get("activations", {}).items()}
                source = "cache"
            except (KeyError, ValueError):
                record = None
        if record is not None and self.preflight:
            # The key holds the configured budget, not what is free now nor the host RAM: a plan
            # stored by a process on a roomier machine (or before another process took memory)
            # is checked with the measured activations before it is trusted. It ran within the
            # whole budget, so no working reserve is asked of it.
            stale = predict(chosen, self.footprint, machine, wl, measured=self.measured.get(key), policy=self.policy,
                            margin=1.0)
            if not stale.fits and stale.vram > machine.budget_bytes and not self.measured.get(key):
                # Without measured activations (peaks are measured on CUDA only) a device-memory
                # misfit is the estimate's word against a plan that ran: set it aside, and keep
                # every other reason (host RAM, pinning, a missing library, the policy).
                stale = predict(chosen, self.footprint, replace(machine, budget_bytes=stale.vram), wl,
                                measured=None, policy=self.policy, margin=1.0)
            if not stale.fits:
                emit("cache_plan_refused", stage="load", action=",".join(chosen.names) or "device",
                     reason=stale.why_not)
                record = None
        if record is None:
            if not self.preflight:
                return
            forbid = self._forbidden_storage()
            best = choose(self.footprint, machine, wl, policy=self.policy, measured=self.measured.get(key),
                          forbid=forbid)
            if best is None:
                emit("preflight", stage="load", action="none", attempt=0, source="planner",
                     reason="no plan predicted to fit; starting from the current plan and relying on recovery",
                     budget_gib=round(hw.budget_bytes / 2**30, 3))
                chosen = self.plan
            else:
                chosen = best.plan
        locked = self._storage_locked()
        if locked and chosen.storage != locked:
            # Weights changed one way with no copy to undo it: the plan says so rather than pretend.
            chosen = chosen.with_strategy(locked)
        cand = predict(chosen, self.footprint, machine, wl, measured=self.measured.get(key), policy=self.policy)
        self.predicted, self._predicted_plan = cand.peaks, chosen
        self._dirty = True
        emit("preflight", stage="load", action=",".join(chosen.names) or "device", attempt=0, source=source,
             predicted_seconds=round(cand.seconds, 3), predicted_vram_gib=round(cand.vram / 2**30, 3),
             **{f"predicted_{k}_gib": round(v / 2**30, 3) for k, v in cand.peaks.items()},
             budget_gib=round(hw.budget_bytes / 2**30, 3))
        self.plan = chosen

    def _stage_transition(self, stage: str | None) -> None:
        """Close the previous stage's peak measurement (CUDA) and open the next one. Each peak
        is kept with the plan it ran under: an escalation changes the plan mid-call."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            if self._stage is not None:
                peak = torch.cuda.max_memory_allocated(self.device)
                if self._stage_plans.get(self._stage) != self.plan:
                    self._stage_peaks.pop(self._stage, None)  # measured under another plan
                self._stage_peaks[self._stage] = max(self._stage_peaks.get(self._stage, 0), peak)
                self._stage_plans[self._stage] = self.plan
            if stage is not None:
                torch.cuda.reset_peak_memory_stats(self.device)
        self._stage = stage

    def _restart_peaks(self) -> None:
        """After a plan switch: the failing stage's peak so far is the failed attempt's (it sits
        near the budget), so its measurement starts again. Stages that completed keep theirs,
        with the plan they ran under."""
        self._stage_peaks.pop(self._stage, None)
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)

    def _remember(self, seconds: float) -> None:
        """Store the plan that worked (and the measured activations) under the workload's key."""
        from .ladder import activation_factor, resident_bytes
        from .planner import predict

        peaks, plans, self._stage_peaks, self._stage_plans = self._stage_peaks, self._stage_plans, {}, {}
        self._dirty = False
        before = dict(self.measured.get(self._key, {})) if self._key is not None else {}
        if self._machine is not None and self._wl is not None and self._predicted_plan != self.plan:
            # The preflight prediction was for another plan: log the one for the plan that ran.
            self.predicted = predict(self.plan, self.footprint, self._machine, self._wl, measured=before,
                                     policy=self.policy).peaks
            self._predicted_plan = self.plan
        shape = self._call.shape if self._call is not None else CallShape()
        activations = {}
        for stage, peak in peaks.items():
            # Stored unscaled: the planner applies the factor of the plan it predicts for (tiling,
            # split batches), so a peak measured under tiling is not shrunk a second time.
            ran = plans.get(stage, self.plan)
            factor = activation_factor(ran, stage, shape)
            if factor > 0:
                activations[stage] = int(max(peak - resident_bytes(ran, stage, self.footprint), 0) / factor)
        activations = {**before, **activations}  # stages not measured this call keep theirs
        if activations and self._key is not None:
            self.measured[self._key] = activations
        # Predicted beside measured, for the stages that ran under the plan in force now.
        now = {k: v for k, v in peaks.items() if plans.get(k, self.plan) == self.plan}
        if now:
            emit("stage_peaks", stage=",".join(now), action=",".join(self.plan.names) or "device", attempt=0,
                 **{f"measured_{k}_gib": round(v / 2**30, 3) for k, v in now.items()},
                 **{f"predicted_{k}_gib": round(v / 2**30, 3) for k, v in self.predicted.items() if k in now})
        if self.cache is not None and self._key is not None:
            def change(record: dict | None) -> dict:
                # Another process may have stored meanwhile: its broken rungs are kept, and each
                # stage keeps the larger activation measured (plans are predicted from them).
                stored = {k: int(v) for k, v in (record or {}).get("activations", {}).items()}
                merged = {k: max(v, stored.get(k, 0)) for k, v in activations.items()}
                return {"plan": list(self.plan.names), "activations": {**stored, **merged},
                        "seconds": round(seconds, 4), "key": self._fields,
                        "unusable": self._merged_unusable(record)}

            try:
                self.cache.update(self._key, change)
            except OSError as exc:  # a read-only or full cache must not fail the call
                emit("cache_write_failed", level="warning", stage="load", action="none", error=str(exc)[:200])
