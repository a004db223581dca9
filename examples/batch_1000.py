"""A batch job over 1,000 prompts (needs the weights: not run in CI). Rerun to resume.

    python examples/batch_1000.py --model stabilityai/stable-diffusion-xl-base-1.0 --out results/
"""

import argparse
import json
import random
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from autofit import autofit
from autofit.batch.runner import run_batch

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--out", default="results")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

subjects = ["a cat", "a lighthouse", "a bowl of ramen", "an astronaut", "a red bicycle", "a forest"]
styles = ["photo", "watercolor", "oil painting", "35mm film still", "isometric render"]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
prompts = out / "prompts.jsonl"
if not prompts.exists():  # the same list on every rerun
    rng = random.Random(0)
    prompts.write_text("\n".join(
        json.dumps({"id": f"{i:04d}", "prompt": f"{rng.choice(styles)} of {rng.choice(subjects)}", "seed": i})
        for i in range(1000)))

pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float16)
pipe.set_progress_bar_config(disable=True)
report = run_batch(autofit(pipe), prompts, out, defaults={"num_inference_steps": args.steps})
print(f"done {len(report.done)}, skipped {len(report.skipped)}, failed {len(report.failed)}")
