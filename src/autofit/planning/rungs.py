"""One table of rungs: what each one is, what it replaces, and what it needs.

The ladder (which rung next, after an OOM) and the planner (which whole plan, before a call) both
read this table through :func:`refusal` and keep no checks of their own, so a plan the planner
calls fitting is one the ladder would accept, for the same reasons. Costs (device, host and
pinned bytes, seconds) live in :mod:`autofit.planning.cost`, one model for both.

A rule is a :class:`Need`: a small predicate over the plan being judged (with the rung in it) and
the :class:`~autofit.planning.context.Context`, returning why not, or None. Needs compose with ``|``, the
first refusal winning, in the spirit of tenacity's ``stop_any``. Pure: no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autofit.plan import (DEVICE_ONLY, EXTRAS, PLACEMENTS, PLACING, REPLACES, RESIDENT_MAX, RESIDENT_MIN,
                          STORAGE, STORING, Placing, Storing, kind, split_name)
from autofit.planning import cost
from autofit.planning.context import POLICIES
from autofit.units import GIB

if TYPE_CHECKING:
    from autofit.planning.context import Context
    from autofit.plan import Plan

Check = Callable[["Plan", "Context"], "str | None"]


class Need:
    """A rule a plan must meet: ``need(plan, ctx)`` is None, or the reason it is not met."""

    __slots__ = ("_checks",)

    def __init__(self, *checks: Check):
        self._checks = checks

    def __call__(self, plan: Plan, ctx: Context) -> str | None:
        for check in self._checks:
            reason = check(plan, ctx)
            if reason:
                return reason
        return None

    def __or__(self, other: Need) -> Need:
        return Need(*self._checks, *other._checks)


NOTHING = Need()


def need(check: Check) -> Need:
    return Need(check)


# ---- the predicates ------------------------------------------------------------------------
@need
def device_placement(plan: Plan, ctx: Context) -> str | None:
    return "only applies while every component is on the device" if plan.offloads else None


@need
def device_memory(plan: Plan, ctx: Context) -> str | None:
    if ctx.machine.device_type == "cpu":
        return "the CPU's memory is the host's: keeping part of a component resident saves nothing there"
    return None


@need
def text_encoders(plan: Plan, ctx: Context) -> str | None:
    return None if ctx.footprint.by_role("encode") else "pipeline has no text encoders"


@need
def offload_sequence(plan: Plan, ctx: Context) -> str | None:
    # diffusers raises a ValueError on every call of enable_model_cpu_offload() without it.
    return None if ctx.pipeline.has_offload_seq else "pipeline class has no model_cpu_offload_seq"


@need
def streams(plan: Plan, ctx: Context) -> str | None:
    dt = ctx.machine.device_type
    return None if ctx.machine.streams else f"needs CUDA/XPU streams; device is {dt}"


@need
def accelerator(plan: Plan, ctx: Context) -> str | None:
    if ctx.machine.device_type == "cpu":
        return "accelerate's sequential offload needs an accelerator as execution device"
    return None


@need
def host_ram(plan: Plan, ctx: Context) -> str | None:
    """The host RAM the plan holds (offloaded weights, pinned copies, undo copies) fits."""
    m = ctx.machine
    held = cost.host_bytes(plan, ctx.footprint)
    if held > cost.HOST_SHARE * m.host_available_bytes:
        return f"needs {held / GIB:.1f} GiB of host RAM, {m.host_available_bytes / GIB:.1f} GiB available"
    return None


@need
def pinned_ram(plan: Plan, ctx: Context) -> str | None:
    """Streamed group offload pins a copy of every offloaded tensor up front."""
    pinned = cost.pinned_bytes(plan, ctx.footprint)
    room = ctx.machine.pinned_room
    if plan.placing.pins_copies and pinned > cost.HOST_SHARE * room:
        return f"needs {pinned / GIB:.1f} GiB of pinned host RAM, {room / GIB:.1f} GiB can be pinned"
    return None


@need
def disk_room(plan: Plan, ctx: Context) -> str | None:
    """group_disk writes the offloaded weights to the offload folder (autofit.disk), which must
    be writable (an unwritable one is a reason to pass the rung over, not an error)."""
    if ctx.machine.disk_unusable:
        return ctx.machine.disk_unusable
    free = ctx.machine.disk_available_bytes
    written = cost.disk_bytes(plan, ctx.footprint)
    if free is None:
        return "free disk space at the offload folder is not known"
    if written > cost.HOST_SHARE * free:
        return f"writes {written / GIB:.1f} GiB to disk, {free / GIB:.1f} GiB free at the offload folder"
    return None


@need
def no_bitsandbytes(plan: Plan, ctx: Context) -> str | None:
    if ctx.pipeline.has_bnb or plan.bitsandbytes:
        return "bitsandbytes weights are not combined with sequential offload"
    return None


@need
def not_sequential(plan: Plan, ctx: Context) -> str | None:
    if plan.placement != "sequential":
        return None
    if plan.storage == "fp8":
        return "fp8 casting is not combined with sequential offload"
    return "bitsandbytes weights are not combined with sequential offload"


@need
def no_fp8(plan: Plan, ctx: Context) -> str | None:
    return "fp8 casting is not combined with sequential offload" if plan.storage == "fp8" else None


@need
def a_batch(plan: Plan, ctx: Context) -> str | None:
    return None if ctx.workload.batch > 1 else "batch of 1: nothing to split"


@need
def vae_slices(plan: Plan, ctx: Context) -> str | None:
    return None if ctx.pipeline.vae_can_slice else "VAE has no slicing"


@need
def vae_tiles(plan: Plan, ctx: Context) -> str | None:
    return None if ctx.pipeline.vae_can_tile else "VAE has no tiling"


@need
def fp8_here(plan: Plan, ctx: Context) -> str | None:
    if not ctx.pipeline.fp8_supported:
        return "this torch build has no float8_e4m3fn"
    return _targets_left("fp8", [c.name for c in ctx.footprint.components.values() if c.fp8_ok], ctx,
                         "no component can be stored in fp8")


def _targets_left(rung: str, targets: list[str], ctx: Context, none: str) -> str | None:
    if not targets:
        return none
    broken = sorted(n for r, n in ctx.pipeline.broken if r == rung)
    if all(n in broken for n in targets):
        return f"{rung} broke {', '.join(broken)} before (marked broken in the plan cache)"
    return None


def _quantizable(rung: str) -> Need:
    @need
    def check(plan: Plan, ctx: Context) -> str | None:
        if ctx.machine.quant_missing:
            return ctx.machine.quant_missing
        targets = [c for c in ctx.footprint.components.values() if c.quant_ok]
        reason = _targets_left(rung, [c.name for c in targets], ctx,
                               "no component to quantize (a denoiser or a large text encoder with Linear layers)")
        if reason:
            return reason
        largest = max(c.bytes for c in targets)
        host = ctx.machine.host_available_bytes
        if ctx.machine.device_type != "cpu" and host < largest:
            # The guide's rule: the full-precision weights are quantized from host RAM.
            return (f"host RAM cannot hold the full-precision weights to quantize ({largest / GIB:.1f} GiB needed, "
                    f"{host / GIB:.1f} GiB available)")
        return None

    return check


def _unlocked(rung: str) -> Need:
    @need
    def check(plan: Plan, ctx: Context) -> str | None:
        locked = ctx.pipeline.storage_locked
        if locked and locked != rung:
            return f"{locked} is applied and its original weights were not kept: it cannot be swapped"
        return None

    return check


# ---- the table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rung:
    name: str
    kind: str  # "placement" (where weights live; one per plan), "storage" (one-way; one per plan), "extra"
    quality: str  # lossless | near_lossless | lossy
    needs: Need = NOTHING
    replaces: frozenset[str] = frozenset()  # rungs dropped from a plan when this one is added
    # The planner's grid (planner.candidate_plans): "decode", a decode remedy tried with every
    # plan; "moves", a per-call move tried while everything is on the device. None: placements
    # and storage are axes of their own; the rest only the ladder reaches.
    planned: str | None = None
    off_device: str | None = None  # the stage whose components the rung keeps on the CPU until used

    @property
    def reversible(self) -> bool:
        """Storage rungs change the weights: undone only from a copy (or the checkpoint)."""
        return self.kind != "storage"

    @property
    def terms(self) -> Placing | Storing | None:
        """What the rung does, as the cost model and the strategies read it (autofit.plan's
        PLACING / STORING; extras are read through Plan's properties). A placement's
        ``terms.scheme`` is the key strategies.placement.SCHEMES applies it by."""
        return PLACING.get(self.name) or STORING.get(self.name)


def _placement(name: str, needs: Need = NOTHING) -> Rung:
    return Rung(name, "placement", "lossless", needs | host_ram, replaces=DEVICE_ONLY)


def _storage(name: str, needs: Need) -> Rung:
    return Rung(name, "storage", "lossy", needs | _unlocked(name) | host_ram,
                replaces=frozenset(STORAGE) - {name})


def _table() -> tuple[Rung, ...]:
    """The rows (what each rung does: docs/recipes.md's table). A function, called once at import,
    so a test can build the rows again and check them."""
    return (
        _placement("resident_stream", device_memory),
        _placement("model_offload", offload_sequence),
        _placement("group_leaf_stream", streams | pinned_ram),
        _placement("group_leaf_lowmem", streams),
        _placement("group_block"),
        _placement("group_leaf"),
        _placement("group_disk", disk_room),
        _placement("sequential", no_bitsandbytes | no_fp8 | accelerator),
        Rung("split_batch", "extra", "lossless", a_batch),
        Rung("split_batch_max", "extra", "lossless", a_batch, replaces=frozenset({"split_batch"})),
        Rung("offload_encoders", "extra", "lossless", device_placement | text_encoders | host_ram, planned="moves",
             off_device="encode"),
        Rung("offload_for_decode", "extra", "lossless", device_placement | host_ram, planned="moves"),
        Rung("vae_slicing", "extra", "lossless", vae_slices | a_batch),
        Rung("vae_tiling", "extra", "near_lossless", vae_tiles, planned="decode"),
        Rung("vae_tiling_small", "extra", "near_lossless", vae_tiles, replaces=frozenset({"vae_tiling"}),
             planned="decode"),
        Rung("vae_cpu", "extra", "lossless", host_ram,
             replaces=frozenset({"vae_tiling", "vae_tiling_small", "vae_slicing"}), planned="decode", off_device="decode"),
        _storage("fp8", fp8_here | not_sequential),
        _storage("int8", _quantizable("int8") | not_sequential),
        _storage("nf4", _quantizable("nf4") | not_sequential),
    )


_TABLE = _table()
RUNGS: dict[str, Rung] = {r.name: r for r in _TABLE}
# One row for every name of the grammar (autofit.plan), of the grammar's kind, replacing what it says.
assert set(RUNGS) == set(PLACEMENTS[1:] + EXTRAS) and all(
    r.kind == kind(r.name) and r.replaces == REPLACES.get(r.name, frozenset()) for r in _TABLE), "rung table != grammar"
# The ladders (planning/ladder.py): per stage, the rungs tried after an OOM, in order. The guide's
# flowchart, lossless rungs first (lossy ones only when the policy allows).
LADDERS: dict[str, tuple[str, ...]] = {
    "load": ("resident_stream", "model_offload", "group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf",
             "group_disk", "sequential", "fp8", "int8", "nf4"),
    "encode": ("offload_encoders", "resident_stream", "model_offload", "group_leaf_stream", "group_leaf_lowmem",
               "group_leaf", "group_disk", "sequential", "fp8", "int8", "nf4"),
    "denoise": ("split_batch", "split_batch_max", "offload_encoders", "resident_stream", "model_offload",
                "group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf", "group_disk", "sequential",
                "fp8", "int8", "nf4"),
    # Splitting the batch comes before moving weights off the device (vae_slicing is the decode split).
    "decode": ("vae_slicing", "offload_for_decode", "vae_tiling", "vae_tiling_small", "vae_cpu"),
    # The VAE's encoder (img2img, inpaint, video-to-video): the same remedies, on the image encoded
    # (one image at a time, the encoder alone on the device, tiled encode, the CPU).
    "vae_encode": ("vae_slicing", "offload_for_decode", "vae_tiling", "vae_tiling_small", "vae_cpu"),
}
# After a host-RAM OOM: rungs that need less host RAM, never more device rungs.
HOST_LADDER: tuple[str, ...] = ("group_leaf_lowmem", "group_leaf", "group_block", "group_disk", "fp8")
assert {n for ladder in (*LADDERS.values(), HOST_LADDER) for n in ladder} <= set(RUNGS), "a ladder names no rung"
RESIDENT_STEP = 0.75  # an OOM under resident_stream keeps at most 3/4 of the resident bytes


def resident_plan(plan: Plan, percent: int) -> Plan:
    return plan.with_rung(f"resident_stream:{percent}")


def _fits(plan: Plan, ctx: Context, margin: float | None = None, measured: dict[str, int] | None = None) -> bool:
    room = cost.usable(ctx.machine.budget_bytes, margin)
    return max(cost.stage_peaks(plan, ctx.footprint, ctx.workload, measured).values()) <= room


def sized(plan: Plan, ctx: Context, margin: float | None = None, measured: dict[str, int] | None = None) -> Plan:
    """``plan`` with its quantity chosen for ``ctx``: for ``resident_stream``, the most of the
    denoiser that fits the budget (time only falls as residency rises), else the least there is.
    Other plans come back as they are."""
    if plan.family != "resident_stream":
        return plan
    lo, hi = RESIDENT_MIN, RESIDENT_MAX
    if not _fits(resident_plan(plan, lo), ctx, margin, measured):
        return resident_plan(plan, lo)
    while lo < hi:  # the largest percent that fits; peaks rise with it
        mid = (lo + hi + 1) // 2
        if _fits(resident_plan(plan, mid), ctx, margin, measured):
            lo = mid
        else:
            hi = mid - 1
    return resident_plan(plan, lo)


def step(name: str, plan: Plan, ctx: Context) -> Plan | None:
    """The ladder's candidate for rung ``name`` after an OOM under ``plan``, or None when the rung
    has nothing more to give. Adding a rung is one candidate; ``resident_stream`` steps down in
    quarters of the resident bytes (from the whole denoiser when it is not in force yet), jumping
    to the first step predicted to fit when one is, else one step (the prediction just failed)."""
    candidates = steps(name, plan)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    return next((s for s in candidates if _fits(s, ctx)), candidates[0])


def steps(name: str, plan: Plan) -> list[Plan]:
    """Every candidate of rung ``name`` after ``plan``, lightest last: one plan for most rungs,
    each quarter step down of the resident bytes for ``resident_stream``; [] when the rung has
    nothing more to give."""
    if name != "resident_stream":
        return [] if name in (plan.family, *plan.extras) else [plan.with_rung(name)]
    current = plan.resident if plan.family == name else 100
    out, p = [], current
    while (p := int(p * RESIDENT_STEP)) >= RESIDENT_MIN:
        out.append(resident_plan(plan, min(p, RESIDENT_MAX)))
    return out


def refusal(name: str, plan: Plan, ctx: Context) -> str | None:
    """Why rung ``name`` cannot be part of ``plan`` (the plan with the rung in it) here, or None."""
    rung = RUNGS[split_name(name)[0]]
    if rung.quality not in POLICIES[ctx.policy]:
        return f"{rung.quality} rung; policy {ctx.policy!r} does not allow it (use policy='balanced')"
    return rung.needs(plan, ctx)


def plan_refusal(plan: Plan, ctx: Context) -> tuple[str, str] | None:
    """The first of the plan's rungs that cannot be part of it here, with why; None when all can."""
    for name in plan.names:
        reason = refusal(name, plan, ctx)
        if reason:
            return name, reason
    return None


def quality(plan: Plan) -> str:
    """A plan's quality class: its worst rung's."""
    classes = {RUNGS[split_name(n)[0]].quality for n in plan.names}
    return "lossy" if "lossy" in classes else "near_lossless" if "near_lossless" in classes else "lossless"
