"""Compiled raw vs compiled-and-wrapped vs wrapped with ``compile=``: first call, steady call and
recompiles.

    python benchmarks/compiled.py --quick             # tiny SDXL on the CPU, backend "eager"
    python benchmarks/compiled.py --backend inductor  # real kernels (slow first compile)
    python benchmarks/compiled.py --pipeline flux     # tiny Flux (its transformer)

Three pipelines, the denoiser compiled by region as the diffusers guide writes it:

* ``raw``: ``denoiser.compile_repeated_blocks(fullgraph=True)``, called directly;
* ``wrapped``: the same, then ``autofit(pipe)``;
* ``compile_option``: ``autofit(pipe, compile={"backend": ...})`` on an eager pipeline.

First calls: each measured after ``torch._dynamo.reset()`` (compiled blocks of one class share
their code across pipelines, so without it the second would reuse the first's), after one
throwaway compile (dynamo's start-up cost), with inductor's on-disk graph cache off. Steady calls:
after one more warm-up call each, timed alternately, median. Recompiles: graphs dynamo compiled
during the steady calls (its ``unique_graphs`` counter), 0 when nothing recompiled.
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
from autofit.testing import tiny_flux, tiny_sdxl

logging.getLogger("diffusers").setLevel(logging.ERROR)
PIPES = {
    "sdxl": (tiny_sdxl, "unet", dict(num_inference_steps=4, height=64, width=64, output_type="pt")),
    "flux": (tiny_flux, "transformer", dict(num_inference_steps=4, height=32, width=32, output_type="pt",
                                            max_sequence_length=16)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 timed calls each (default 10)")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--pipeline", choices=sorted(PIPES), default="sdxl")
    args = ap.parse_args()
    n = 3 if args.quick else 10
    make, denoiser, kw = PIPES[args.pipeline]

    def call(p):
        return p("a photo", generator=torch.Generator().manual_seed(0), **kw).images

    if args.backend == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # each first call compiles for real, not from the disk cache
    # Dynamo's one-time start-up cost (imports, the backend's first use) is not the first variant's.
    torch.compile(torch.nn.Linear(4, 4), backend=args.backend)(torch.randn(2, 4))
    torch.manual_seed(0)
    eager_img = call(make())
    raw = make()
    getattr(raw, denoiser).compile_repeated_blocks(fullgraph=True, backend=args.backend)
    user = make()
    getattr(user, denoiser).compile_repeated_blocks(fullgraph=True, backend=args.backend)
    targets = {
        "raw": raw,
        "wrapped": autofit(user, device="cpu", cache=False, plan=()),
        "compile_option": autofit(make(), device="cpu", cache=False, plan=(), compile={"backend": args.backend}),
    }
    first, images = {}, {}
    for name, target in targets.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        images[name] = call(target)
        first[name] = time.perf_counter() - t0
    for target in targets.values():
        call(target)  # warm again: the resets dropped the others' code
    before = compiled.compiled_frames()
    times: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(n):
        for name, target in targets.items():
            t0 = time.perf_counter()
            call(target)
            times[name].append(time.perf_counter() - t0)
    recompiles = compiled.compiled_frames() - before
    steady = {name: statistics.median(t) for name, t in times.items()}
    last = targets["compile_option"].autofit.last_call
    print(json.dumps({
        "pipeline": args.pipeline,
        "backend": args.backend,
        "torch": torch.__version__,
        "calls": n,
        "first_s": {k: round(v, 3) for k, v in first.items()},
        "steady_s": {k: round(v, 4) for k, v in steady.items()},
        "steady_ratio_to_raw": {k: round(v / steady["raw"], 3) for k, v in steady.items()},
        "first_ratio_to_raw": {k: round(v / first["raw"], 3) for k, v in first.items()},
        "recompiles_on_steady_calls": recompiles,
        "compile_option_steady_compile_seconds": last.get("compile_seconds"),
        "max_abs_diff_to_eager": {k: float((v - eager_img).abs().max()) for k, v in images.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
