"""Preflight: what a call asks for (its workload), and the plan to start it from (the cached
plan that worked before, else the planner's pick). It chooses and returns a :class:`Choice`;
the runtime applies it (the plan through :class:`~autofit.engine.placement.Placement`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from autofit.facts import cache as cache_mod
from autofit.events import emit
from autofit.facts.hardware import MachineReading
from autofit.plan import LIGHTEST_EXTRAS, Plan
from autofit.planning.context import Context, Machine, Workload, uses_cfg
from autofit.planning.cost import activation_factor
from autofit.planning.planner import choose as planner_choose, predict
from autofit.engine.placement import Placement
from autofit.engine.readings import Readings
from autofit.engine.state import Choice
from autofit.engine.survey import Survey
from autofit.strategies import quantize
from autofit.units import GIB, gib


@functools.lru_cache(maxsize=32)
def call_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a pipeline class's ``__call__`` (height, num_frames, steps, guidance)."""
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def _config_size(pipe: Any) -> int | None:
    """The pipeline's default image side when it has no ``default_sample_size``: its denoiser's
    ``sample_size`` (latent pixels) x ``vae_scale_factor``, as SD 1.5, AnimateDiff and PixArt
    compute it in ``__call__``."""
    scale = getattr(pipe, "vae_scale_factor", None)
    if getattr(pipe, "default_sample_size", None) and scale:
        return int(pipe.default_sample_size) * int(scale)
    for name in ("unet", "transformer", "prior", "decoder"):
        size = getattr(getattr(getattr(pipe, name, None), "config", None), "sample_size", None)
        if isinstance(size, (list, tuple)) and size:
            size = size[0]
        if isinstance(size, int) and size > 0:
            return size * int(scale or 8)
    return None


def _image_hw(image: Any) -> tuple[int, int] | None:
    """(height, width) of an image input: a PIL image, an array or tensor, or a list of them."""
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
        if isinstance(image, (list, tuple)):  # a video: a list of frames
            image = image[0] if image else None
    if image is None:
        return None
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL: (width, height)
        return int(size[1]), int(size[0])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 3:
        chw = isinstance(image, torch.Tensor)  # tensors are (..., C, H, W), arrays (..., H, W, C)
        return (int(shape[-2]), int(shape[-1])) if chw else (int(shape[-3]), int(shape[-2]))
    return None


def _count(value: Any) -> int | None:
    """Images in an image input: a list's length, a batched array's or tensor's first dimension."""
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 4:
        return int(shape[0])
    return None


def batch_of(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """The images (or videos, waveforms) a call makes at once, as the pipeline counts them:
    prompts (a list, or the first dimension of ``prompt_embeds``), else the image inputs, times
    ``num_images_per_prompt`` (or its video and waveform names)."""
    prompt = kwargs.get("prompt", args[0] if args else None)
    n = None
    if isinstance(prompt, (list, tuple)):
        n = len(prompt)
    elif isinstance(prompt, str):
        n = 1
    else:
        embeds = kwargs.get("prompt_embeds")
        if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
            n = int(embeds.shape[0])
    if n is None:
        n = next((c for c in (_count(kwargs.get(k)) for k in ("image", "video", "latents")) if c), None)
    if n is None:
        n = int(kwargs.get("batch_size") or 1)
    per = next((kwargs[k] for k in ("num_images_per_prompt", "num_videos_per_prompt", "num_waveforms_per_prompt")
                if kwargs.get(k)), 1)
    return max(n, 1) * int(per)


def workload(pipe: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Workload:
    """What a call of ``pipe`` with these arguments makes: size, frames, batch, steps, guidance."""
    # What the call leaves out is what the pipeline's own defaults say (a video pipeline makes
    # 81 or 121 frames when num_frames is not passed, not one).
    given = {**call_defaults(type(pipe)), **{k: v for k, v in kwargs.items() if v is not None}}
    # An image-to-image call makes the size of its image; else the pipeline's own default size.
    image_hw = _image_hw(kwargs.get("image", kwargs.get("video")))
    default = _config_size(pipe)
    h = given.get("height") or (image_hw[0] if image_hw else None) or default or 1024
    w = given.get("width") or (image_hw[1] if image_hw else None) or default or 1024
    frames = int(given.get("num_frames") or 1)
    steps = int(given.get("num_inference_steps") or 30)
    guidance = given.get("guidance_scale", 5.0)
    cfg = uses_cfg(type(pipe).__name__, guidance)
    # Wan, CogVideoX, HunyuanVideo name it one way, LTX the other.
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio",
                                                                           None)
    return Workload(height=int(h), width=int(w), frames=frames, batch=batch_of(args, kwargs), steps=steps, cfg=cfg,
                    temporal_factor=int(temporal) if isinstance(temporal, int) and temporal > 0 else 4)


class Preflight:
    """At the first call of a workload: the cached plan if one worked before, else the planner's
    pick (see :meth:`choose`). ``enabled`` False: an explicit start plan or adopted offloading is
    kept, and preflight only keys the plan cache."""

    def __init__(self, pipe: Any, *, readings: Readings, survey: Survey, cache: cache_mod.PlanCache | None,
                 policy: str, enabled: bool):
        self._pipe, self._readings, self._survey = pipe, readings, survey
        self._cache, self._policy, self._enabled = cache, policy, enabled

    @property
    def enabled(self) -> bool:
        return self._enabled

    def turn_off(self) -> None:
        """The user placed the weights (adopted offloading): that plan is kept."""
        self._enabled = False

    def choose(self, args: Sequence[Any], kwargs: dict[str, Any], *, last: Choice | None, placement: Placement,
               measured: Callable[[str], dict[str, int] | None], worked: Callable[[str], Plan | None],
               fallback: Plan) -> Choice | None:
        """The plan to start a call from. None for the workload of the last call: keep the plan that
        works (no probe per call). A choice whose ``plan`` is None keeps the plan in force too (an
        explicit or adopted plan). ``measured``: activations learned per key; ``worked``: the plan a
        call of that key completed on in this process; ``fallback``: the plan to start from when
        no plan is predicted to fit."""
        wl = workload(self._pipe, args, kwargs)
        signature = (wl.height, wl.width, wl.frames, wl.batch, wl.cfg)
        if last is not None and signature == last.signature:
            return None
        if self._cache is None and not self._enabled:
            return Choice(signature)  # nothing to plan, nothing to store
        hw = self._readings.hardware()
        fields = cache_mod.key_fields(
            pipeline=type(self._pipe).__name__, footprint=placement.footprint, height=wl.height, width=wl.width,
            frames=wl.frames, batch=wl.batch, device_name=hw.device_name, budget_bytes=hw.configured_budget_bytes,
            policy=self._policy, cfg=wl.cfg,
        )
        key = cache_mod.make_key(fields)
        if last is not None and key == last.key:
            return replace(last, signature=signature, plan=None)
        room, pinned = self._survey.host_room()
        device_type = self._readings.device.type
        machine = Machine(hw.budget_bytes, room, hw.device_type, hw.pinned_gbps, hw.pageable_gbps,
                          quant_missing=quantize.missing(device_type), pinned_available_bytes=pinned)
        record = self._cache.get(key) if self._cache is not None else None
        broken = {s: set(names) for s, names in (record or {}).get("broken", {}).items()}
        choice = Choice(signature, key=key, fields=fields, machine=machine, workload=wl, broken=broken,
                        device_total=hw.total_bytes)
        if not self._enabled:
            return choice  # an explicit or adopted plan is kept; the key still serves the cache
        return self._pick(choice, record, hw, placement, measured(key), worked(key), fallback)

    def _pick(self, choice: Choice, record: dict | None, hw: MachineReading, placement: Placement,
              measured: dict[str, int] | None, here: Plan | None, fallback: Plan) -> Choice:
        """``choice`` with its plan: the cached one if it still fits, else the one that worked in
        this process (the workload came back after another: no plan cache, or none written), else
        the planner's pick."""
        key, wl, machine, broken = choice.key, choice.workload, choice.machine, choice.broken
        assert key is not None and wl is not None and machine is not None
        source, stored = "planner", None
        chosen = _stored_plan(record, key)
        if chosen is not None:
            measured = stored = stored_activations(record, wl, hw.total_bytes, key)
            source = "cache"
        elif here is not None:
            chosen, source = here, "process"  # checked like a cached plan, against what was measured here
        ctx = self._survey.context(wl, broken=broken, machine=machine)
        if chosen is not None and _stale(chosen, ctx, measured):
            chosen, source = None, "planner"  # the record's activations still count
        if chosen is None:  # ctx knows the rungs broken here (placement) and in the record (broken)
            best = planner_choose(ctx, measured=measured)
            if best is None:
                emit("preflight", level="warning", stage="load", action="none", attempt=0, source="planner",
                     reason="no plan predicted to fit; starting from the current plan and relying on recovery",
                     budget_gib=gib(hw.budget_bytes, 3))
                chosen = fallback
            else:
                chosen = best.plan
            if self._policy != "memory":  # it asked for the least device memory over the image: tiling stays
                chosen = _untiled_until_measured(chosen, measured)
        locked = placement.ledger.locked()
        if locked and chosen.storage != locked:
            # Weights changed one way with no copy to undo it: the plan says so rather than pretend.
            chosen = chosen.with_rung(locked)
        cand = predict(chosen, ctx, measured=measured)
        emit("preflight", stage="load", action=",".join(chosen.names) or "device", attempt=0, source=source,
             predicted_seconds=round(cand.seconds, 3), predicted_vram_gib=gib(cand.vram, 3),
             **{f"predicted_{k}_gib": gib(v, 3) for k, v in cand.peaks.items()},
             budget_gib=gib(hw.budget_bytes, 3))
        return replace(choice, plan=chosen, predicted=cand.peaks, measured=stored)

    def predicted_peaks(self, plan: Plan, choice: Choice, measured: dict[str, int] | None) -> dict[str, int]:
        """The planner's predicted stage peaks of ``plan`` for the workload of ``choice``."""
        assert choice.workload is not None
        return predict(plan, self._survey.context(choice.workload, machine=choice.machine), measured=measured).peaks


def _stored_plan(record: dict | None, key: str) -> Plan | None:
    """The plan a cache record stored, None when there is none this autofit can read."""
    if record is None:
        return None
    try:
        return Plan.from_names(tuple(record["plan"]))
    except KeyError:
        return None
    except ValueError as exc:  # rungs this autofit does not know (another version wrote it)
        emit("cache_record_ignored", level="warning", stage="load", action="none", key=key,
             reason=f"stored plan {'+'.join(record['plan'])!r}: {exc}; planning again")
        return None


def activation_ceiling(stage: str, wl: Workload, device_total: int) -> int:
    """The most activation bytes a measurement of ``stage`` on a device of ``device_total`` bytes
    can have stored: the peak of a run that completed fits the device, and the stored value is
    that peak divided by the lightest plan's factor (smallest tiles, every batch split)."""
    lightest = Plan(extras=LIGHTEST_EXTRAS)
    factor = activation_factor(lightest, stage, wl)
    return int(device_total / factor) if factor > 0 else device_total


def plausible_activations(stored: dict[str, int], wl: Workload, device_total: int | None,
                          ) -> tuple[dict[str, int], dict[str, int]]:
    """(kept, dropped): stored activations a run on this device could have measured, and those
    it could not (a corrupt or foreign value would make every plan look too big, for good)."""
    if not device_total:
        return dict(stored), {}
    kept, dropped = {}, {}
    for stage, value in stored.items():
        (kept if value <= activation_ceiling(stage, wl, device_total) else dropped)[stage] = value
    return kept, dropped


def _untiled_until_measured(plan: Plan, measured: dict[str, int] | None) -> Plan:
    """``plan`` without the VAE tiling the planner chose from estimates alone. Tiling changes the
    image; an estimate does not justify it. The decode runs untiled and, if it does run out, is
    retried alone (the denoised latents are kept) on the decode ladder, which the cache then
    remembers."""
    if plan.tiling is None or "decode" in (measured or {}):
        return plan
    deferred = list(plan.tiling_rungs)
    for name in deferred:
        plan = plan.without(name)
    emit("tiling_deferred", stage="decode", action=",".join(deferred), attempt=0,
         reason="decode activations not measured yet: decoding untiled first")
    return plan


def stored_activations(record: dict[str, Any], wl: Workload, device_total: int, key: str) -> dict[str, int]:
    """The record's activations that a run on this device could have measured; any other is
    dropped with a warning (planning from it would find no plan fits, in every process)."""
    kept, dropped = plausible_activations({k: int(v) for k, v in record.get("activations", {}).items()}, wl,
                                          device_total)
    for stage, value in dropped.items():
        emit("cache_value_ignored", level="warning", stage=stage, action="none", key=key, value=value,
             reason=f"a {stage} activation of {value / GIB:.1f} GiB cannot have been measured on a device of "
                    f"{device_total / GIB:.1f} GiB; measured again")
    return kept


def _stale(chosen: Plan, ctx: Context, measured: dict[str, int] | None) -> bool:
    """Whether a cached plan no longer fits. The key holds the configured budget, not what is
    free now nor the host RAM: a plan stored by a process on a roomier machine (or before another
    process took memory) is checked with the measured activations before it is trusted. It ran
    within the whole budget, so no working reserve is asked of it."""
    stale = predict(chosen, ctx, measured=measured, margin=1.0)
    if not stale.fits and stale.vram > ctx.machine.budget_bytes and not measured:
        # Without measured activations (no peaks on the CPU: autofit.facts.devices) a device-memory
        # misfit is the estimate's word against a plan that ran: set it aside, and keep
        # every other reason (host RAM, pinning, a missing library, the policy).
        stale = predict(chosen, replace(ctx, machine=replace(ctx.machine, budget_bytes=stale.vram)), measured=None,
                        margin=1.0)
    if not stale.fits:
        emit("cache_plan_refused", stage="load", action=",".join(chosen.names) or "device", reason=stale.why_not)
    return not stale.fits
