"""The cost model of a plan: device bytes per stage, host and pinned bytes, and seconds. Pure:
footprints, plans and the context in, numbers out; no torch, no I/O. The ladder and the planner
both read it (through :mod:`autofit.planning.rungs` for the rules), so they cannot disagree on a cost.

Time is predicted, not guessed from the memory ranking alone. Measured on an H200 (shared
reference): for a Flux-sized pipeline model CPU offload took 18.9 s for 4 steps and leaf-level
group offload with streams 2.33 s, while for SDXL at 30 steps model offload (3.29 s) beat both
group offload (7.12 s) and fp8 casting on the device (3.78 s). The model below reproduces those
orderings from weight bytes moved per call and per step, the host-to-device bandwidths, per-leaf
overheads and a compute estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autofit.facts.footprint import QUANT_ENCODER_FAMILIES, QUANT_MIN_ENCODER_BYTES, ComponentFootprint, Footprint
from autofit.units import GIB

if TYPE_CHECKING:
    from autofit.planning.context import Machine, Workload
    from autofit.plan import Plan

# A plan may fill this share of the host RAM (or of what can be pinned) it is given: the rest is
# the process's own and the page cache's.
HOST_SHARE = 0.9

GB = 1e9
VAE_REFERENCE_WIDTH = 128  # block_out_channels[0] of the SDXL VAE the decode figure was measured with

# Calibrated on the H200 figures above (SDXL 1024x1024 with CFG: 0.058 s/step for 5.13 GB of UNet).
COMPUTE_S_PER_GB_MP = 0.0054
LEAF_OVERHEAD_S = 50e-6  # per leaf module per step under leaf-level offload
# What a storage rung costs per step is its row's (autofit.plan.STORING: fp8 casts, bitsandbytes).
# resident_stream (strategies/partial.py): the denoiser is cut into units (blocks, or the layers of
# a block larger than 1/UNITS of it); PREFETCH_DEPTH units are copied ahead of the one running.
UNITS = 32
PREFETCH_DEPTH = 2
UNIT_OVERHEAD_S = 60e-6  # per streamed unit per step: two hooks, an event, the copies' launches (not measured)
# group_disk reads each block back from its file every step. Not measured: a cautious NVMe read
# rate (the page cache makes reads faster while host RAM is free, but then a RAM-backed
# placement fits and is chosen over this one).
DISK_GBPS = 2.0
DECODE_S_PER_MP = 0.12
VAE_CPU_S_PER_MP = 30.0



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
    if not (plan.bitsandbytes and plan.placing.keeps_quantized):
        return set()
    return {c.name for c in fp.components.values() if c.quant_ok}


def _role_names(fp: Footprint, role: str) -> list[str]:
    return [c.name for c in fp.by_role(role)]


def streamed_whole(role: str | None, class_name: str, nbytes: int) -> bool:
    """Text encoders resident_stream streams entirely: they run once a call, so streaming them
    costs one pass of copies, and a large one (T5-XXL: 8.9 GiB) would crowd the denoiser out."""
    return role == "encode" and (class_name.startswith(QUANT_ENCODER_FAMILIES) or nbytes >= QUANT_MIN_ENCODER_BYTES)


def unit_bytes(c: ComponentFootprint, plan: Plan) -> int:
    """The largest unit resident_stream moves at once: a block, or 1/UNITS of the component
    when its blocks are larger (their layers are split), never less than one leaf."""
    unit = min(c.block_bytes, max(c.bytes // UNITS, c.leaf_bytes))
    return int(unit * c.stored_bytes(plan.storage) / c.bytes) if c.bytes else 0


def resident_split(plan: Plan, fp: Footprint) -> dict[str, tuple[int, int]]:
    """Under resident_stream: component -> (bytes kept on the device, bytes streamed). The
    denoiser keeps ``plan.resident`` percent (at least its largest leaf: embeddings and norms
    outside the blocks stay); large text encoders keep about one leaf (their embedding)."""
    kept = kept_on_device(plan, fp)
    out = {}
    for name, c in fp.components.items():
        size = c.stored_bytes(plan.storage)
        if name in kept or not (c.role == "denoise" or streamed_whole(c.role, c.class_name, c.bytes)):
            out[name] = (size, 0)
            continue
        share = (plan.resident or 0) / 100 if c.role == "denoise" else 0.0
        resident = min(size, max(int(share * size), _granule(fp, name, plan, "leaf_bytes")))
        out[name] = (resident, size - resident)
    return out


def _resident_stream_bytes(plan: Plan, stage: str, fp: Footprint) -> int:
    split = resident_split(plan, fp)
    on = sum(r for n, (r, _) in split.items() if not (plan.decode_on_cpu and fp.components[n].role == "decode"))
    def unit(role: str) -> int:
        return max((unit_bytes(fp.components[n], plan) for n, (_, s) in split.items()
                    if s and fp.components[n].role == role), default=0)

    if stage == "load":
        return on
    # The denoiser's prefetch wraps around (the last block of a step sends for the first ones of
    # the next), so PREFETCH_DEPTH of its units stay on the device between steps and calls.
    on += PREFETCH_DEPTH * unit("denoise")
    if stage == "denoise":
        on += unit("denoise")  # the one running
    elif stage == "encode":
        on += (1 + PREFETCH_DEPTH) * unit("encode")  # encoders run once: no wrap-around
    return on


def _stage_names(fp: Footprint, stage: str) -> list[str]:
    """The components ``stage`` runs (the VAE's encoder is the decode-stage components' stage too)."""
    if stage == "load":
        return list(fp.components)
    return _role_names(fp, "decode" if stage == "vae_encode" else stage)


def _all_on_device(plan: Plan, stage: str, fp: Footprint) -> int:
    """Scheme ``none``: every component on the device, less the ones the plan's extras keep on
    the CPU (at this stage)."""
    enc, vae = _role_names(fp, "encode"), _role_names(fp, "decode")
    on = set(fp.components)
    if plan.decode_on_cpu:
        on -= set(vae)
    if plan.encoders_on_demand:
        on -= set(enc)
        if stage == "encode" and enc:
            on.add(max(enc, key=lambda n: _size(fp, n, plan)))
    if stage in ("decode", "vae_encode") and plan.decode_alone:
        on &= set(vae)
    return sum(_size(fp, n, plan) for n in on)


def _offloaded(plan: Plan, stage: str, fp: Footprint) -> tuple[int, list[str]]:
    """Bytes of the quantized components kept on the device, and the stage's other components."""
    pinned = kept_on_device(plan, fp)
    fixed = sum(_size(fp, n, plan) for n in pinned)
    return fixed, [n for n in _stage_names(fp, stage) if n not in pinned]


def _one_component(plan: Plan, stage: str, fp: Footprint) -> int:
    """Scheme ``component``: the stage's largest component, moved on whole."""
    fixed, mine = _offloaded(plan, stage, fp)
    if stage == "load":
        return fixed
    vae = _role_names(fp, "decode")
    pool = [n for n in mine if not (plan.decode_on_cpu and n in vae)]
    return fixed + max((_size(fp, n, plan) for n in pool), default=0)


def _one_leaf(plan: Plan, stage: str, fp: Footprint) -> int:
    """Scheme ``layer``: one leaf at a time, nothing resident between uses."""
    _, mine = _offloaded(plan, stage, fp)
    return 0 if stage == "load" else max((_granule(fp, n, plan, "leaf_bytes") for n in mine), default=0)


def _grouped(plan: Plan, stage: str, fp: Footprint) -> int:
    """Scheme ``group``: the VAE is excluded and stays on the device (small, and tiling needs it
    whole); the stage's largest granule (leaf or block) on top."""
    fixed, mine = _offloaded(plan, stage, fp)
    kept = fixed + (0 if plan.decode_on_cpu else sum(_size(fp, n, plan) for n in _role_names(fp, "decode")))
    if stage in ("load", "decode", "vae_encode"):
        return kept
    # Leaf-level: current + prefetched leaf in theory; measured on an H200 (SDXL, leaf + streams)
    # the stage peaks sat one leaf above the activations, not two.
    attr = "block_bytes" if plan.placing.group == "block" else "leaf_bytes"
    return kept + max((_granule(fp, n, plan, attr) for n in mine), default=0)


# Weight bytes on the device during a stage, by the placement's scheme (autofit.plan.Placing).
_RESIDENT_BY_SCHEME = {"none": _all_on_device, "component": _one_component, "layer": _one_leaf,
                       "group": _grouped, "partial": _resident_stream_bytes}


def resident_bytes(plan: Plan, stage: str, fp: Footprint) -> int:
    """Predicted weight bytes on the device while ``stage`` runs under ``plan``."""
    return _RESIDENT_BY_SCHEME[plan.placing.scheme](plan, stage, fp)


def activation_factor(plan: Plan, stage: str, wl: Workload) -> float:
    """Relative activation memory of the stage (1.0 = unchanged): batch splits and decode rungs."""
    if stage == "denoise":
        return 1.0 / min(plan.denoise_chunks(wl.batch), max(wl.batch, 1)) if wl.batch > 1 else 1.0
    if stage not in ("decode", "vae_encode"):
        return 1.0
    if plan.decode_on_cpu:
        return 0.0
    f = 1.0
    if plan.decode_sliced and wl.batch > 1:
        f /= wl.batch
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
    if plan.offloads:
        return []
    out = set()
    if plan.encoders_on_demand:
        out |= set(_role_names(fp, "encode"))
    if plan.decode_alone:
        out |= {n for n, c in fp.components.items() if c.role != "decode"}
    return sorted(out)


def _through_buffers(plan: Plan, fp: Footprint, name: str) -> bool:
    # bitsandbytes components move with their own .to() (pageable), not through the buffers.
    return not (plan.bitsandbytes and fp.components[name].stored_by(plan.storage))


def pinned_bytes(plan: Plan, fp: Footprint) -> int:
    """Page-locked host RAM the plan holds: the pinned copies leaf-level group offload with streams
    makes of every offloaded tensor, or the reusable buffers of per-call moves. Each tensor is
    rounded up to a power of two by torch's pinned allocator (footprint.pinned_size)."""
    if plan.placing.pins_copies:
        kept = kept_on_device(plan, fp)
        return sum(c.pinned_stored(plan.storage) for c in fp.components.values() if c.name not in kept)
    if plan.placing.scheme == "partial":  # a few large chunks holding exactly the streamed weights
        return sum(s for _, s in resident_split(plan, fp).values())
    return sum(fp.components[n].pinned_stored(plan.storage)
               for n in _moved_each_call(plan, fp) if _through_buffers(plan, fp, n))


def disk_names(plan: Plan, fp: Footprint) -> list[str]:
    """Components group_disk writes to disk: all but the VAE and quantized ones kept on the device."""
    if not plan.placing.disk:
        return []
    kept = kept_on_device(plan, fp) | set(_role_names(fp, "decode"))
    return [n for n in fp.components if n not in kept]


def disk_bytes(plan: Plan, fp: Footprint) -> int:
    """Bytes the plan writes to the offload folder."""
    return sum(_size(fp, n, plan) for n in disk_names(plan, fp))


def host_bytes(plan: Plan, fp: Footprint) -> int:
    """Predicted host RAM the plan holds for the pipeline (weights kept off the device, pinned
    copies, and the original weights of quantized components kept to undo the rung, unless the
    checkpoint they were loaded from serves as that copy)."""
    pinned = kept_on_device(plan, fp)
    originals = sum(c.bytes for c in fp.components.values()
                    if plan.bitsandbytes and c.quant_ok and not c.restorable)
    terms = plan.placing
    if not terms.offloads:
        pageable = [n for n in _moved_each_call(plan, fp) if not _through_buffers(plan, fp, n)]
        if plan.decode_on_cpu:
            pageable += _role_names(fp, "decode")
        return originals + pinned_bytes(plan, fp) + sum(_size(fp, n, plan) for n in pageable)
    if terms.disk:  # the offloaded weights live in files, read a block at a time
        return originals + max((_granule(fp, n, plan, "block_bytes") for n in disk_names(plan, fp)), default=0)
    if terms.pins_copies or terms.scheme == "partial":
        # The pinned copies replace the pageable weights group by group as they are made; under
        # resident_stream the resident weights keep no host copy at all.
        return originals + pinned_bytes(plan, fp)
    return originals + sum(_size(fp, n, plan) for n in fp.components if n not in pinned)


def stage_peak(plan: Plan, stage: str, fp: Footprint, wl: Workload) -> tuple[int, float]:
    return resident_bytes(plan, stage, fp), activation_factor(plan, stage, wl)


def stage_peaks(plan: Plan, fp: Footprint, wl: Workload, measured: dict[str, int] | None = None) -> dict[str, int]:
    """Predicted device bytes at each stage's peak: resident weights plus scaled activations."""
    return {s: resident_bytes(plan, s, fp) + int(activation_bytes(s, fp, wl, measured) * activation_factor(plan, s, wl))
            for s in ("load", "encode", "denoise", "decode")}



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
    if stage in ("decode", "vae_encode"):
        # The encoder is taken at half the decoder's activations (not measured).
        share = 0.5 if stage == "vae_encode" else 1.0
        vae = fp.by_role("decode")
        width = 2 if vae and vae[0].dtype == "float32" else 1
        # Feature maps at full resolution hold most of it: they scale with the VAE's channels there.
        channels = (vae[0].feature_width or VAE_REFERENCE_WIDTH) / VAE_REFERENCE_WIDTH if vae else 1.0
        frames = 1 if wl.frames <= 1 else min(wl.frames, 2 * max(wl.temporal_factor, 1))
        return int(share * 2.4 * GIB * wl.height * wl.width / 1e6 * frames * wl.batch * width * channels)
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
    terms = plan.placing
    if not terms.offloads:
        if plan.encoders_on_demand:
            t += 2 * enc / pin
        if plan.decode_alone:
            kept = den + (0 if plan.encoders_on_demand else enc)
            t += 2 * kept / pin
    elif terms.scheme == "component":
        # In from pageable memory, out into freshly allocated pageable memory (page faults make
        # that direction about half as fast): SDXL on an H200 lost 1.55-2.7 s per call to it.
        t += total / page + total / (page / 2)
    elif terms.scheme == "partial":
        # Each step copies the streamed part of the denoiser while the resident part computes:
        # max(compute, copy), plus per-unit hook costs; the encoders' streamed part once a call.
        split = resident_split(plan, fp)
        den_s = sum(split[c.name][1] for c in fp.by_role("denoise")) / GB
        enc_s = sum(split[c.name][1] for c in fp.by_role("encode")) / GB
        units = sum(split[c.name][1] / max(unit_bytes(c, plan), 1) for c in fp.by_role("denoise"))
        t += steps * (max(den_s / pin, compute) - compute + units * UNIT_OVERHEAD_S) + enc_s / pin
    else:  # group and layer schemes: the placement's transfer terms
        rate = {"pinned": pin, "pageable": page, "pageable_out": page / 2, "disk": DISK_GBPS}[terms.rate]
        if terms.overlap:  # copies hidden behind the compute
            per_call = steps * (max(den / rate, compute) - compute + terms.hook_calls * leaves * LEAF_OVERHEAD_S)
        elif terms.hook_calls:
            per_call = steps * (den / rate + terms.hook_calls * leaves * LEAF_OVERHEAD_S)
        else:
            per_call = steps * den / rate
        t += terms.scale * (per_call + enc / rate)
    storage = plan.storing
    if storage is not None and storage.cast_s_per_gb:
        cast = sum(getattr(c, storage.size) for c in fp.by_role("denoise") if getattr(c, storage.targets)) / GB
        t += steps * storage.cast_s_per_gb * cast * eff_batch
    if storage is not None and storage.quant_s_per_gb:
        quantized = sum(c.bytes for c in fp.by_role("denoise") if getattr(c, storage.targets)) / GB
        t += steps * storage.quant_s_per_gb * quantized
    tiling = plan.tiling
    if tiling is not None:
        t += DECODE_S_PER_MP * wl.megapixels * wl.batch * (0.1 if tiling == "normal" else 0.4)
    if plan.decode_on_cpu:
        t += VAE_CPU_S_PER_MP * wl.megapixels * wl.batch
    return t


def usable(budget: int, margin: float | None = None) -> int:
    """The part of the budget a plan may fill. Default: keep max(0.5 GiB, 6%) free for the
    allocator's fragmentation and transient workspaces (never more than a quarter of the budget) (measured on an H200: a tiled SDXL decode
    that predicted 7.22 GiB peaked at 7.22 allocated and ran under an 8 GiB cap)."""
    if margin is not None:
        return int(margin * budget)
    return int(budget - min(max(0.5 * GIB, 0.06 * budget), 0.25 * budget))


