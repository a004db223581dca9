"""``autofit batch MODEL_DIR --prompts FILE --out DIR``: a resumable batch (see :mod:`autofit.batch`);
every check, and the resume check of a finished batch, comes before the model is loaded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from autofit.cli import args as a
from autofit.cli import loading
from autofit.cli.args import UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="resumable batch: prompts file in, images + manifest.jsonl out")
    p.add_argument("model_dir")
    p.add_argument("--prompts", required=True,
                   help=".jsonl or .csv with a 'prompt' per item, or .txt with one prompt a line (UTF-8)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    a.add_generation_options(p)
    p.add_argument("--seed", type=a.seed, default=0, help="base seed: item i uses seed+i unless it sets one")
    p.add_argument("--dtype", choices=a.DTYPES, default=None)
    p.add_argument("--policy", choices=a.POLICIES, default="quality")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--distributed", action="store_true",
                   help="one process per GPU under `accelerate launch`; items split with PartialState")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster, one actor per GPU: the one at ADDRESS (ray://host:10001, "
                        "host:6379, auto), else a new local one; --out must be a folder every node sees; "
                        "put --ray after MODEL_DIR (needs the [ray] extra)")
    a.add_machine_options(p)
    p.set_defaults(fn=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from autofit.batch.items import read_items
    from autofit.errors import AutoFitUsageError

    try:
        items, rejected = read_items(args.prompts, base_seed=args.seed)
    except AutoFitUsageError as exc:
        raise UsageError(str(exc)) from None
    if not items and not rejected:
        raise UsageError(f"{args.prompts}: no prompts in it")
    for bad in rejected:  # recorded in the manifest as failed too; the others run
        print(f"autofit batch: skipping {bad.error}", file=sys.stderr)
    _check_out(args)

    from autofit import autofit
    from autofit.batch.runner import BatchError, run_batch

    defaults: dict[str, Any] = {"num_inference_steps": args.steps}
    if args.height is not None:
        defaults["height"] = args.height
    if args.width is not None:
        defaults["width"] = args.width
    if not rejected:
        # Resuming a finished batch: the manifest says so in a second, without loading the model.
        done = _finished_before(args, items, defaults)
        if done is not None:
            return done
    if args.ray is not None:  # the same job on a Ray cluster (autofit.ray)
        try:
            from autofit.ray import cli_batch
        except ImportError as exc:
            raise UsageError(str(exc)) from None

        def run() -> Any:
            return cli_batch(args, items, rejected, defaults)
    else:
        pipe = loading.load_pipeline(args)
        pipe.set_progress_bar_config(disable=True)
        options = dict(policy=args.policy, max_vram=args.vram, max_ram=args.ram, cache=args.cache_dir or True)
        if not args.distributed:
            pipe = autofit(pipe, device=args.device, **options)

        def run() -> Any:
            return run_batch(pipe, [*rejected, *items], args.out, defaults=defaults,
                             progress=not (args.json or getattr(args, "quiet", False)),
                             distributed=args.distributed, options=options)
    try:
        report = run()
    except BatchError as exc:
        print(f"autofit batch: {exc}", file=sys.stderr)
        return 1
    return _summary(args, report)


def _summary(args: argparse.Namespace, report: Any) -> int:
    """The job's last line (one JSON document under --json) and its exit code, the same for both runners."""
    summary = {"done": len(report.done), "skipped": len(report.skipped), "failed": report.failed,
               "seconds": round(report.seconds, 2), "out": str(args.out)}
    where = "the manifest" if args.ray is not None else "manifest.jsonl"  # a Ray job writes one shard per actor
    print(json.dumps(summary) if args.json else
          f"done {summary['done']}, skipped {summary['skipped']} (finished before), failed {len(report.failed)} "
          f"in {summary['seconds']} s -> {args.out}" + (f" (see {where} for the errors)" if report.failed else ""))
    return 0 if not report.failed else 4


def _check_out(args: argparse.Namespace) -> None:
    """The model folder, the device and the output folder, before anything is loaded."""
    a.check_model_dir(args.model_dir)
    if args.ray is None:  # with --ray, the device is the workers', not this machine's
        a.check_device(args.device)
    out = Path(args.out)
    a.check_out_dir(out, "--out", args.out)
    for shard in out.glob("manifest*.jsonl"):
        if not shard.is_file():
            raise UsageError(f"--out {args.out}: {shard.name} there is not a file; move it away or choose "
                             "another --out")


def _finished_before(args: argparse.Namespace, items: list, defaults: dict[str, Any]) -> int | None:
    """The exit code when the manifest shows every item finished with the same content (printed
    without loading the model); None when there is work to do."""
    from autofit.batch.runner import BatchError, pending

    try:
        index = json.loads((Path(args.model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}  # the load says what is wrong with it
    pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
    try:
        todo = pending(items, args.out, defaults=defaults, model=f"{pipeline}:{args.model_dir}")
    except BatchError as exc:
        print(f"autofit batch: {exc}", file=sys.stderr)
        return 1
    if todo:
        return None
    summary = {"done": 0, "skipped": len(items), "failed": {}, "seconds": 0.0, "out": str(args.out)}
    print(json.dumps(summary) if args.json else
          f"done 0, skipped {len(items)} (finished before), failed 0 -> {args.out} (nothing to do: "
          "the model was not loaded)")
    return 0
