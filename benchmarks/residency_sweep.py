"""Partial residency sweep (issue 13): per device budget, autofit's pick (first and steady call)
against everything on the device and against full leaf streaming; measured vs predicted stage
peaks and step times; pinned host RAM; the measured pinned host-to-device bandwidth and the
bound max(compute, streamed bytes / bandwidth) each step should meet.

    python benchmarks/residency_sweep.py --model flux --out flux.json       # GPU (48/24/16/12/8 GiB)
    python benchmarks/residency_sweep.py --model sdxl --out sdxl.json       # GPU (16/8/6/4 GiB)
    python benchmarks/residency_sweep.py --tiny --device cpu                # CPU smoke path (CI)

Budgets are a real per-process cap (torch.cuda.set_per_process_memory_fraction). On the CPU the
rung table refuses partial residency (the device's memory is the host's), so the smoke path
runs a fixed ``resident_stream:50`` plan instead of the pick and reports no ratios: it checks the
script runs end to end and that the output equals the everything-resident run.
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
BUDGETS = {"sdxl": [16, 8, 6, 4], "flux": [48, 24, 16, 12, 8]}
STEPS = {"sdxl": 30, "flux": 28}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(model: str, tiny: bool, device: str):
    from autofit.testing import tiny_flux, tiny_sdxl

    if tiny:
        return (tiny_sdxl() if model == "sdxl" else tiny_flux()).to(device)
    from sized import flux_sized, sdxl_sized

    return sdxl_sized(device) if model == "sdxl" else flux_sized(device)


def timed(proxy, kwargs: dict, device: str) -> tuple[float, list, torch.Tensor]:
    _sync(device)
    t = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        image = proxy("a photo of an astronaut", generator=torch.Generator().manual_seed(0), **kwargs).images
    _sync(device)
    return time.perf_counter() - t, logs, image


def pinned_bandwidth_gbps(device: str) -> float | None:
    """Host-to-device GB/s of a 1 GiB copy from page-locked memory (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GIB, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    _sync(device)
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    _sync(device)
    gbps = 3 * GIB / (time.perf_counter() - t) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return round(gbps, 1)


def pinned_gib() -> float:
    from autofit.facts.memory import pinned_in_use

    return round(pinned_in_use() / GIB, 2)


def streamed_gib(pipe) -> float:
    from autofit.strategies.partial import streamer_of

    return round(sum(s.streamed_bytes for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                     and (s := streamer_of(m)) is not None) / GIB, 3)


def run_fixed(args, kwargs, plan: tuple[str, ...]) -> dict:
    """A fixed plan, uncapped: first call (applies it) and steady call; peaks and pinned RAM."""
    from autofit import autofit

    pipe = build(args.model, args.tiny, args.device)
    proxy = autofit(pipe, device=args.device, plan=plan, cache=False, policy="speed")
    row: dict = {"plan": list(plan) or ["device"]}
    try:
        first, _, _ = timed(proxy, kwargs, args.device)
        steady, _, image = timed(proxy, kwargs, args.device)
        row.update(first_s=round(first, 3), steady_s=round(steady, 3), pinned_gib=pinned_gib(),
                   streamed_gib=streamed_gib(pipe), measured_peaks=proxy.autofit.last_call.get("stage_peaks_gib", {}))
        row["_image"] = image
    except Exception as exc:  # a plan that cannot run here is a row, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    del proxy, pipe
    release(args.device)
    return row


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def run_pick(args, kwargs, budget: float, unit: int, bandwidth: float | None, device_steady: float | None) -> dict:
    """autofit's own pick under the budget: preflight, first and steady call, the prediction."""
    from autofit import AutoFitExhausted, autofit

    cuda = args.device.startswith("cuda")
    pipe = build(args.model, args.tiny, args.device)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(budget * GIB / total)
    options = dict(cache=tempfile.mkdtemp(prefix="autofit-residency-"))
    if not cuda:  # the CPU cannot pick partial residency: the smoke path fixes it
        options.update(plan=("resident_stream:50",), cache=False)
    proxy = autofit(pipe, device=args.device, max_vram=None if cuda else int(budget * unit), **options)
    row: dict = {"budget_gib": budget}
    try:
        first, logs, _ = timed(proxy, kwargs, args.device)
        pre = next((e for e in logs if e["event"] == "autofit.preflight"), {})
        steady, _, image = timed(proxy, kwargs, args.device)
        measured = proxy.autofit.last_call.get("stage_peaks_gib", {})
        predicted = {k[len("predicted_"):-4]: v for k, v in pre.items()
                     if k.startswith("predicted_") and k.endswith("_gib") and k != "predicted_vram_gib"}
        streamed = streamed_gib(pipe)
        row.update(plan=list(proxy.autofit.plan) or ["device"], start_plan=pre.get("action"),
                   escalations=[(r.stage, r.action) for r in proxy.autofit.history],
                   first_s=round(first, 3), steady_s=round(steady, 3), predicted_s=pre.get("predicted_seconds"),
                   step_s=round(steady / args.steps, 4), predicted_peaks=predicted, measured_peaks=measured,
                   peak_error={k: round(predicted[k] / measured[k] - 1, 3) for k in measured
                               if k in predicted and measured[k]},
                   streamed_gib=streamed, pinned_gib=pinned_gib())
        row["_image"] = image
        if cuda and bandwidth and device_steady:
            # The physical bound: each step copies the streamed denoiser while the rest computes.
            compute = device_steady / args.steps
            bound = max(compute, streamed * GIB / (bandwidth * 1e9))
            row.update(step_bound_s=round(bound, 4), step_vs_bound=round(row["step_s"] / bound, 3),
                       steady_vs_device=round(steady / device_steady, 3), first_vs_steady=round(first / steady, 3),
                       pinned_vs_streamed=round(row["pinned_gib"] / streamed, 3) if streamed else None)
    except AutoFitExhausted as exc:
        row["error"] = str(exc)[:300]
    del proxy, pipe
    release(args.device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sdxl", "flux"], default="flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (SDXL), 28 (Flux)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--budgets", default=None, help="comma-separated GiB (MiB with --tiny)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    args.steps = args.steps or (2 if args.tiny else STEPS[args.model])
    if args.tiny and args.size == 1024:
        args.size = 64 if args.model == "sdxl" else 32
    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="pt")
    if args.model == "flux":
        kwargs.update(max_sequence_length=256 if not args.tiny else 16, guidance_scale=3.5)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else BUDGETS[args.model]
    unit = 2**20 if args.tiny else GIB
    cuda = args.device.startswith("cuda")

    bandwidth = pinned_bandwidth_gbps(args.device)
    device_row = run_fixed(args, kwargs, ())
    leaf_row = run_fixed(args, kwargs, ("group_leaf_stream",) if cuda else ("group_leaf",))
    reference = device_row.pop("_image", None)
    leaf_row.pop("_image", None)
    for row in (device_row, leaf_row):
        print(json.dumps(row), flush=True)
    rows = []
    for budget in budgets:
        row = run_pick(args, kwargs, budget, unit, bandwidth, device_row.get("steady_s"))
        image = row.pop("_image", None)
        if image is not None and reference is not None:
            row["max_abs_diff_vs_device"] = float((image.float() - reference.float()).abs().max())
        if cuda and "steady_s" in row and "steady_s" in leaf_row:
            row["steady_vs_leaf"] = round(row["steady_s"] / leaf_row["steady_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"model": args.model, "steps": args.steps, "size": args.size, "pinned_gbps": bandwidth,
              "device": device_row, "leaf_stream": leaf_row, "budgets": rows, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
