"""``python -m autofit.demo``: a built-in tiny pipeline under injected out-of-memory errors.

Shows the recovery log, then writes the image and the plan that produced it. Runs anywhere,
CPU included; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import structlog
import torch


def plan_record(proxy) -> dict:
    """The plan in force, every escalation and the last call, as :func:`autofit.records.plan_record`
    writes them (the form of ``autofit run``'s plan file)."""
    from autofit.records import plan_record as record

    return record(proxy.autofit.plan, proxy.autofit.history, proxy.autofit.last_call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo.png", help="where to write the image")
    parser.add_argument("--pipeline", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from autofit import autofit
    from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

    pipe = tiny_sdxl() if args.pipeline == "sdxl" else tiny_flux()
    proxy = autofit(pipe, device=args.device, cache=False)  # the same story on every run
    prompt = "a photo of an astronaut riding a horse on the moon"
    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
    if args.pipeline == "flux":
        kwargs["max_sequence_length"] = 32

    print("\n== one call, with an OOM injected at denoising step 3 and another in vae.decode ==")
    gen = torch.Generator().manual_seed(0)
    with inject_oom(proxy, stage="denoise", at=4) as denoise_fault, inject_oom(proxy, stage="decode") as decode_fault:
        image = proxy(prompt, generator=gen, **kwargs).images[0]
    print(f"\nrecovered: plan now {proxy.autofit.plan}; {len(proxy.autofit.history)} escalation(s):")
    for r in proxy.autofit.history:
        print(f"  attempt {r.attempt}: {r.stage:<7} OOM in {r.component} -> {r.action}  ({r.error[:60]}...)")
    print(f"  denoiser calls: {denoise_fault.calls} for {args.steps} steps (+1 failed): resumed, not restarted")
    print(f"  failed attempts' tensors freed before retry: {denoise_fault.freed_before_retry + decode_fault.freed_before_retry}")
    print(f"  last call: {proxy.autofit.last_call}")

    print("\n== the next call starts from the plan that worked: no OOM, no escalation ==")
    proxy(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    print(f"  last call: {proxy.autofit.last_call}")

    out = Path(args.out)
    image.save(out)
    plan_path = out.with_suffix(".plan.json")
    plan_path.write_text(json.dumps(plan_record(proxy), indent=2))
    print(f"\nwrote {out} ({image.size[0]}x{image.size[1]}) and {plan_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
