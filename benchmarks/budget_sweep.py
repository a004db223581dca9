"""Budget sweep (issue 3): every strategy measured once (seconds, per-stage peaks), the oracle per
budget (the fastest strategy whose measured peak fits), and autofit's first and steady-state
calls under a real per-process cap, with predicted vs measured stage peaks. The first call is
compared with the oracle's warm call and with the oracle's own first call from the same start
(a fresh pipeline on the device: both pay for applying the plan).

    python benchmarks/budget_sweep.py --model sdxl --out sweep.json          # GPU
    python benchmarks/budget_sweep.py --tiny --device cpu                    # CPU smoke path

Ratios are reported for the GPU only; the CPU path checks the script runs end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
STRATEGIES = {
    "sdxl": [(), ("vae_tiling",), ("offload_for_decode",), ("offload_encoders", "offload_for_decode"),
             ("model_offload",), ("group_leaf_stream",), ("group_block",), ("model_offload", "vae_tiling"),
             ("fp8", "vae_tiling"), ("fp8", "model_offload"), ("fp8", "group_leaf_stream")],
    "flux": [(), ("group_leaf_stream",), ("model_offload",), ("fp8", "group_leaf_stream"), ("fp8", "vae_tiling")],
}
BUDGETS = {"sdxl": [16, 8, 6, 4, 3], "flux": [48, 24, 16, 8]}


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def build(model, tiny, device):
    from autofit.testing import tiny_flux, tiny_sdxl

    if tiny:
        return (tiny_sdxl() if model == "sdxl" else tiny_flux()).to(device)
    from sized import flux_sized, sdxl_sized

    return sdxl_sized(device) if model == "sdxl" else flux_sized(device)


def timed_call(proxy, kwargs, device):
    _sync(device)
    t = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        proxy("a photo of an astronaut", generator=torch.Generator().manual_seed(0), **kwargs)
    _sync(device)
    return time.perf_counter() - t, logs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--budgets", default=None, help="comma-separated GiB (default per model)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-oracle-first", dest="oracle_first", action="store_false",
                        help="skip timing the oracle's own first call per budget (one more build each)")
    parser.add_argument("--strategies", default=None,
                        help="semicolon-separated plans, each comma-separated (default: the model's list)")
    args = parser.parse_args()
    if args.strategies is not None:
        STRATEGIES[args.model] = [tuple(filter(None, p.split(","))) for p in args.strategies.split(";")]
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from autofit import AutoFitExhausted, autofit

    if args.tiny and args.size == 1024:
        args.size = 64 if args.model == "sdxl" else 32
    cuda = args.device.startswith("cuda")
    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="pt")
    if args.model == "flux":
        kwargs.update(max_sequence_length=256 if not args.tiny else 16, guidance_scale=3.5)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else BUDGETS[args.model]
    # With --tiny the budgets are scaled down to the tiny weights (MiB instead of GiB).
    unit = 2**20 if args.tiny else GIB

    # 1. Every strategy, once, without a cap: seconds and measured per-stage peaks.
    pipe = build(args.model, args.tiny, args.device)
    pipe("warm up", generator=torch.Generator().manual_seed(1), **{**kwargs, "num_inference_steps": 1})
    measured = []
    for names in STRATEGIES[args.model]:
        proxy = autofit(pipe, device=args.device, plan=names, cache=False, policy="speed")
        try:
            timed_call(proxy, kwargs, args.device)  # applies the plan, warms it
            seconds, logs = timed_call(proxy, kwargs, args.device)
            peaks = proxy.autofit.last_call.get("stage_peaks_gib", {})
        except Exception as exc:  # a strategy that cannot run here is reported, not fatal
            row = {"plan": list(names), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(json.dumps(row), flush=True)
            measured.append(row)
            continue
        row = {"plan": list(names), "seconds": round(seconds, 3), "peak": max(peaks.values()) if peaks else None,
               "peaks": peaks}
        print(json.dumps(row), flush=True)
        measured.append(row)
    del pipe, proxy
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    def fresh(budget):
        """A newly built pipeline on the device, warmed up, then the budget's cap."""
        pipe = build(args.model, args.tiny, args.device)
        pipe("warm up", generator=torch.Generator().manual_seed(1), **{**kwargs, "num_inference_steps": 1})
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(budget * GIB / total)
            gc.collect()
            torch.cuda.empty_cache()
        return pipe

    def release():
        gc.collect()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()

    # 2. autofit under a real cap: first call (preflight) and steady state; then the oracle's
    #    first call from the same start.
    rows = []
    base = next((m["seconds"] for m in measured if m["plan"] == [] and "seconds" in m), None)
    for budget in budgets:
        # On the CPU no peaks are measured: every strategy counts as fitting (smoke path only).
        fits = [m for m in measured if "seconds" in m and (
            m.get("peak") <= budget * unit / GIB if m.get("peak") is not None else not cuda)]
        oracle = min(fits, key=lambda m: m["seconds"]) if fits else None
        pipe = fresh(budget)
        cache_dir = tempfile.mkdtemp(prefix="autofit-sweep-")
        proxy = autofit(pipe, device=args.device, cache=cache_dir,
                        max_vram=None if cuda else int(budget * unit))
        row = {"budget_gib": budget, "oracle": oracle and oracle["plan"], "oracle_s": oracle and oracle["seconds"]}
        try:
            first_s, logs = timed_call(proxy, kwargs, args.device)
            pre = next((e for e in logs if e["event"] == "autofit.preflight"), {})
            steady_s, logs2 = timed_call(proxy, kwargs, args.device)
            meas = proxy.autofit.last_call.get("stage_peaks_gib", {})
            pred = {k[len("predicted_"):-4]: v for k, v in pre.items()
                    if k.startswith("predicted_") and k.endswith("_gib") and k != "predicted_vram_gib"}
            row.update(
                start_plan=pre.get("action"), final_plan=list(proxy.autofit.plan),
                escalations=[(r.stage, r.action) for r in proxy.autofit.history],
                first_s=round(first_s, 3), steady_s=round(steady_s, 3),
                predicted_peaks=pred, measured_peaks=meas,
                peak_error={k: round(pred[k] / meas[k] - 1, 3) for k in meas if k in pred and meas[k]},
            )
            if oracle and cuda:
                row.update(first_ratio=round(first_s / oracle["seconds"], 3),
                           steady_ratio=round(steady_s / oracle["seconds"], 3))
        except AutoFitExhausted as exc:
            row.update(error=str(exc)[:300])
        del proxy, pipe
        release()
        if oracle and args.oracle_first:
            # The oracle's own first call from the same start (a fresh pipeline on the device,
            # same cap): applying a plan costs the same whoever picks it.
            pipe = fresh(budget)
            fixed = autofit(pipe, device=args.device, plan=tuple(oracle["plan"]), cache=False, preflight=False)
            oracle_first, _ = timed_call(fixed, kwargs, args.device)
            row["oracle_first_s"] = round(oracle_first, 3)
            if cuda and "first_s" in row:
                row["first_vs_oracle_first"] = round(row["first_s"] / oracle_first, 3)
            del fixed, pipe
            release()
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"model": args.model, "steps": args.steps, "size": args.size, "no_offload_s": base,
              "strategies": measured, "budgets": rows, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
