"""autofit on the simulated capped device (autofit.testing.simdev): real OOMs, real moves, no GPU.

    python benchmarks/simdev_sweep.py [--size 128] [--steps 2] [--caps 30,24,20,17,16.25]

Two tables, both SIMULATED (sim computes on the CPU; its allocator has no cache, so peaks are
exact and there is no fragmentation):
1. Per placement, with no cap: the planner's predicted stage peaks against the peaks measured on
   the device, and host->device bytes per denoising step against the bytes the cost model says
   a step streams.
2. Per cap, default options (preflight and cache on): the plan reached, real OOMs on the first
   call, on the second call and in a new wrapper with the same cache, the highest stage peak
   against the cap, and host->device bytes per step of a steady call.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from dataclasses import replace

import structlog
import torch

from autofit import autofit
from autofit.testing import simdev
from autofit.planning.context import Workload
from autofit.planning.cost import resident_split
from autofit.planning.planner import predict_peaks
from autofit.testing import tiny_sdxl


def rung_context(proxy):
    """What the ladder and the planner judge ``proxy``'s plans against now."""
    return proxy._self_runtime.context()


def measured_activations(proxy) -> dict:
    """Activation bytes per stage learned for the workload of the last call."""
    rt = proxy._self_runtime
    return rt.measurements.measured(rt.choice.key if rt.choice is not None else None) or {}

MiB = 2**20
PLACEMENTS = [(), ("model_offload",), ("group_block",), ("group_leaf",), ("group_leaf_stream",), ("sequential",),
              ("resident_stream:50",)]


def _call(pipe, args, steps=None):
    return pipe("a photo of an astronaut", generator=torch.Generator().manual_seed(0),
                num_inference_steps=steps or args.steps,
                height=args.size, width=args.size, output_type="pt").images


def _ooms(history) -> int:
    return sum(r.oom_kind != "none" for r in history)


def placements(sim, args) -> None:
    print(f"\n## Predicted vs measured stage peaks, tiny_sdxl {args.size}px, {args.steps} steps (simulated)")
    print("| plan | stage | predicted MiB (estimate) | predicted MiB (measured activations) | measured MiB | ratios | "
          "h2d MiB/step | predicted streamed MiB/step |")
    print("|---|---|---|---|---|---|---|---|")
    learned = None
    for plan in PLACEMENTS:
        simdev.set_cap(None)
        proxy = autofit(tiny_sdxl(), device=sim, plan=plan, cache=tempfile.mkdtemp())
        _call(proxy, args)  # places the weights, warms up
        simdev.reset_counters()
        _call(proxy, args)
        short = simdev.counters()["h2d_bytes"]
        simdev.reset_counters()
        _call(proxy, args, steps=2 * args.steps)
        h2d = (simdev.counters()["h2d_bytes"] - short) / args.steps  # per denoising step: the extra steps' bytes
        simdev.reset_counters()
        _call(proxy, args)  # last_call is for the workload the table predicts
        ctx = replace(rung_context(proxy), workload=Workload(height=args.size, width=args.size, steps=args.steps))
        from autofit.plan import Plan
        p = Plan.from_names(plan)
        predicted = predict_peaks(p, ctx)
        if learned is None:  # the first plan is everything on the device: its activations
            learned = measured_activations(proxy)
        corrected = predict_peaks(p, ctx, measured=learned)
        measured = proxy.autofit.last_call["stage_peaks_gib"]
        fp = ctx.footprint
        if p.family == "resident_stream":
            split = resident_split(p, fp)
            streamed = sum(split[c.name][1] for c in fp.by_role("denoise"))
        elif p.placement in ("device", "model_offload"):
            streamed = 0  # the denoiser stays on the device for the whole denoising loop
        else:
            streamed = sum(c.bytes for c in fp.by_role("denoise"))  # every weight, every step
        for stage in ("encode", "denoise", "decode"):
            m = measured.get(stage)
            if not m:
                continue
            m_mib = m * 2**30 / MiB
            pr, co = predicted[stage] / MiB, corrected[stage] / MiB
            print(f"| {'+'.join(plan) or 'device'} | {stage} | {pr:.2f} | {co:.2f} | {m_mib:.2f} | "
                  f"{pr / m_mib:.2f} / {co / m_mib:.2f} | "
                  f"{h2d / MiB:.2f} | {streamed / MiB:.2f} |")
        del proxy
        gc.collect()


def sweep(sim, args) -> None:
    print(f"\n## Cap sweep, default options, tiny_sdxl {args.size}px, {args.steps} steps (simulated)")
    print("| cap MiB | plan | OOMs 1st call | OOMs 2nd call | OOMs new wrapper | peak/cap | h2d MiB/step | 1st call s |")
    print("|---|---|---|---|---|---|---|---|")
    for cap_mib in [float(c) for c in args.caps.split(",")]:
        cache = tempfile.mkdtemp()
        simdev.set_cap(int(cap_mib * MiB))
        first = autofit(tiny_sdxl(), device=sim, cache=cache)
        t0 = time.perf_counter()
        try:
            _call(first, args)
        except torch.OutOfMemoryError as exc:
            print(f"| {cap_mib:g} | exhausted: {str(exc)[:80]} | | | | | | |")
            continue
        seconds = time.perf_counter() - t0
        n1 = _ooms(first.autofit.history)
        seen = len(first.autofit.history)
        simdev.reset_counters()
        _call(first, args)
        h2d = simdev.counters()["h2d_bytes"] / args.steps
        n2 = _ooms(first.autofit.history[seen:])
        peak = max(first.autofit.last_call["stage_peaks_gib"].values()) * 2**30
        plan = "+".join(first.autofit.plan) or "device"
        del first
        gc.collect()
        second = autofit(tiny_sdxl(), device=sim, cache=cache)
        _call(second, args)
        n3 = _ooms(second.autofit.history)
        del second
        gc.collect()
        print(f"| {cap_mib:g} | {plan} | {n1} | {n2} | {n3} | {peak / (cap_mib * MiB):.2f} | {h2d / MiB:.2f} | "
              f"{seconds:.1f} |")


def soak(sim, args) -> None:
    """Calls under a cap that moves at random between calls (another process taking and giving
    back memory), one wrapper and cache: failed calls, real OOMs, time lost to them."""
    import random

    rng = random.Random(0)
    lo, hi = [float(c) for c in args.soak_range.split(",")]
    proxy = autofit(tiny_sdxl(), device=sim, cache=tempfile.mkdtemp())  # probes paced as by default
    failed = 0
    t0 = time.perf_counter()
    lost = 0.0
    for _ in range(args.soak):
        cap = rng.uniform(lo, hi) if rng.random() < 0.2 else None  # a new cap every ~5 calls
        if cap is not None:
            simdev.set_cap(int(cap * MiB))
        try:
            _call(proxy, args)
            lost += proxy.autofit.last_call["seconds_lost"]
        except torch.OutOfMemoryError:
            failed += 1
    total = time.perf_counter() - t0
    ooms = [r for r in proxy.autofit.history if r.oom_kind != "none"]
    print(f"\n## Soak, {args.soak} calls, cap moving in {lo:g}-{hi:g} MiB (simulated)")
    print(f"failed calls {failed}; real OOMs {len(ooms)} ({sum(r.action == 'probe_failed' for r in ooms)} failed "
          f"probes); seconds lost {lost:.1f} of {total:.1f}; final plan {'+'.join(proxy.autofit.plan) or 'device'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--caps", default="30,28,24,22,20,18,17,16.25")
    parser.add_argument("--skip-placements", action="store_true")
    parser.add_argument("--soak", type=int, default=0, help="calls under a moving cap (0: no soak)")
    parser.add_argument("--soak-range", default="16.25,30")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    sim = simdev.install()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; device {sim}; one thread")
    if not args.skip_placements:
        placements(sim, args)
    if args.caps:
        sweep(sim, args)
    if args.soak:
        soak(sim, args)


if __name__ == "__main__":
    main()
