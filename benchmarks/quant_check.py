"""Quantization check (issue 4): nf4 and int8 (denoiser + large text encoders) against fp8 casting
and offloading, each measured once without a cap (seconds, per-stage peaks, host RAM, quality as
PSNR / max error of the decoded image against the unquantized run at the same seed), the oracle
per budget (fastest measured plan whose peak fits), and autofit's pick under a real cap.

    python benchmarks/quant_check.py --model sdxl --budgets 4,3 --out quant_sdxl.json     # GPU
    python benchmarks/quant_check.py --tiny --device cpu                                   # CPU smoke

Each plan is undone before the next (autofit restores the original weights it kept), so one
pipeline serves the whole run; the restored weights are checked against a fingerprint.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_sweep import build  # noqa: E402

GIB = 2**30
STRATEGIES = {
    "sdxl": [(), ("nf4",), ("int8",), ("fp8",), ("nf4", "model_offload", "vae_tiling"),
             ("int8", "model_offload", "vae_tiling"), ("fp8", "model_offload", "vae_tiling"),
             ("model_offload", "vae_tiling"), ("group_leaf_stream", "vae_tiling"),
             ("nf4", "offload_for_decode", "vae_tiling"), ("nf4", "offload_encoders", "offload_for_decode", "vae_tiling")],
    "flux": [(), ("nf4",), ("int8",), ("nf4", "model_offload"), ("int8", "model_offload"),
             ("fp8", "group_leaf_stream"), ("group_leaf_stream",), ("nf4", "offload_encoders")],
}
BUDGETS = {"sdxl": [4, 3], "flux": [16, 12]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _call(proxy, kwargs, device):
    _sync(device)
    t = time.perf_counter()
    out = proxy("a photo of an astronaut", generator=torch.Generator().manual_seed(0), **kwargs).images
    _sync(device)
    return time.perf_counter() - t, out.float().cpu()


def _quality(image: torch.Tensor, reference: torch.Tensor) -> dict:
    mse = float(((image - reference) ** 2).mean())
    return {"psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else None,
            "max_abs_err": round(float((image - reference).abs().max()), 4)}


def _fingerprint(pipe) -> float:
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return float(sum(p.detach().float().abs().sum().item() for p in den.parameters()))


def switch_plan(proxy, plan) -> None:
    """Place ``plan`` now, as an escalation would (one-way rungs applied or undone), through the
    engine's own ``Placement``."""
    rt = proxy._self_runtime
    with rt.lock:
        failure = rt.placement.switch(plan)
    if failure is not None:
        raise torch.OutOfMemoryError(f"while placing {plan}: {failure.head}")


def measure_all(pipe, names_list, kwargs, device):
    from autofit import autofit
    from autofit.plan import Plan

    rows, reference = [], None
    fingerprint = _fingerprint(pipe)
    proc = psutil.Process()
    for names in names_list:
        gc.collect()
        rss0 = proc.memory_info().rss
        proxy = autofit(pipe, device=device, plan=names, cache=False, policy="speed")
        row: dict = {"plan": list(names)}
        try:
            first_s, _ = _call(proxy, kwargs, device)  # applies the plan (quantizes), warms it
            seconds, image = _call(proxy, kwargs, device)
            peaks = proxy.autofit.last_call.get("stage_peaks_gib", {})
            row.update(first_s=round(first_s, 3), seconds=round(seconds, 3), peaks=peaks,
                       peak=max(peaks.values()) if peaks else None,
                       host_rss_delta_gib=round((proc.memory_info().rss - rss0) / GIB, 2),
                       history=[(r.stage, r.action, r.component) for r in proxy.autofit.history])
            if reference is None and not names:
                reference = image
            if reference is not None:
                row.update(_quality(image, reference))
        except Exception as exc:  # a plan that cannot run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        t = time.perf_counter()
        switch_plan(proxy, Plan())  # undo: original weights back, everything on the device
        row["undo_s"] = round(time.perf_counter() - t, 3)
        row["restored_exactly"] = _fingerprint(pipe) == fingerprint
        print(json.dumps(row), flush=True)
        rows.append(row)
        del proxy
    return rows


def under_cap(pipe, budget_gib, unit, kwargs, device, policy, last=False):
    from autofit import AutoFitExhausted, autofit
    from autofit.plan import Plan

    cuda = device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / total)
    proxy = autofit(pipe, device=device, cache=tempfile.mkdtemp(prefix="autofit-quant-"), policy=policy,
                    max_vram=None if cuda else int(budget_gib * unit))
    row: dict = {"budget_gib": budget_gib, "policy": policy}
    try:
        first_s, _ = _call(proxy, kwargs, device)
        steady_s, _ = _call(proxy, kwargs, device)
        row.update(plan=list(proxy.autofit.plan), first_s=round(first_s, 3), steady_s=round(steady_s, 3),
                   escalations=[(r.stage, r.action) for r in proxy.autofit.history],
                   peaks=proxy.autofit.last_call.get("stage_peaks_gib", {}))
    except AutoFitExhausted as exc:
        row["error"] = str(exc)[:300]
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    if not last:
        switch_plan(proxy, Plan())
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 (SDXL), 4 (Flux)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--strategies", default=None, help="semicolon-separated plans, each comma-separated")
    parser.add_argument("--policies", default="speed,quality")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    names_list = ([tuple(filter(None, p.split(","))) for p in args.strategies.split(";")] if args.strategies
                  else STRATEGIES[args.model])
    if args.tiny and args.size == 1024:
        args.size = 64 if args.model == "sdxl" else 32
    steps = args.steps or (10 if args.model == "sdxl" else 4)
    kwargs = {"num_inference_steps": steps, "height": args.size, "width": args.size, "output_type": "pt"}
    if args.model == "flux":
        kwargs.update(max_sequence_length=16 if args.tiny else 256, guidance_scale=3.5)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else BUDGETS[args.model]
    unit = 2**20 if args.tiny else GIB

    torch.manual_seed(0)
    pipe = build(args.model, args.tiny, args.device)
    rows = measure_all(pipe, names_list, kwargs, args.device)
    capped = []
    for i, budget in enumerate(budgets):
        fits = [r for r in rows if r.get("peak") is not None and r["peak"] <= budget * unit / GIB]
        oracle = min(fits, key=lambda r: r["seconds"]) if fits else None
        for policy in args.policies.split(","):
            last = i == len(budgets) - 1 and policy == args.policies.split(",")[-1]
            row = under_cap(pipe, budget, unit, kwargs, args.device, policy, last=last)
            row.update(oracle=oracle and oracle["plan"], oracle_s=oracle and oracle["seconds"])
            if oracle and "steady_s" in row:
                row["steady_ratio"] = round(row["steady_s"] / oracle["seconds"], 3)
            print(json.dumps(row), flush=True)
            capped.append(row)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    import diffusers

    result = {"model": args.model, "steps": steps, "size": args.size, "strategies": rows, "budgets": capped,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "bitsandbytes": bnb_version,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
