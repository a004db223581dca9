"""Per-item overhead of autofit's Ray adapter against calling the wrapped pipeline in a loop.

    python benchmarks/ray_overhead.py [--items 48] [--rounds 6] [--steps 2] [--size 64]

Needs the [ray] and [testing] extras. One run, one process for the first two rows, tiny SDXL,
steady state (a warm-up call first, so the first call's one-off costs are left out):

- ``direct``: the wrapped pipeline called in a loop, each image saved as PNG (what a hand-written
  loop does);
- ``adapter``: ``GenerateImages.__call__`` on batches of the same items (checks, content key,
  atomic save with fsync, a manifest record fsynced per item), in the same process, interleaved
  with ``direct`` in rounds so that load from other processes falls on both alike;
- ``ray``: twice as many items through ``map_images`` on a local cluster with one actor (one
  logical GPU), against the direct loop as a ``map_batches`` class of its own on one actor: the
  same kind of process and scheduling (the tiny pipeline ran faster in a Ray Data actor than in
  this script's process, so each path is compared with a loop in its own kind); per item from the
  images' write times, from the end of the first batch to the last image, so the actor's start,
  its first calls and the driver's delivery are left out; new actors each round, in alternating
  order.

Ratios are against the ``direct`` median of the same pair. No target is asserted here: it is a measurement,
recorded in docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import structlog  # noqa: E402
import torch  # noqa: E402

from autofit import autofit  # noqa: E402
from autofit.testing import tiny_sdxl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=48, help="items per round and path")
    parser.add_argument("--rounds", type=int, default=6, help="at least 1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray-rounds", type=int, default=3, help="0: leave out the local-cluster rows")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)

    import pyarrow as pa

    from autofit.ray import GenerateImages

    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    defaults = {"num_inference_steps": args.steps, "height": args.size, "width": args.size}
    proxy = autofit(tiny_sdxl(), cache=False)
    proxy.set_progress_bar_config(disable=True)
    adapter = GenerateImages(tiny_sdxl, work / "adapter", defaults=defaults, options={"cache": False})
    direct_dir = work / "direct"
    direct_dir.mkdir()

    def direct(rows: list[dict]) -> float:
        t = time.perf_counter()
        for row in rows:
            image = proxy(row["prompt"], generator=torch.Generator().manual_seed(row["seed"]), **defaults).images[0]
            image.save(direct_dir / f"{row['id']}.png")
        return (time.perf_counter() - t) / len(rows)

    def through_adapter(rows: list[dict]) -> float:
        t = time.perf_counter()
        for start in range(0, len(rows), args.batch_size):
            out = adapter(pa.Table.from_pylist(rows[start:start + args.batch_size]))
            assert set(out.column("status").to_pylist()) == {"ok"}, out.column("error").to_pylist()
        return (time.perf_counter() - t) / len(rows)

    def items(tag: str) -> list[dict]:
        return [{"id": f"{tag}-{i:04d}", "prompt": f"a photo of a cat {i}", "seed": i} for i in range(args.items)]

    direct(items("warm")[:2]), through_adapter(items("warm")[:2])  # warm-up: first-call costs out
    d, a = [], []
    for r in range(args.rounds):
        # Alternate which goes first, so a trend in the machine's load falls on both.
        if r % 2:
            a.append(through_adapter(items(f"r{r}")))
            d.append(direct(items(f"r{r}")))
        else:
            d.append(direct(items(f"r{r}")))
            a.append(through_adapter(items(f"r{r}")))
    md, ma = statistics.median(d), statistics.median(a)
    print(f"items={args.items} rounds={args.rounds} steps={args.steps} size={args.size} batch={args.batch_size}")
    print("| path | per item (median of rounds) | ratio |")
    print("|---|---|---|")
    print(f"| direct: wrapped pipeline in a loop, PNG saved | {md * 1000:.1f} ms | 1.000 |")
    print(f"| adapter: GenerateImages in-process | {ma * 1000:.1f} ms | {ma / md:.3f} |")
    if not args.ray_rounds:
        return

    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    try:
        from ray.data import ActorPoolStrategy, DataContext

        from autofit.ray import map_images

        DataContext.get_current().enable_progress_bars = False

        def pace(folder: Path, n: int) -> float:
            """Per item, from the images' write times: from the end of the first batch to the
            last image (the actor's start and first calls left out; the driver's delivery too)."""
            times = sorted(p.stat().st_mtime_ns for p in folder.glob("*.png"))
            assert len(times) == n, (folder, len(times))
            first = args.batch_size
            return (times[-1] - times[first - 1]) / 1e9 / (n - first)

        def through_ray(rows: list[dict], tag: str) -> float:
            ds = ray.data.from_items(rows, override_num_blocks=len(rows) // args.batch_size)
            ds = map_images(ds, tiny_sdxl, work / tag, actors=1, gpus_per_actor=1, batch_size=args.batch_size,
                            defaults=defaults, options={"cache": False})
            for row in ds.iter_rows():
                assert row["status"] == "ok", row["error"]
            return pace(work / tag, len(rows))

        class Direct:
            """The direct loop as a map_batches class of its own: the same kind of process and
            the same scheduling as the adapter, without the adapter."""

            def __init__(self, folder: str) -> None:
                self.folder = folder
                os.makedirs(folder, exist_ok=True)
                self.proxy = autofit(tiny_sdxl(), cache=False)
                self.proxy.set_progress_bar_config(disable=True)

            def __call__(self, batch: dict) -> dict:
                for item_id, prompt, seed in zip(batch["id"], batch["prompt"], batch["seed"]):
                    g = torch.Generator().manual_seed(int(seed))
                    self.proxy(str(prompt), generator=g, **defaults).images[0].save(f"{self.folder}/{item_id}.png")
                return {"id": batch["id"]}

        rd, rr = [], []
        for r in range(args.ray_rounds):  # new actors each round, in alternating order
            rows = items(f"ray{r}") + items(f"ray{r}b")

            def loop_in_actor() -> float:
                ds = ray.data.from_items(rows, override_num_blocks=len(rows) // args.batch_size)
                ds = ds.map_batches(Direct, fn_constructor_args=(str(work / f"loop{r}"),), batch_size=args.batch_size,
                                    compute=ActorPoolStrategy(size=1), num_gpus=1)
                assert ds.count() == len(rows)
                return pace(work / f"loop{r}", len(rows))

            if r % 2:
                rr.append(through_ray(rows, f"ray{r}"))
                rd.append(loop_in_actor())
            else:
                rd.append(loop_in_actor())
                rr.append(through_ray(rows, f"ray{r}"))
        mrd, mrr = statistics.median(rd), statistics.median(rr)
        print(f"| direct: the same loop as a map_batches class, 1 actor ({2 * args.items} items a round) | {mrd * 1000:.1f} ms | 1.000 |")
        print(f"| ray: map_images, local cluster, 1 actor, batches of {args.batch_size} | {mrr * 1000:.1f} ms | "
              f"{mrr / mrd:.3f} |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
