"""``autofit`` command line: ``plan``, ``doctor`` and ``run``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def _size(text: str) -> int:
    from .proxy import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hardware(args: argparse.Namespace):
    from .hardware import probe

    device = args.device or ("cuda" if _cuda() else "cpu")
    return probe(device, max_vram=args.vram, max_ram=args.ram)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_plan(args: argparse.Namespace) -> int:
    from .footprint import measure_folder
    from .ladder import POLICIES, SPECS, pinned_bytes
    from .planner import Machine, Workload, rank
    from .strategies.quantize import missing

    try:
        pipeline, fp = measure_folder(args.model_dir, dtype=args.dtype)
    except FileNotFoundError as exc:
        print(f"autofit plan: {exc}", file=sys.stderr)
        return 2
    hw = _hardware(args)
    budget = args.vram if args.vram is not None else hw.budget_bytes
    host = args.ram if args.ram is not None else hw.host_available_bytes
    device_type = hw.device_type if args.vram is None else "cuda"
    # What can be page-locked: --pinned, else this machine's (unless --ram describes another one).
    pinned = args.pinned if args.pinned is not None else (hw.pinned_available_bytes if args.ram is None else None)
    machine = Machine(budget, host, device_type, hw.pinned_gbps, hw.pageable_gbps, quant_missing=missing(device_type),
                      pinned_available_bytes=pinned)
    cfg = "Flux" not in pipeline
    wl = Workload(height=args.height, width=args.width, frames=args.frames, batch=args.batch, steps=args.steps, cfg=cfg)
    # Rank under the permissive policy so lossy rows show too; the pick honours --policy.
    rows = rank(fp, machine, wl, policy="speed")
    ranked = rank(fp, machine, wl, policy=args.policy)
    pick = next((c for c in ranked if c.fits), None)
    fastest = min((c.seconds for c in rows if c.fits), default=None)

    def row(c, strategy: str | None = None) -> dict[str, Any]:
        out = {"strategy": strategy} if strategy is not None else {}
        return {
            **out,
            "plan": list(c.names) or ["device"],
            "fits": c.fits,
            "vram_gib": round(c.vram / GIB, 2),
            "ram_gib": round(c.ram / GIB, 2),
            "pinned_gib": round(pinned_bytes(c.plan, fp) / GIB, 2),
            "seconds": round(c.seconds, 2),
            "relative_speed": round(fastest / c.seconds, 2) if fastest else None,
            "quality": c.quality,
            "why_not": c.why_not,
            "peaks_gib": {k: round(v / GIB, 2) for k, v in c.peaks.items()},
        }

    # The guide's Step 3 table: one row per strategy, fitting or not: the fastest plan using it,
    # one that fits under --policy first (a lossy strategy under "quality" says so). --all adds
    # every combination, as the most permissive policy allows them.
    fits_memory = {c.plan for c in rows if c.fits}
    by_strategy = []
    for name in ("device", *SPECS):
        using = [c for c in ranked if (name in c.names if name != "device" else not c.names)]
        if using:
            best = min(using, key=lambda c: (not c.fits, c.quality not in POLICIES[args.policy],
                                             c.plan not in fits_memory, c.seconds))
            by_strategy.append(row(best, name))
    table = [row(c) for c in rows if args.all or c.fits]
    comps = fp.components.values()
    summary = {
        "pipeline": pipeline,
        "components_gib": {n: round(c.bytes / GIB, 3) for n, c in fp.components.items()},
        "S_total_gib": round(fp.total / GIB, 3),
        "S_max_gib": round(fp.largest / GIB, 3),
        "S_block_gib": round(max((c.block_bytes for c in comps), default=0) / GIB, 3),
        "S_leaf_gib": round(max((c.leaf_bytes for c in comps), default=0) / GIB, 3),
        "S_total_lc_gib": round(sum(c.stored_bytes("fp8") for c in comps) / GIB, 3),
        "S_max_lc_gib": round(max((c.stored_bytes("fp8") for c in comps), default=0) / GIB, 3),
        "vram_budget_gib": round(budget / GIB, 2),
        "ram_available_gib": round(host / GIB, 2),
        "pinned_available_gib": round(machine.pinned_room / GIB, 2),
        "workload": {"height": args.height, "width": args.width, "frames": args.frames, "batch": args.batch,
                     "steps": args.steps},
        "policy": args.policy,
        "pick": (list(pick.names) or ["device"]) if pick else None,
        "by_strategy": by_strategy,
        "strategies": table,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0 if pick else 1
    print(f"{pipeline}: {summary['S_total_gib']} GiB of weights; budget {summary['vram_budget_gib']} GiB VRAM, "
          f"{summary['ram_available_gib']} GiB RAM ({summary['pinned_available_gib']} GiB can be pinned); "
          f"{args.width}x{args.height}, batch {args.batch}, {args.steps} steps")
    picked = (list(pick.names) or ["device"]) if pick else None

    def show(rows_: list[dict[str, Any]], first: str) -> None:
        print(f"{first:<64} {'fits':<5} {'VRAM':>7} {'RAM':>7} {'pinned':>7} {'sec':>7} {'speed':>6}  quality")
        for r in rows_:
            label = r.get("strategy") or "+".join(r["plan"])
            if r.get("strategy") and r["plan"] != [r["strategy"]]:
                label = f"{r['strategy']} ({'+'.join(r['plan'])})"
            mark = "*" if r["plan"] == picked else " "
            note = f"  ({r['why_not']})" if r["why_not"] else ""
            print(f"{mark}{label[:63]:<63} {str(r['fits']):<5} {r['vram_gib']:>7.2f} {r['ram_gib']:>7.2f} "
                  f"{r['pinned_gib']:>7.2f} {r['seconds']:>7.2f} {r['relative_speed'] or 0:>6.2f}  {r['quality']}{note}")

    show(by_strategy, "strategy (fastest plan using it)")
    if args.all:
        print()
        show(table, "every plan")
    print(f"\nautofit would pick: {'+'.join(summary['pick']) if pick else 'nothing fits'} (policy {args.policy})")
    return 0 if pick else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .memory import cgroup_memory, host_available_bytes, pinned_in_use
    from .strategies.quantize import missing as quant_missing

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    hw = _hardware(args)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {n: ver(n) for n in ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes",
                                        "torchao", "nvidia-ml-py", "structlog", "autofit")},
        "device": hw.as_dict(),
        "cuda_available": torch.cuda.is_available(),
        "host_available_gib": round(host_available_bytes() / GIB, 2),
        "pinned_in_use_gib": round(pinned_in_use() / GIB, 2),
        "cgroup": cgroup_memory(),  # the tightest memory limit on this process's cgroup, or None
    }
    if args.device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        from .hardware import probe

        # Every visible GPU: a batch job runs one process per GPU (autofit batch --distributed).
        report["devices"] = [probe(f"cuda:{i}").as_dict() for i in range(torch.cuda.device_count())]
    missing = {}
    if not torch.cuda.is_available():
        missing["group_leaf_stream / group_leaf_lowmem"] = "CUDA or XPU streams (no accelerator found)"
        missing["sequential"] = "an accelerator (accelerate's hooks fail with the CPU as execution device)"
    if not hasattr(torch, "float8_e4m3fn"):
        missing["fp8"] = "a torch build with float8_e4m3fn"
    if importlib.util.find_spec("pynvml") is None:
        missing["nvml"] = "nvidia-ml-py for device memory used by other processes (pip install nvidia-ml-py)"
    quant_reason = quant_missing(hw.device_type)  # absent, too old, broken, or no backend for the device
    if quant_reason is not None:
        missing["quantization (nf4/int8)"] = quant_reason
    report["missing"] = missing
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"python {report['python']}")
    for name, v in report["versions"].items():
        print(f"  {name:<14} {v or '-'}")
    d = report["device"]
    print(f"device: {d['device_name']} ({d['device_type']}, via {d['source']}): total {d['total_bytes'] / GIB:.2f} GiB, "
          f"free {d['free_bytes'] / GIB:.2f} GiB, budget {d['budget_bytes'] / GIB:.2f} GiB"
          + (f", other processes {d['other_processes_bytes'] / GIB:.2f} GiB" if d["other_processes_bytes"] else ""))
    for i, other in enumerate(report.get("devices", [])[1:], start=1):
        print(f"device cuda:{i}: {other['device_name']}: total {other['total_bytes'] / GIB:.2f} GiB, "
              f"free {other['free_bytes'] / GIB:.2f} GiB")
    print(f"host RAM: {d['host_total_bytes'] / GIB:.2f} GiB total, {report['host_available_gib']} GiB available "
          f"(cgroup limits honoured)")
    cg = report["cgroup"]
    if cg is not None:
        print(f"cgroup v{cg['version']} memory limit: {cg['limit'] / GIB:.2f} GiB at {cg['path']}, "
              f"{cg['usage'] / GIB:.2f} GiB used of which {cg['inactive_file'] / GIB:.2f} GiB reclaimable page cache, "
              f"{cg['available'] / GIB:.2f} GiB available")
    else:
        print("cgroup memory limit: none")
    print(f"pinned host RAM: {d['pinned_available_bytes'] / GIB:.2f} GiB can be pinned now, "
          f"{d['pinned_limit_bytes'] / GIB:.2f} GiB at most ({d['pinned_limit_reason']}); "
          f"{report['pinned_in_use_gib']} GiB held by torch's pinned allocator")
    for what, need in missing.items():  # quantize.missing's reason is a whole sentence
        print(f"  unavailable: {what}: " + (need if what == "quantization (nf4/int8)" else f"needs {need}"))
    return 0


def _load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline in MODEL_DIR, in --dtype (the checkpoint's own dtypes when not given)."""
    import torch
    from diffusers import DiffusionPipeline

    from . import _diffusers

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
    return DiffusionPipeline.from_pretrained(args.model_dir, **_diffusers.dtype_kwargs(dtype))


def cmd_run(args: argparse.Namespace) -> int:
    import structlog
    import torch

    from . import AutoFitExhausted, autofit

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="%H:%M:%S"),
                    structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=False)
    proxy = autofit(pipe, device=args.device, policy=args.policy, max_vram=args.vram, max_ram=args.ram,
                    cache=args.cache_dir or True)
    kwargs: dict[str, Any] = dict(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    try:
        image = proxy(args.prompt, **kwargs).images[0]
    except AutoFitExhausted as exc:
        print(f"autofit run: {exc}", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    image.save(tmp)
    tmp.replace(out)
    record = {
        "plan": list(proxy.autofit.plan),
        "last_call": proxy.autofit.last_call,
        "escalations": [
            {"stage": r.stage, "action": r.action, "attempt": r.attempt, "scope": r.scope, "error": r.error}
            for r in proxy.autofit.history
        ],
        "prompt": args.prompt,
        "seed": args.seed,
    }
    out.with_suffix(".plan.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {out} and {out.with_suffix('.plan.json')} (plan: {'+'.join(proxy.autofit.plan) or 'device'})")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from . import autofit
    from .batch import load_items, run_batch
    from .errors import AutoFitUsageError

    try:
        items = load_items(args.prompts, base_seed=args.seed)
    except (AutoFitUsageError, OSError) as exc:
        print(f"autofit batch: {exc}", file=sys.stderr)
        return 2
    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    options = dict(policy=args.policy, max_vram=args.vram, max_ram=args.ram, cache=args.cache_dir or True)
    if not args.distributed:
        pipe = autofit(pipe, device=args.device, **options)
    defaults = {"num_inference_steps": args.steps}
    if args.height:
        defaults["height"] = args.height
    if args.width:
        defaults["width"] = args.width
    report = run_batch(pipe, items, args.out, defaults=defaults, progress=not args.json,
                       distributed=args.distributed, options=options)
    summary = {"done": len(report.done), "skipped": len(report.skipped), "failed": report.failed,
               "seconds": round(report.seconds, 2), "out": str(args.out)}
    print(json.dumps(summary) if args.json else
          f"done {summary['done']}, skipped {summary['skipped']} (finished before), failed {len(report.failed)} "
          f"in {summary['seconds']} s -> {args.out}")
    return 0 if not report.failed else 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autofit", description="Fit diffusers pipelines to the memory you have.")
    sub = parser.add_subparsers(dest="command", required=True)

    def hw_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vram", type=_size, default=None, help="device memory to plan for, e.g. 8GiB")
        p.add_argument("--ram", type=_size, default=None, help="host RAM to plan for, e.g. 32GiB")
        p.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: first accelerator)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plan", help="every strategy with predicted VRAM, RAM, speed and quality")
    p.add_argument("model_dir")
    hw_opts(p)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="the dtype the pipeline will be loaded in (default: as stored)")
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--pinned", type=_size, default=None,
                   help="host RAM that can be page-locked (default: this machine's; Windows/WSL2 cap it)")
    p.add_argument("--all", action="store_true", help="also list strategies that do not fit")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("doctor", help="devices, memory, limits, versions, what each strategy lacks")
    hw_opts(p)
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("run", help="generate one image with recovery; writes the plan beside it")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--cache-dir", default=None)
    hw_opts(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("batch", help="resumable batch: prompts file in, images + manifest.jsonl out")
    p.add_argument("model_dir")
    p.add_argument("--prompts", required=True, help=".jsonl or .csv with a 'prompt' per item")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="base seed: item i uses seed+i unless it sets one")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--distributed", action="store_true",
                   help="one process per GPU under `accelerate launch`; items split with PartialState")
    hw_opts(p)
    p.set_defaults(fn=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
