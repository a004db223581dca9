"""No-OOM overhead of the proxy: raw pipeline vs autofit(pipe), interleaved, in one run.

    python benchmarks/overhead.py [--device cuda] [--steps 8] [--repeats 10]

Prints the median seconds of each and their ratio. No target is asserted here: it is a
measurement, recorded in docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import structlog
import torch

from autofit import autofit
from autofit.testing import tiny_sdxl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    pipe = tiny_sdxl().to(args.device)
    proxy = autofit(pipe, device=args.device)
    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="pt")

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(pipe), timed(proxy)  # warm-up
    raw, wrapped = [], []
    for _ in range(args.repeats):
        raw.append(timed(pipe))
        wrapped.append(timed(proxy))
    r, w = statistics.median(raw), statistics.median(wrapped)
    print(f"device={args.device} steps={args.steps} repeats={args.repeats}")
    print(f"raw median {r * 1000:.1f} ms | autofit median {w * 1000:.1f} ms | ratio {w / r:.3f}")


if __name__ == "__main__":
    main()
