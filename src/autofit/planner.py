"""The planner: footprint + hardware + workload + policy -> every candidate plan with predicted
stage peaks, host RAM and seconds, and the one to start from. Pure: no torch, no I/O.

Time is predicted, not guessed from the memory ranking alone. Measured on an H200 (shared
reference): for a Flux-sized pipeline model CPU offload took 18.9 s for 4 steps and leaf-level
group offload with streams 2.33 s, while for SDXL at 30 steps model offload (3.29 s) beat both
group offload (7.12 s) and fp8 casting on the device (3.78 s). The cost model below reproduces
those orderings from weight bytes moved per call and per step, the host-to-device bandwidths,
per-leaf overheads and a compute estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from .footprint import Footprint
from .ladder import POLICIES, SPECS, activation_factor, kept_on_device, pinned_bytes, resident_bytes
from .plan import CallShape, Plan

GB = 1e9
GIB = 2**30

# Calibrated on the H200 figures above (SDXL 1024x1024 with CFG: 0.058 s/step for 5.13 GB of UNet).
COMPUTE_S_PER_GB_MP = 0.0054
LEAF_OVERHEAD_S = 50e-6  # per leaf module per step under leaf-level offload
FP8_CAST_S_PER_GB = 0.014  # per step per GB of cast weights (SDXL: +2.0 s over 30 steps)
# bitsandbytes: per step, per GB of the denoiser's full-precision weights. Measured on an H100
# (SDXL-sized, 1024x1024, CFG, 10 steps): nf4 1.26 s vs 0.71 s unquantized (+0.0107 s/GB/step),
# LLM.int8 (threshold 6.0) 2.79 s (+0.041). A Flux-sized transformer lost far less to nf4 on an
# H200 (0.84 vs 0.78 s, 4 steps): its matmuls are larger; the SDXL figure is the cautious one.
QUANT_S_PER_GB = {"nf4": 0.0107, "int8": 0.041}
DECODE_S_PER_MP = 0.12
VAE_CPU_S_PER_MP = 30.0


@dataclass(frozen=True, slots=True)
class Workload:
    height: int = 1024
    width: int = 1024
    frames: int = 1
    batch: int = 1
    steps: int = 30
    cfg: bool = True
    temporal_factor: int = 4  # frames per latent frame of a video VAE (Wan, CogVideoX, HunyuanVideo)

    @property
    def megapixels(self) -> float:
        """Pixels decoded, all frames."""
        return self.height * self.width * self.frames / 1e6

    @property
    def latent_frames(self) -> int:
        return 1 if self.frames <= 1 else (self.frames - 1) // max(self.temporal_factor, 1) + 1

    @property
    def latent_megapixels(self) -> float:
        """What the denoiser's tokens scale with: one frame's megapixels x latent frames (a
        121-frame video is 31 latent frames, not 121 images)."""
        return self.height * self.width * self.latent_frames / 1e6


@dataclass(frozen=True, slots=True)
class Machine:
    """The hardware facts the planner uses (see :func:`autofit.hardware.probe`)."""

    budget_bytes: int
    host_available_bytes: int
    device_type: str = "cuda"
    pinned_gbps: float = 55.5
    pageable_gbps: float = 8.9
    quant_missing: str | None = None  # why bitsandbytes cannot quantize here (see quantize.missing)
    pinned_available_bytes: int | None = None  # what can be page-locked (None: all of host_available)

    @property
    def pinned_room(self) -> int:
        if self.pinned_available_bytes is None:
            return self.host_available_bytes
        return min(self.pinned_available_bytes, self.host_available_bytes)

    @property
    def streams(self) -> bool:
        return self.device_type in ("cuda", "xpu")


@dataclass(frozen=True, slots=True)
class Candidate:
    plan: Plan
    peaks: dict[str, int]
    vram: int
    ram: int
    seconds: float
    quality: str
    fits: bool
    why_not: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names


def activation_bytes(stage: str, fp: Footprint, wl: Workload, measured: dict[str, int] | None = None) -> int:
    """A per stage: measured when a run succeeded, else estimated from resolution, frames, batch.

    Estimates from the H200 measurements at 1024x1024 (one image): encode ~0.15 GiB, denoise
    ~0.46 GiB for a UNet with CFG and ~0.5 GiB for a transformer, decode ~2.5 GiB (16-bit VAE).
    Video: the denoiser sees latent frames (a quarter of the frames), which puts a 121-frame
    960x544 clip at ~8 GiB without CFG, the guide's "~7-8 GB"; diffusers' video VAEs decode a
    latent frame or two at a time with a causal cache, taken as twice one latent frame's frames
    (not measured; the measured peak replaces it after the first run).
    """
    if measured and stage in measured:
        return measured[stage]
    mp = wl.latent_megapixels
    if stage == "encode":
        largest = max((c.bytes for c in fp.by_role("encode")), default=0)
        return int(min(0.15 * GIB, 0.12 * largest) * wl.batch)
    if stage == "denoise":
        per = 0.23 if any(c.name.startswith("unet") for c in fp.by_role("denoise")) else 0.5
        return int(per * GIB * mp * wl.batch * (2 if wl.cfg else 1))
    if stage == "decode":
        vae = fp.by_role("decode")
        width = 2 if vae and vae[0].dtype == "float32" else 1
        frames = 1 if wl.frames <= 1 else min(wl.frames, 2 * max(wl.temporal_factor, 1))
        return int(2.4 * GIB * wl.height * wl.width / 1e6 * frames * wl.batch * width)
    return 0


def _bytes(fp: Footprint, role: str, plan: Plan) -> int:
    """Weight bytes of a role's components that an offloading placement moves (quantized
    components kept on the device move nothing)."""
    kept = kept_on_device(plan, fp)
    return sum(c.stored_bytes(plan.storage) for c in fp.by_role(role) if c.name not in kept)


def predict_seconds(plan: Plan, fp: Footprint, m: Machine, wl: Workload) -> float:
    den, enc = _bytes(fp, "denoise", plan) / GB, _bytes(fp, "encode", plan) / GB
    total = sum(_bytes(fp, r, plan) for r in ("denoise", "encode", "decode")) / GB
    kept = kept_on_device(plan, fp)
    leaves = sum(c.leaf_count for c in fp.by_role("denoise") if c.name not in kept)
    eff_batch = wl.batch * (2 if wl.cfg else 1)
    full_den = sum(c.bytes for c in fp.by_role("denoise")) / GB
    compute = COMPUTE_S_PER_GB_MP * full_den * max(wl.latent_megapixels, 0.01) * eff_batch  # per step
    pin, page = m.pinned_gbps, m.pageable_gbps
    steps = wl.steps
    if pinned_bytes(plan, fp) > m.pinned_room:
        pin = page  # the per-call buffers fall back to pageable memory (strategies/residency.py)
    t = steps * compute + DECODE_S_PER_MP * wl.megapixels * wl.batch
    p = plan.placement
    if p == "device":
        if "offload_encoders" in plan.extras:
            t += 2 * enc / pin
        if "offload_for_decode" in plan.extras:
            kept = den + (0 if "offload_encoders" in plan.extras else enc)
            t += 2 * kept / pin
    elif p == "model_offload":
        # In from pageable memory, out into freshly allocated pageable memory (page faults make
        # that direction about half as fast): SDXL on an H200 lost 1.55-2.7 s per call to it.
        t += total / page + total / (page / 2)
    elif p == "group_leaf_stream":
        t += steps * (max(den / pin, compute) - compute + leaves * LEAF_OVERHEAD_S) + enc / pin
    elif p == "group_leaf_lowmem":
        t += steps * (max(den / page, compute) - compute + leaves * LEAF_OVERHEAD_S) + enc / page
    elif p == "group_block":
        t += steps * den / (page / 2) + enc / (page / 2)
    elif p == "group_leaf":
        t += steps * (den / (page / 2) + 2 * leaves * LEAF_OVERHEAD_S) + enc / (page / 2)
    elif p == "sequential":
        t += 1.2 * (steps * (den / (page / 2) + 2 * leaves * LEAF_OVERHEAD_S) + enc / (page / 2))
    if "fp8" in plan.extras:
        cast = sum(c.cast_bytes for c in fp.by_role("denoise") if c.fp8_ok) / GB
        t += steps * FP8_CAST_S_PER_GB * cast * eff_batch
    if plan.storage in QUANT_S_PER_GB:
        quantized = sum(c.bytes for c in fp.by_role("denoise") if c.quant_ok) / GB
        t += steps * QUANT_S_PER_GB[plan.storage] * quantized
    tiling = plan.tiling
    if tiling is not None:
        t += DECODE_S_PER_MP * wl.megapixels * wl.batch * (0.1 if tiling == "normal" else 0.4)
    if "vae_cpu" in plan.extras:
        t += VAE_CPU_S_PER_MP * wl.megapixels * wl.batch
    return t


def usable(budget: int, margin: float | None = None) -> int:
    """The part of the budget a plan may fill. Default: keep max(0.5 GiB, 6%) free for the
    allocator's fragmentation and transient workspaces (never more than a quarter of the budget) (measured on an H200: a tiled SDXL decode
    that predicted 7.22 GiB peaked at 7.22 allocated and ran under an 8 GiB cap)."""
    if margin is not None:
        return int(margin * budget)
    return int(budget - min(max(0.5 * GIB, 0.06 * budget), 0.25 * budget))


def predict(plan: Plan, fp: Footprint, m: Machine, wl: Workload, *, measured: dict[str, int] | None = None,
            margin: float | None = None, policy: str = "quality") -> Candidate:
    from .ladder import host_bytes

    shape = CallShape(batch=wl.batch, height=wl.height, width=wl.width)
    peaks = {}
    for stage in ("load", "encode", "denoise", "decode"):
        act = activation_bytes(stage, fp, wl, measured)
        peaks[stage] = resident_bytes(plan, stage, fp) + int(act * activation_factor(plan, stage, shape))
    if plan.placement == "model_offload":
        # accelerate offloads the previous component only when the next one is called: it is
        # still resident when the stage starts (measured SDXL decode peak 4.91 GiB = the UNet).
        enc = max((c.bytes for c in fp.by_role("encode")), default=0)
        den = max((c.bytes for c in fp.by_role("denoise")), default=0)
        peaks["denoise"] = max(peaks["denoise"], enc)
        peaks["decode"] = max(peaks["decode"], den)
    vram = max(peaks.values())
    ram = host_bytes(plan, fp)
    quality = "lossy" if any(SPECS[n].quality == "lossy" for n in plan.names if n in SPECS) else (
        "near_lossless" if plan.tiling else "lossless")
    why = None
    if quality not in POLICIES[policy]:
        why = f"{quality}; policy {policy!r} does not allow it"
    elif plan.placement in ("group_leaf_stream", "group_leaf_lowmem") and not m.streams:
        why = f"needs CUDA/XPU streams (device is {m.device_type})"
    elif plan.storage in ("int8", "nf4") and m.quant_missing:
        why = m.quant_missing
    elif plan.placement == "sequential" and m.device_type == "cpu":
        why = "sequential offload needs an accelerator"
    elif vram > usable(m.budget_bytes, margin):
        why = (f"predicted peak {vram / GIB:.2f} GiB > {usable(m.budget_bytes, margin) / GIB:.2f} GiB usable "
               f"of the {m.budget_bytes / GIB:.2f} GiB budget")
    elif ram > 0.9 * m.host_available_bytes:
        why = f"needs {ram / GIB:.1f} GiB host RAM, {m.host_available_bytes / GIB:.1f} GiB available"
    elif plan.placement == "group_leaf_stream" and (pinned := pinned_bytes(plan, fp)) > 0.9 * m.pinned_room:
        why = f"needs {pinned / GIB:.1f} GiB of pinned host RAM, {m.pinned_room / GIB:.1f} GiB can be pinned"
    return Candidate(plan, peaks, vram, ram, predict_seconds(plan, fp, m, wl), quality, why is None, why)


def candidate_plans(fp: Footprint) -> list[Plan]:
    """Every plan worth comparing: placements x fp8 x decode remedies (x dynamic residency)."""
    has_enc = bool(fp.by_role("encode"))
    decode_options = [frozenset(), frozenset({"vae_tiling"}), frozenset({"vae_tiling_small"}), frozenset({"vae_cpu"})]
    plans = []
    quantizable = any(c.quant_ok for c in fp.components.values())
    storages = (None, "fp8") + (("int8", "nf4") if quantizable else ())
    for placement, storage, dec in product(
        ("device", "model_offload", "group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf",
         "sequential"),
        storages,
        decode_options,
    ):
        if storage and placement == "sequential":
            continue
        base = dec | ({storage} if storage else set())
        variants = [base]
        if placement == "device":
            variants += [base | {"offload_for_decode"}]
            if has_enc:
                variants += [base | {"offload_encoders"}, base | {"offload_encoders", "offload_for_decode"}]
        for extras in variants:
            plans.append(Plan(placement, frozenset(extras)))
    return plans


def rank(fp: Footprint, m: Machine, wl: Workload, *, policy: str = "quality",
         measured: dict[str, int] | None = None, margin: float | None = None,
         forbid: frozenset[str] = frozenset()) -> list[Candidate]:
    """All candidates, the ones that fit first, in the policy's order of preference. Plans using
    a strategy in ``forbid`` (found broken before) are left out."""
    cands = [predict(p, fp, m, wl, measured=measured, margin=margin, policy=policy)
             for p in candidate_plans(fp) if not (set(p.names) & forbid)]
    if policy == "memory":
        key = lambda c: (not c.fits, c.vram, c.seconds)  # noqa: E731
    elif policy == "balanced":
        # The lightest technique that fits comfortably: prefer ~80% of the budget, then speed.
        key = lambda c: (not c.fits, c.vram > 0.8 * m.budget_bytes, c.seconds)  # noqa: E731
    else:  # quality (lossy already filtered out as not fitting) and speed
        key = lambda c: (not c.fits, c.seconds, len(c.names))  # noqa: E731
    return sorted(cands, key=key)


def choose(fp: Footprint, m: Machine, wl: Workload, *, policy: str = "quality",
           measured: dict[str, int] | None = None, margin: float | None = None,
           forbid: frozenset[str] = frozenset()) -> Candidate | None:
    best = rank(fp, m, wl, policy=policy, measured=measured, margin=margin, forbid=forbid)[0]
    return best if best.fits else None
