"""The ladder: per stage, which rung to try next after an OOM. Pure: a plan and a context in, a
plan out; no torch calls, no I/O.

Order within a stage (``LADDERS``, declared beside the rung table in :mod:`autofit.planning.rungs`)
follows the guide's flowchart, lossless rungs first (lossy ones only when the policy allows). A rung is skipped, with a reason, when the rung table refuses it here
(:func:`autofit.planning.rungs.refusal`, the same rules the planner applies) or when the predicted peak of
the failing stage would not go down: weights resident on the device during the stage, and the
stage's activation factor, must both be no higher and one of them lower.
"""

from __future__ import annotations

from autofit.planning.context import Context
from autofit.planning.cost import activation_bytes, host_bytes, stage_peak, usable
from autofit.plan import Plan
from autofit.planning.rungs import HOST_LADDER, LADDERS, RUNGS, refusal, step, steps
from autofit.plan import split_name

__all__ = ["HOST_LADDER", "LADDERS", "next_plan"]  # the ladders are rows of the rung table's module

def _lowers(new: tuple[int, float], old: tuple[int, float]) -> bool:
    return new[0] <= old[0] and new[1] <= old[1] and new != old


def _peak(plan: Plan, stage: str, ctx: Context, measured: dict[str, int] | None) -> int:
    resident, factor = stage_peak(plan, stage, ctx.footprint, ctx.workload)
    return resident + int(activation_bytes(stage, ctx.footprint, ctx.workload, measured) * factor)


def next_plan(plan: Plan, stage: str, *, host_oom: bool, ctx: Context, avoid: frozenset[Plan] = frozenset(),
              need: int = 0, measured: dict[str, int] | None = None, budget: int | None = None,
              ) -> tuple[Plan | None, str | None, list[tuple[str, str]]]:
    """The next plan to try after an OOM in ``stage``: (plan, rung name, skipped rungs with reasons).
    Plans in ``avoid`` (already left behind on the way up) are skipped.

    ``need``: the bytes the failed allocation lacked (asked for less free, from the OOM's own
    figures). The first rung, in ladder order (the cheapest first), predicted to lower the stage's
    peak by at least that much is taken: a jump, not a creep through rungs that cannot save it.
    When none is predicted to, the lossless one predicted to save the most (a lossy one only when
    no lossless rung lowers the peak). Without a figure (0), the first rung that lowers the peak."""
    skipped: dict[str, str] = {}
    fp, wl = ctx.footprint, ctx.workload
    current = (host_bytes(plan, fp), 0.0) if host_oom else stage_peak(plan, stage, fp, wl)
    peak_now = 0 if host_oom or not need else _peak(plan, stage, ctx, measured)
    if need and budget is not None:
        # The stage goes on allocating past the allocation that failed: with the activations
        # corrected by what the OOM showed (``measured``), what the plan must shed is what its
        # predicted peak exceeds the usable budget by, when that is more.
        need = max(need, peak_now - usable(budget))
    best: tuple[tuple[bool, int], Plan, str] | None = None
    for name in HOST_LADDER if host_oom else LADDERS[stage]:
        candidates = steps(name, plan)
        if not need or host_oom:
            one = step(name, plan, ctx)  # resident_stream: the first step predicted to fit
            candidates = [one] if one is not None else []
        for candidate in candidates:
            reason = "this plan ran out of memory before, at another stage" if candidate in avoid else None
            reason = reason or refusal(name, candidate, ctx)
            if reason is None:
                if host_oom:
                    lowered = host_bytes(candidate, fp) < current[0]
                else:
                    lowered = _lowers(stage_peak(candidate, stage, fp, wl), current)
                if lowered and not need:
                    return candidate, name, list(skipped.items())
                if lowered:
                    saving = peak_now - _peak(candidate, stage, ctx, measured)
                    if saving >= need:
                        skipped.pop(name, None)
                        return candidate, name, list(skipped.items())
                    rank = (RUNGS[split_name(name)[0]].quality == "lossless", saving)
                    if best is None or rank > best[0]:
                        best = (rank, candidate, name)
                    reason = (f"predicted to free {saving / 2**20:.1f} MiB, less than the {need / 2**20:.1f} MiB "
                              f"the failed allocation lacked")
                else:
                    reason = f"predicted not to lower the {'host RAM' if host_oom else stage} peak"
            skipped[name] = reason
    if best is not None:
        skipped.pop(best[2], None)
        return best[1], best[2], list(skipped.items())
    return None, None, list(skipped.items())
