"""The ladder: per stage, which strategy to try next. Pure: plans, footprints and facts in,
a plan out; no torch calls, no I/O.

Order within a stage follows the guide's flowchart, lossless rungs first (``lossy`` ones only when
the policy allows). A rung is skipped, with a reason, when it is unavailable here or when the
predicted peak of the failing stage would not go down: weights resident on the device during the
stage, and the stage's activation factor, must both be no higher and one of them lower.
"""

from __future__ import annotations

from dataclasses import dataclass

from .footprint import Footprint
from .plan import CallShape, Plan

POLICIES = {
    # policy: which quality classes of rungs it allows
    "quality": frozenset({"lossless", "near_lossless"}),
    "balanced": frozenset({"lossless", "near_lossless", "lossy"}),
    "speed": frozenset({"lossless", "near_lossless", "lossy"}),
    "memory": frozenset({"lossless", "near_lossless", "lossy"}),
}
DEFAULT_POLICY = "quality"


@dataclass(frozen=True, slots=True)
class StrategySpec:
    name: str
    quality: str  # lossless | near_lossless | lossy
    reversible: bool
    summary: str


SPECS: dict[str, StrategySpec] = {
    s.name: s
    for s in (
        StrategySpec("model_offload", "lossless", True,
                     "one whole component on the device at a time; moves every component each call"),
        StrategySpec("group_leaf_stream", "lossless", True,
                     "leaf-level group offload, CUDA-stream prefetch from pinned RAM (~3x weights)"),
        StrategySpec("group_leaf_lowmem", "lossless", True,
                     "leaf-level group offload with streams, pinning on the fly (~1x weights RAM)"),
        StrategySpec("group_block", "lossless", True, "block-level group offload, no stream"),
        StrategySpec("group_leaf", "lossless", True, "leaf-level group offload, no stream (slow)"),
        StrategySpec("sequential", "lossless", True, "accelerate sequential offload (slowest)"),
        StrategySpec("split_batch", "lossless", True,
                     "run the denoiser on half the batch at a time (same images, same seeds)"),
        StrategySpec("split_batch_max", "lossless", True, "run the denoiser one sample at a time"),
        StrategySpec("offload_encoders", "lossless", True,
                     "text encoders live on the CPU and visit the device only to encode"),
        StrategySpec("offload_for_decode", "lossless", True,
                     "other components leave the device before the VAE decodes"),
        StrategySpec("vae_slicing", "lossless", True, "decode one image of the batch at a time"),
        StrategySpec("vae_tiling", "near_lossless", True,
                     "decode in overlapping tiles sized to really tile at this resolution"),
        StrategySpec("vae_tiling_small", "near_lossless", True, "tiles half that size"),
        StrategySpec("vae_cpu", "lossless", True, "decode on the CPU (slow, no device memory)"),
        StrategySpec("fp8", "lossy", False,
                     "fp8 (e4m3) weight storage for the denoiser; one-way"),
        StrategySpec("int8", "lossy", False,
                     "bitsandbytes LLM.int8 weights for the denoiser and large text encoders; one-way"),
        StrategySpec("nf4", "lossy", False,
                     "bitsandbytes 4-bit NormalFloat weights for the denoiser and large text encoders; one-way"),
    )
}

LADDERS: dict[str, tuple[str, ...]] = {
    "load": ("model_offload", "group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf",
             "sequential", "fp8", "int8", "nf4"),
    "encode": ("offload_encoders", "model_offload", "group_leaf_stream", "group_leaf_lowmem",
               "group_leaf", "sequential", "fp8", "int8", "nf4"),
    "denoise": ("split_batch", "split_batch_max", "offload_encoders", "model_offload", "group_leaf_stream", "group_leaf_lowmem",
                "group_block", "group_leaf", "sequential", "fp8", "int8", "nf4"),
    # Splitting the batch comes before moving weights off the device (vae_slicing is the decode split).
    "decode": ("vae_slicing", "offload_for_decode", "vae_tiling", "vae_tiling_small", "vae_cpu"),
}
# After a host-RAM OOM: rungs that need less host RAM, never more device rungs.
HOST_LADDER: tuple[str, ...] = ("group_leaf_lowmem", "group_leaf", "group_block", "fp8")

GROUP_PLACEMENTS = frozenset({"group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf"})
STREAM_PLACEMENTS = frozenset({"group_leaf_stream", "group_leaf_lowmem"})


@dataclass(frozen=True, slots=True)
class Facts:
    """What the ladder needs to know about this machine and pipeline (gathered by the runtime)."""

    footprint: Footprint
    device_type: str = "cpu"
    # Host RAM a plan may hold: available now plus what the pipeline's weights already hold on the
    # host (a switch releases or reuses it), capped by max_ram. See runtime.host_room.
    host_available: int = 0
    pinned_available: int | None = None  # of that, what can be page-locked (None: all of it)
    has_offload_seq: bool = True
    vae_can_tile: bool = True
    vae_can_slice: bool = True
    fp8_supported: bool = True
    fp8_blocked: frozenset[str] = frozenset()  # components fp8 broke before (plan cache)
    quant_missing: str | None = None  # why bitsandbytes quantization cannot run here, if it cannot
    quant_blocked: frozenset[tuple[str, str]] = frozenset()  # (level, component) broken before
    # A storage rung applied with no copy of the original weights: it cannot be swapped for another.
    storage_locked: str | None = None
    has_bnb: bool = False  # bitsandbytes weights present (autofit's or the user's)

    @property
    def pinned_room(self) -> int:
        if self.pinned_available is None:
            return self.host_available
        return min(self.pinned_available, self.host_available)


def _size(fp: Footprint, name: str, plan: Plan) -> int:
    return fp.components[name].stored_bytes(plan.storage)


def _granule(fp: Footprint, name: str, plan: Plan, attr: str) -> int:
    """A leaf or block of a component, shrunk by the plan's weight storage."""
    c = fp.components[name]
    size = getattr(c, attr)
    if c.stored_by(plan.storage) and c.bytes:
        size = int(size * c.stored_bytes(plan.storage) / c.bytes)
    return size


def kept_on_device(plan: Plan, fp: Footprint) -> set[str]:
    """Quantized components that stay on the device under group offloading: bitsandbytes keeps
    scales beside its weights, which group offloading does not move. Model offload moves whole
    modules with their own .to(), which bitsandbytes >= 0.48 supports for nf4 and int8 alike (the
    guide's "int8 cannot move" predates it; diffusers itself moves 8-bit modules since then)."""
    if plan.storage not in ("int8", "nf4") or plan.placement not in GROUP_PLACEMENTS:
        return set()
    return {c.name for c in fp.components.values() if c.quant_ok}


def _role_names(fp: Footprint, role: str) -> list[str]:
    return [c.name for c in fp.by_role(role)]


def resident_bytes(plan: Plan, stage: str, fp: Footprint) -> int:
    """Predicted weight bytes on the device while ``stage`` runs under ``plan``."""
    names = list(fp.components)
    enc, vae = _role_names(fp, "encode"), _role_names(fp, "decode")
    mine = names if stage == "load" else _role_names(fp, stage)
    vae_cpu = "vae_cpu" in plan.extras
    p = plan.placement
    if p == "device":
        on = set(names)
        if vae_cpu:
            on -= set(vae)
        if "offload_encoders" in plan.extras:
            on -= set(enc)
            if stage == "encode" and enc:
                on.add(max(enc, key=lambda n: _size(fp, n, plan)))
        if stage == "decode" and "offload_for_decode" in plan.extras:
            on &= set(vae)
        return sum(_size(fp, n, plan) for n in on)
    pinned = kept_on_device(plan, fp)
    fixed = sum(_size(fp, n, plan) for n in pinned)
    mine = [n for n in mine if n not in pinned]
    if p == "model_offload":
        if stage == "load":
            return fixed
        pool = [n for n in mine if not (vae_cpu and n in vae)]
        return fixed + max((_size(fp, n, plan) for n in pool), default=0)
    if p == "sequential":
        return 0 if stage == "load" else max((_granule(fp, n, plan, "leaf_bytes") for n in mine), default=0)
    # Group offload: the VAE is excluded and stays on the device (small, and tiling needs it whole).
    kept = fixed + (0 if vae_cpu else sum(_size(fp, n, plan) for n in vae))
    if stage in ("load", "decode"):
        return kept
    if p == "group_block":
        granule = max((_granule(fp, n, plan, "block_bytes") for n in mine), default=0)
    elif p in STREAM_PLACEMENTS:
        # Current + prefetched leaf in theory; measured on an H200 (SDXL, leaf + streams) the
        # stage peaks sat one leaf above the activations, not two.
        granule = max((_granule(fp, n, plan, "leaf_bytes") for n in mine), default=0)
    else:
        granule = max((_granule(fp, n, plan, "leaf_bytes") for n in mine), default=0)
    return kept + granule


def activation_factor(plan: Plan, stage: str, shape: CallShape) -> float:
    """Relative activation memory of the stage (1.0 = unchanged): batch splits and decode rungs."""
    if stage == "denoise":
        return 1.0 / min(plan.denoise_chunks(shape.batch), max(shape.batch, 1)) if shape.batch > 1 else 1.0
    if stage != "decode":
        return 1.0
    if "vae_cpu" in plan.extras:
        return 0.0
    f = 1.0
    if "vae_slicing" in plan.extras and shape.batch > 1:
        f /= shape.batch
    # Measured on an H200, SDXL VAE at 1024x1024: tile 512 cut the decode activations from
    # 2.52 to 0.74 GiB (0.3); a quarter-side tile is taken as 0.12.
    if plan.tiling == "normal":
        f *= 0.3
    elif plan.tiling == "small":
        f *= 0.12
    return f


def _moved_each_call(plan: Plan, fp: Footprint) -> list[str]:
    """Components the ``device`` placement moves on and off the device through autofit's reusable
    host buffers (strategies/residency.py), pinned on CUDA."""
    if plan.placement != "device":
        return []
    out = set()
    if "offload_encoders" in plan.extras:
        out |= set(_role_names(fp, "encode"))
    if "offload_for_decode" in plan.extras:
        out |= {n for n, c in fp.components.items() if c.role != "decode"}
    return sorted(out)


def _through_buffers(plan: Plan, fp: Footprint, name: str) -> bool:
    # bitsandbytes components move with their own .to() (pageable), not through the buffers.
    return not (plan.storage in ("int8", "nf4") and fp.components[name].stored_by(plan.storage))


def pinned_bytes(plan: Plan, fp: Footprint) -> int:
    """Page-locked host RAM the plan holds: the pinned copies leaf-level group offload with streams
    makes of every offloaded tensor, or the reusable buffers of per-call moves. Each tensor is
    rounded up to a power of two by torch's pinned allocator (footprint.pinned_size)."""
    if plan.placement == "group_leaf_stream":
        kept = kept_on_device(plan, fp)
        return sum(c.pinned_stored(plan.storage) for c in fp.components.values() if c.name not in kept)
    return sum(fp.components[n].pinned_stored(plan.storage)
               for n in _moved_each_call(plan, fp) if _through_buffers(plan, fp, n))


def host_bytes(plan: Plan, fp: Footprint) -> int:
    """Predicted host RAM the plan holds for the pipeline (weights kept off the device, pinned
    copies, and the original weights of quantized components kept to undo the rung, unless the
    checkpoint they were loaded from serves as that copy)."""
    pinned = kept_on_device(plan, fp)
    originals = sum(c.bytes for c in fp.components.values()
                    if plan.storage in ("int8", "nf4") and c.quant_ok and not c.restorable)
    if plan.placement == "device":
        pageable = [n for n in _moved_each_call(plan, fp) if not _through_buffers(plan, fp, n)]
        if "vae_cpu" in plan.extras:
            pageable += _role_names(fp, "decode")
        return originals + pinned_bytes(plan, fp) + sum(_size(fp, n, plan) for n in pageable)
    if plan.placement == "group_leaf_stream":
        # The pinned copies replace the pageable weights group by group as they are made.
        return originals + pinned_bytes(plan, fp)
    return originals + sum(_size(fp, n, plan) for n in fp.components if n not in pinned)


def stage_peak(plan: Plan, stage: str, fp: Footprint, shape: CallShape) -> tuple[int, float]:
    return resident_bytes(plan, stage, fp), activation_factor(plan, stage, shape)


def _lowers(new: tuple[int, float], old: tuple[int, float]) -> bool:
    return new[0] <= old[0] and new[1] <= old[1] and new != old


def unavailable(name: str, plan: Plan, facts: Facts, shape: CallShape, policy: str) -> str | None:
    """Why rung ``name`` cannot be tried now, or None."""
    spec = SPECS[name]
    if spec.quality not in POLICIES[policy]:
        return f"{spec.quality} rung; policy {policy!r} does not allow it (use policy='balanced')"
    if name in ("offload_encoders", "offload_for_decode") and plan.placement != "device":
        return "only applies while every component is on the device"
    if name in ("offload_encoders",) and not facts.footprint.by_role("encode"):
        return "pipeline has no text encoders"
    if name == "model_offload" and not facts.has_offload_seq:
        return "pipeline class has no model_cpu_offload_seq"
    if name in STREAM_PLACEMENTS:
        if facts.device_type not in ("cuda", "xpu"):
            return f"needs CUDA/XPU streams; device is {facts.device_type}"
        if name == "group_leaf_stream":
            need = pinned_bytes(plan.with_strategy(name), facts.footprint)
            room = facts.pinned_room
            if room < need:
                return f"needs {need / 2**30:.1f} GiB of pinned host RAM, {room / 2**30:.1f} GiB can be pinned"
        elif facts.host_available < 1.1 * facts.footprint.total:
            return (f"needs {1.1 * facts.footprint.total / 2**30:.1f} GiB host RAM, "
                    f"{facts.host_available / 2**30:.1f} GiB available")
    if name == "sequential" and facts.has_bnb:
        return "bitsandbytes weights are not combined with sequential offload"
    if name == "sequential" and facts.device_type == "cpu":
        return "accelerate's sequential offload needs an accelerator as execution device"
    if name in GROUP_PLACEMENTS | {"model_offload", "sequential"} and facts.device_type != "cpu":
        if facts.host_available < facts.footprint.total:
            return "host RAM cannot hold the offloaded weights"
    if name in ("split_batch", "split_batch_max") and shape.batch <= 1:
        return "batch of 1: nothing to split"
    if name == "vae_slicing":
        if not facts.vae_can_slice:
            return "VAE has no slicing"
        if shape.batch <= 1:
            return "batch of 1: slicing splits nothing"
    if name in ("vae_tiling", "vae_tiling_small") and not facts.vae_can_tile:
        return "VAE has no tiling"
    if name == "fp8":
        if not facts.fp8_supported:
            return "this torch build has no float8_e4m3fn"
        if not any(c.fp8_ok for c in facts.footprint.components.values()):
            return "no component can be stored in fp8"
        if not any(c.fp8_ok and c.name not in facts.fp8_blocked for c in facts.footprint.components.values()):
            return f"fp8 broke {', '.join(sorted(facts.fp8_blocked))} before (marked unusable in the plan cache)"
        if plan.placement == "sequential":
            return "fp8 casting is not combined with sequential offload"
    if name in ("int8", "nf4"):
        if facts.quant_missing:
            return facts.quant_missing
        targets = [c for c in facts.footprint.components.values() if c.quant_ok]
        if not targets:
            return "no component to quantize (a denoiser or a large text encoder with Linear layers)"
        blocked = sorted(n for s, n in facts.quant_blocked if s == name)
        if all(c.name in blocked for c in targets):
            return f"{name} broke {', '.join(blocked)} before (marked unusable in the plan cache)"
        if plan.placement == "sequential":
            return "bitsandbytes weights are not combined with sequential offload"
        largest = max(c.bytes for c in targets)
        if facts.device_type != "cpu" and facts.host_available < largest:
            # The guide's rule: the full-precision weights are quantized from host RAM (and kept
            # there to undo the rung).
            return (f"host RAM cannot hold the full-precision weights to quantize ({largest / 2**30:.1f} GiB needed, "
                    f"{facts.host_available / 2**30:.1f} GiB available)")
    if name in ("fp8", "int8", "nf4") and facts.storage_locked and facts.storage_locked != name:
        return f"{facts.storage_locked} is applied and its original weights were not kept: it cannot be swapped"
    return None


def next_plan(
    plan: Plan,
    stage: str,
    *,
    host_oom: bool,
    facts: Facts,
    shape: CallShape,
    policy: str,
) -> tuple[Plan | None, str | None, list[tuple[str, str]]]:
    """The next plan to try after an OOM in ``stage``: (plan, rung name, skipped rungs with reasons)."""
    skipped: list[tuple[str, str]] = []
    ladder = HOST_LADDER if host_oom else LADDERS[stage]
    fp = facts.footprint
    if host_oom:
        current: tuple[int, float] = (host_bytes(plan, fp), 0.0)
    else:
        current = stage_peak(plan, stage, fp, shape)
    for name in ladder:
        if name == plan.placement or name in plan.extras:
            continue
        reason = unavailable(name, plan, facts, shape, policy)
        if reason is None:
            candidate = plan.with_strategy(name)
            if host_oom:
                lowered = host_bytes(candidate, fp) < current[0]
            else:
                lowered = _lowers(stage_peak(candidate, stage, fp, shape), current)
            if lowered:
                return candidate, name, skipped
            reason = f"predicted not to lower the {'host RAM' if host_oom else stage} peak"
        skipped.append((name, reason))
    return None, None, skipped
