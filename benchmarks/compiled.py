"""Compiled raw vs compiled under autofit: the steady call's time and the recompiles.

    python benchmarks/compiled.py --quick            # tiny SDXL on the CPU, backend "eager"
    python benchmarks/compiled.py --backend inductor # real kernels (slow first compile)

The UNet is compiled with ``torch.compile``; the raw pipeline and the autofit proxy each warm up
once, then the steady calls are timed alternately (median). Reports the ratio wrapped/raw, the
compiled versions of the UNet's code after warm-up and after the steady calls (equal: no
recompile on a steady call), and whether the images match.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from autofit import autofit
from autofit.facts import compiled
from autofit.testing import tiny_sdxl

logging.getLogger("diffusers").setLevel(logging.ERROR)
KW = dict(num_inference_steps=4, height=64, width=64, output_type="pt")


def call(p):
    return p("a photo", generator=torch.Generator().manual_seed(0), **KW).images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 timed calls each (default 10)")
    ap.add_argument("--backend", default="eager")
    args = ap.parse_args()
    n = 3 if args.quick else 10
    torch.manual_seed(0)
    pipe = tiny_sdxl()
    pipe.unet = torch.compile(pipe.unet, backend=args.backend)
    t0 = time.perf_counter()
    raw_img = call(pipe)
    compile_s = time.perf_counter() - t0
    proxy = autofit(pipe, device="cpu", cache=False)
    t0 = time.perf_counter()
    wrapped_img = call(proxy)
    first_wrapped_s = time.perf_counter() - t0
    warm = compiled.versions(pipe.unet)
    raw_t, wrapped_t = [], []
    for _ in range(n):
        for target, out in ((pipe, raw_t), (proxy, wrapped_t)):
            t0 = time.perf_counter()
            call(target)
            out.append(time.perf_counter() - t0)
    steady = compiled.versions(pipe.unet)
    raw_med, wrapped_med = statistics.median(raw_t), statistics.median(wrapped_t)
    print(json.dumps({
        "backend": args.backend,
        "calls": n,
        "first_raw_s": round(compile_s, 3),
        "first_wrapped_s": round(first_wrapped_s, 3),
        "raw_s": round(raw_med, 4),
        "wrapped_s": round(wrapped_med, 4),
        "ratio": round(wrapped_med / raw_med, 3),
        "unet_versions_after_warmup": warm,
        "recompiles_on_steady_calls": steady - warm,
        "same_image": bool(torch.allclose(raw_img, wrapped_img, atol=1e-5)),
    }, indent=1))


if __name__ == "__main__":
    main()
