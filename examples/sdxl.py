"""SDXL with autofit (needs the weights: not run in CI).

    python examples/sdxl.py --model stabilityai/stable-diffusion-xl-base-1.0 --out astronaut.png
"""

import argparse
import json

import structlog
import torch
from diffusers import StableDiffusionXLPipeline

from autofit import autofit

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
parser.add_argument("--out", default="sdxl.png")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=1024)
args = parser.parse_args()

structlog.configure(processors=[structlog.processors.JSONRenderer()])
pipe = StableDiffusionXLPipeline.from_pretrained(args.model, dtype=torch.float16)
pipe = autofit(pipe)  # device: the first GPU; policy: lossless rungs + VAE tiling
image = pipe(
    args.prompt,
    num_inference_steps=args.steps,
    height=args.size,
    width=args.size,
    generator=torch.Generator("cpu").manual_seed(0),
).images[0]
image.save(args.out)
print(json.dumps({"plan": pipe.autofit.plan, "last_call": pipe.autofit.last_call}, default=str))
