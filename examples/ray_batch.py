"""A batch job on a Ray cluster, one actor per GPU (needs the [ray] extra). Rerun to resume.

    python examples/ray_batch.py --out results/                # local cluster, tiny built-in pipeline
    python examples/ray_batch.py --out results/ --local-gpus 2 # the same, with 2 logical GPUs (2 actors) on a CPU box
    python examples/ray_batch.py --model /models/sdxl --out /shared/results --address auto --steps 30

Without --model the pipeline is autofit.testing's tiny SDXL (random weights, needs [testing]):
the images are noise, the point is the shape of the job. With --address, --out and --model must
be paths every node sees.
"""

import argparse
import json
import os
from pathlib import Path

# Read by Ray when it is imported: a local cluster listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from autofit.ray import run_batch_on_ray  # noqa: E402
from autofit.testing import tiny_sdxl  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="results")
parser.add_argument("--model", default=None, help="a diffusers pipeline folder (default: a tiny built-in one)")
parser.add_argument("--address", default=None, help="a running cluster (auto, ray://head:10001); default: a local one")
parser.add_argument("--local-gpus", type=int, default=None, help="logical GPUs of the local cluster (one actor each)")
parser.add_argument("--items", type=int, default=16)
parser.add_argument("--steps", type=int, default=None, help="default: 30 with --model, 2 for the tiny pipeline")
args = parser.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
prompts = out / "prompts.jsonl"
if not prompts.exists():  # the same list on every rerun
    subjects = ["a cat", "a lighthouse", "a bowl of ramen", "an astronaut", "a red bicycle", "a forest"]
    prompts.write_text("\n".join(json.dumps({"id": f"{i:04d}", "prompt": f"a photo of {subjects[i % 6]}", "seed": i})
                                 for i in range(args.items)))

if args.address is None:
    # A cluster on this machine; logical GPUs let a CPU box show the one-actor-per-GPU shape.
    ray.init(num_gpus=args.local_gpus, include_dashboard=False, log_to_driver=False)
else:
    ray.init(address=args.address, log_to_driver=False)

tiny = args.model is None
defaults = {"num_inference_steps": args.steps or (2 if tiny else 30)}
if tiny:
    defaults.update(height=64, width=64)
report = run_batch_on_ray(tiny_sdxl if tiny else args.model, prompts, out, defaults=defaults,
                          cache_dir=Path.home() / ".cache" / "autofit")  # node-local: each node's own disk
print(f"done {len(report.done)}, skipped {len(report.skipped)} (finished before), failed {len(report.failed)} "
      f"in {report.seconds:.1f} s -> {out}")
for item_id, error in report.failed.items():
    print(f"  {item_id}: {error}")
ray.shutdown()
