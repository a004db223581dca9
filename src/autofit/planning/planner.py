"""The planner: every candidate plan with predicted stage peaks, host RAM and seconds, and the one
to start from. Pure: no torch, no I/O. Which rungs a plan may hold here is the rung table's word
(:mod:`autofit.planning.rungs`, shared with the ladder); what a plan costs is :mod:`autofit.planning.cost`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from autofit.facts.components import STAGES
from autofit.planning.context import Context
from autofit.planning.cost import activation_bytes, activation_factor, host_bytes, predict_seconds, resident_bytes, usable
from autofit.units import GIB
from autofit.facts.footprint import Footprint
from autofit.plan import STORAGE, STORING, Plan
from autofit.planning.rungs import RUNGS, plan_refusal, quality, sized
from autofit.plan import PLACEMENTS


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

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names


def predict_peaks(plan: Plan, ctx: Context, *, measured: dict[str, int] | None = None) -> dict[str, int]:
    """Predicted device bytes at each stage's peak under ``plan``."""
    fp, wl = ctx.footprint, ctx.workload
    peaks = {}
    for stage in STAGES:
        act = activation_bytes(stage, fp, wl, measured)
        peaks[stage] = resident_bytes(plan, stage, fp) + int(act * activation_factor(plan, stage, wl))
    if plan.placing.scheme == "component":
        # accelerate offloads the previous component only when the next one is called: it is
        # still resident when the stage starts (measured SDXL decode peak 4.91 GiB = the UNet).
        enc = max((c.bytes for c in fp.by_role("encode")), default=0)
        den = max((c.bytes for c in fp.by_role("denoise")), default=0)
        peaks["denoise"] = max(peaks["denoise"], enc)
        peaks["decode"] = max(peaks["decode"], den)
    return peaks


def predict(plan: Plan, ctx: Context, *, measured: dict[str, int] | None = None,
            margin: float | None = None) -> Candidate:
    """The plan's predicted peaks, host RAM and seconds, and whether it fits: every rung accepted
    by the rung table here, and the highest stage peak within the usable budget."""
    fp, m = ctx.footprint, ctx.machine
    peaks = predict_peaks(plan, ctx, measured=measured)
    vram = max(peaks.values())
    why = None
    if vram > usable(m.budget_bytes, margin):
        why = (f"predicted peak {vram / GIB:.2f} GiB > {usable(m.budget_bytes, margin) / GIB:.2f} GiB usable "
               f"of the {m.budget_bytes / GIB:.2f} GiB budget")
    elif refused := plan_refusal(plan, ctx):
        why = refused[1]
    return Candidate(plan, peaks, vram, host_bytes(plan, fp), predict_seconds(plan, fp, m, ctx.workload),
                     quality(plan), why is None, why)


def candidate_plans(fp: Footprint) -> list[Plan]:
    """Every plan worth comparing: placements x weight storage x decode remedies (x per-call moves)."""
    decode_options = [frozenset()] + [frozenset({r.name}) for r in RUNGS.values() if r.planned == "decode"]
    # Per-call moves whose components the pipeline has, every subset of them; the last one is the
    # lowest bit, so the order reads: none, offload_for_decode, offload_encoders, both.
    moves = [r.name for r in RUNGS.values()
             if r.planned == "moves" and (r.off_device is None or fp.by_role(r.off_device))][::-1]
    subsets = [frozenset(m for j, m in enumerate(moves) if i >> j & 1) for i in range(2 ** len(moves))]
    plans = []
    quantizable = any(c.quant_ok for c in fp.components.values())
    storages = (None, *(s for s in STORAGE if quantizable or not STORING[s].bitsandbytes))
    for placement, storage, dec in product(
        PLACEMENTS,  # a quantified one (resident_stream) at its default: rank() sizes it
        storages,
        decode_options,
    ):
        base = dec | ({storage} if storage else set())
        variants = [base | m for m in subsets] if not Plan(placement).offloads else [base]
        for extras in variants:
            plans.append(Plan(placement, frozenset(extras)))
    return plans


def rank(ctx: Context, *, measured: dict[str, int] | None = None, margin: float | None = None) -> list[Candidate]:
    """All candidates, the ones that fit first, in the policy's order of preference."""
    cands = [predict(sized(p, ctx, margin, measured), ctx, measured=measured, margin=margin)
             for p in candidate_plans(ctx.footprint)]
    budget = ctx.machine.budget_bytes
    if ctx.policy == "memory":
        # Least VRAM among lossless plans; weights are changed (fp8, nf4) only when no lossless
        # plan fits, or later when recovery reaches those rungs.
        key = lambda c: (not c.fits, c.quality == "lossy", c.vram, c.seconds)  # noqa: E731
    elif ctx.policy == "balanced":
        # The lightest plan that fits comfortably: prefer ~80% of the budget, then speed.
        key = lambda c: (not c.fits, c.vram > 0.8 * budget, c.seconds)  # noqa: E731
    else:  # quality (lossy plans are refused by the table) and speed
        key = lambda c: (not c.fits, c.seconds, len(c.names))  # noqa: E731
    return sorted(cands, key=key)


def choose(ctx: Context, *, measured: dict[str, int] | None = None, margin: float | None = None) -> Candidate | None:
    best = rank(ctx, measured=measured, margin=margin)[0]
    return best if best.fits else None

