"""Flux with autofit (needs the weights: not run in CI). Allows fp8 with --policy balanced.

    python examples/flux.py --model black-forest-labs/FLUX.1-dev --out flux.png
"""

import argparse
import json

import structlog
import torch
from diffusers import FluxPipeline

from autofit import autofit
from autofit.records import plan_record

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
parser.add_argument("--prompt", default="a cat holding a sign that says hello world")
parser.add_argument("--out", default="flux.png")
parser.add_argument("--steps", type=int, default=28)
parser.add_argument("--policy", default="quality", choices=["quality", "balanced", "speed", "memory"])
args = parser.parse_args()

structlog.configure(processors=[structlog.processors.JSONRenderer()])
pipe = FluxPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
pipe = autofit(pipe, policy=args.policy)
image = pipe(
    args.prompt,
    num_inference_steps=args.steps,
    guidance_scale=3.5,
    generator=torch.Generator("cpu").manual_seed(0),
).images[0]
image.save(args.out)
print(json.dumps(plan_record(pipe.autofit.plan, pipe.autofit.history, pipe.autofit.last_call)))
