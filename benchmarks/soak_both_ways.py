"""Soak of plans that go both ways (issue 14): one-off OOMs never fail a call, the plan relaxes
back to the planned one once they stop, and probing a plan that keeps failing costs little.

Three runs on one wrapped pipeline each (real tiny pipelines on the CPU by default):

- ``one_off``: ``--calls`` calls; before each, with probability ``--p``, one OOM is raised once
  from inside a random component (encode, denoise at a random step, decode): half of them as
  another process's spike (torch's message says this process held little), half as this
  process's own (the message says it filled the device). Then ``--quiet`` calls with none.
  Reports failed calls, escalations, same-plan retries, the share of calls at the planned plan,
  and how many quiet calls it took to be back at the planned plan.
- ``never_fits``: the planned plan runs out of memory at every denoise step while it is in force
  (a machine that never has the memory for it): reports the share of time lost to probes.
- ``alternating``: encode and denoise OOMs in turn (the old ladder flipped between two plans):
  reports the distinct plans visited and whether any plan was left and re-entered repeatedly.

    python benchmarks/soak_both_ways.py --calls 1000            # the full soak (minutes on 2 cores)
    python benchmarks/soak_both_ways.py --calls 40 --quiet 40   # the CI smoke size

One JSON line per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time

import structlog
import torch

PROMPT = "a photo of an astronaut riding a horse"
KWARGS = dict(num_inference_steps=3, height=64, width=64, output_type="pt")


def _quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _wrap(seed: int):
    from autofit import autofit
    from autofit.testing import tiny_sdxl

    torch.manual_seed(seed)
    return autofit(tiny_sdxl(), device="cpu", cache=False)


def _call(proxy, seed: int) -> bool:
    try:
        proxy(PROMPT, generator=torch.Generator().manual_seed(seed), **KWARGS)
        return True
    except torch.OutOfMemoryError:
        return False


def one_off(calls: int, quiet: int, p: float, seed: int) -> dict:
    from autofit.testing import inject_oom

    rng = random.Random(seed)
    proxy = _wrap(seed)
    _call(proxy, 0)
    planned = proxy.autofit.plan
    failed = injected = at_planned = 0
    t0 = time.perf_counter()
    for i in range(calls):
        if rng.random() < p:
            stage = rng.choice(["encode", "denoise", "decode"])
            at = rng.randint(1, KWARGS["num_inference_steps"] + 1) if stage == "denoise" else 1
            kind = rng.choice(["cuda", "cuda_spike"])
            injected += 1
            with inject_oom(proxy, stage=stage, at=at, times=1, kind=kind):
                failed += not _call(proxy, i)
        else:
            failed += not _call(proxy, i)
        at_planned += proxy.autofit.plan == planned
    back_after = None
    for j in range(quiet):
        failed += not _call(proxy, calls + j)
        if back_after is None and proxy.autofit.plan == planned:
            back_after = j + 1
    history = proxy.autofit.history
    return {
        "run": "one_off", "calls": calls + quiet, "ooms_injected": injected, "failed_calls": failed,
        "escalations": sum(r.scope != "same_plan" and not r.action.startswith(("retry", "relax", "probe"))
                           for r in history),
        "same_plan_retries": sum(r.action == "retry_same_plan" for r in history),
        "probes": sum(r.action == "probe" for r in history),
        "share_at_planned_plan": round(at_planned / max(calls, 1), 3),
        "quiet_calls_until_planned_plan": back_after, "planned": list(planned),
        "final_plan": list(proxy.autofit.plan), "seconds": round(time.perf_counter() - t0, 2),
    }


def never_fits(calls: int, seed: int) -> dict:
    from autofit.testing import inject_oom

    proxy = _wrap(seed)
    _call(proxy, 0)
    planned = proxy.autofit.plan
    lost = 0.0
    failed = 0
    t0 = time.perf_counter()
    # The planned plan fails at its first denoise step whenever it is in force.
    with inject_oom(proxy, stage="denoise", when=lambda n: proxy.autofit.plan == planned):
        for i in range(calls):
            failed += not _call(proxy, i)
            lost = proxy.autofit.last_call.get("probe_seconds_lost", lost)
    total = time.perf_counter() - t0
    history = proxy.autofit.history
    return {
        "run": "never_fits", "calls": calls, "failed_calls": failed,
        "probes": sum(r.action == "probe" for r in history),
        "failed_probes": sum(r.action == "probe_failed" for r in history),
        "probe_seconds_lost": round(lost, 3), "seconds": round(total, 2),
        "probe_share_of_time": round(lost / total, 4) if total else None,
        "final_plan": list(proxy.autofit.plan),
    }


def alternating(calls: int, seed: int) -> dict:
    from autofit.testing import inject_oom

    proxy = _wrap(seed)
    _call(proxy, 0)
    failed = 0
    plans = [proxy.autofit.plan]
    for i in range(calls):
        with inject_oom(proxy, stage="encode" if i % 2 else "denoise", times=1):
            failed += not _call(proxy, i)
        plans.append(proxy.autofit.plan)
    changes = sum(a != b for a, b in zip(plans, plans[1:]))
    return {"run": "alternating", "calls": calls, "failed_calls": failed, "distinct_plans": len(set(plans)),
            "plan_changes": changes, "final_plan": list(proxy.autofit.plan)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--quiet", type=int, default=100)
    ap.add_argument("--p", type=float, default=0.1, help="chance of a one-off OOM before each call")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    _quiet_logs()
    for row in (one_off(args.calls, args.quiet, args.p, args.seed), never_fits(max(args.calls // 5, 8), args.seed),
                alternating(max(args.calls // 10, 4), args.seed)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
