"""``autofit plan MODEL_DIR``: every rung with predicted VRAM, RAM, seconds and quality, for this
machine or one described by --vram/--ram/--device. Three steps: :func:`gather` (the folder's
weights, the machine, the workload), :func:`rank` (the planner's pure ranking, as a JSON-ready
document) and :func:`render` (the table); ``--plot`` adds the budget sweep of :mod:`.plot`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autofit.cli import args as a
from autofit.cli.args import UsageError
from autofit.units import gib


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="every rung with predicted VRAM, RAM, speed and quality")
    p.add_argument("model_dir")
    a.add_machine_options(p)
    p.add_argument("--height", type=a.pixels, default=None,
                   help="default: the pipeline's own (its __call__'s, else sample_size x the VAE's scale)")
    p.add_argument("--width", type=a.pixels, default=None, help="default: as --height")
    p.add_argument("--frames", type=a.count, default=None,
                   help="video pipelines only (default: the pipeline's num_frames)")
    p.add_argument("--batch", type=a.count, default=1)
    p.add_argument("--steps", type=a.count, default=30)
    p.add_argument("--dtype", choices=a.DTYPES, default=None,
                   help="the dtype the pipeline will be loaded in (default: as stored)")
    p.add_argument("--policy", choices=a.POLICIES, default="quality")
    p.add_argument("--pinned", type=a.size, default=None,
                   help="host RAM that can be page-locked (default: this machine's; Windows/WSL2 cap it)")
    p.add_argument("--disk", type=a.size, default=None,
                   help="free disk for group_disk's offload folder (default: this machine's, at "
                        "$AUTOFIT_OFFLOAD_DIR or the cache folder's offload/)")
    p.add_argument("--all", action="store_true",
                   help="after the one-row-per-rung table, list every combination of rungs, "
                        "fitting or not")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw predicted seconds against the VRAM budget, one line per plan family "
                        "(.svg; .png with matplotlib installed)")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    facts = gather(args)
    document = rank(facts, policy=args.policy, every=args.all)
    if args.plot:
        document["plot"] = write_plot(facts, args.plot, policy=args.policy)
    render(document, every=args.all, json_out=args.json)
    return 0 if document["pick"] else 1


@dataclass(frozen=True)
class Facts:
    """What the plan is made for: the pipeline's class and weights, the machine, the workload."""

    pipeline: str
    footprint: Any  # autofit.facts.footprint.Footprint
    machine: Any  # autofit.planning.context.Machine
    workload: Any  # autofit.planning.context.Workload


def gather(args: argparse.Namespace) -> Facts:
    """Check the command, measure the folder's weights (nothing is loaded), describe the machine."""
    from autofit.facts.footprint import measure_folder

    a.check_model_dir(args.model_dir)
    if args.plot:
        from autofit.cli import plot

        plot.check(args.plot)
        a.check_out_dir(Path(args.plot).absolute().parent, "--plot", args.plot)
    if args.vram is None:
        a.check_device(args.device)  # with --vram, planning for another machine's device is the point
    pipeline, fp = measure_folder(args.model_dir, dtype=args.dtype)  # a broken index: AutoFitUsageError
    if not fp.components:
        raise UsageError(f"{args.model_dir}: no component with weights found (model_index.json lists none that "
                         "has *.safetensors or *.bin files); pass the folder of a complete diffusers pipeline")
    return Facts(pipeline, fp, _machine(args), _workload(args, pipeline))


def _workload(args: argparse.Namespace, pipeline: str):
    from autofit.planning.context import Workload, uses_cfg

    defaults = _folder_defaults(Path(args.model_dir), pipeline)
    if args.frames is not None and args.frames > 1 and not defaults["video"]:
        raise UsageError(f"--frames {args.frames}: {pipeline} makes images, not videos; leave --frames out "
                         "(it is for video pipelines: Wan, CogVideoX, LTX, HunyuanVideo...)")
    return Workload(height=args.height or defaults["height"], width=args.width or defaults["width"],
                    frames=args.frames or defaults["frames"], batch=args.batch, steps=args.steps,
                    cfg=uses_cfg(pipeline))


def _machine(args: argparse.Namespace):
    from autofit import disk
    from autofit.planning.context import Machine
    from autofit.strategies.quantize import missing

    if args.vram is not None and args.device is not None:
        # Planning for another machine's device: its kind decides streams and quantization
        # backends; the bandwidths are this machine's when it has that device, else the host's.
        try:
            a.check_device(args.device)
            hw = a.hardware(args)
        except UsageError:
            hw = a.hardware(argparse.Namespace(**{**vars(args), "device": "cpu"}))
        device_type = args.device.split(":")[0]
    else:
        hw = a.hardware(args)
        device_type = hw.device_type if args.vram is None else "cuda"
    # What can be page-locked: --pinned, else this machine's (unless --ram describes another one).
    pinned = args.pinned if args.pinned is not None else (hw.pinned_available_bytes if args.ram is None else None)
    return Machine(args.vram if args.vram is not None else hw.budget_bytes,
                   args.ram if args.ram is not None else hw.host_available_bytes,
                   device_type, hw.pinned_gbps, hw.pageable_gbps, quant_missing=missing(device_type),
                   pinned_available_bytes=pinned,
                   disk_available_bytes=args.disk if args.disk is not None else disk.free_bytes(),
                   disk_unusable=disk.unusable() if args.disk is None else None)


def _folder_defaults(folder: Path, pipeline: str) -> dict[str, Any]:
    """What a call of the pipeline in ``folder`` makes when it is given no size or frames: its
    ``__call__``'s defaults, else the denoiser's ``sample_size`` x the VAE's scale (as SD 1.5
    and SDXL compute it), else 1024; and whether it makes videos (takes ``num_frames``)."""
    from autofit.engine.preflight import call_defaults

    try:  # importing the class imports its encoders' libraries (quiet: see cli.terminal)
        import diffusers

        cls = getattr(diffusers, pipeline, None)
        params = call_defaults(cls) if isinstance(cls, type) else {}
    except Exception:  # a class this diffusers lacks or cannot import: plan with the fallbacks
        params = {}

    def config(name: str) -> dict[str, Any]:
        try:
            data = json.loads((folder / name / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    blocks = config("vae").get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    side = None
    for name in ("unet", "transformer"):
        size = config(name).get("sample_size")
        if isinstance(size, list) and size:
            size = size[0]
        if isinstance(size, int) and size > 0:
            side = size * scale
            break
    pick = (lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None)
    frames = pick(params.get("num_frames"))
    return {"height": pick(params.get("height")) or side or 1024, "width": pick(params.get("width")) or side or 1024,
            "frames": frames or 1, "video": "num_frames" in params}


def rank(facts: Facts, *, policy: str, every: bool) -> dict[str, Any]:
    """The planner's ranking as ``autofit plan --json`` prints it: the folder's sizes, the machine,
    the pick under ``policy``, one row per strategy and the plans that fit (``every``: all)."""
    from autofit.planning import planner
    from autofit.planning.context import context
    from autofit.strategies import compiling

    fp, m, wl = facts.footprint, facts.machine, facts.workload
    # Rank under the permissive policy so lossy rows show too; the pick honours the policy.
    rows = planner.rank(context(fp, m, wl, policy="speed"))
    ranked = planner.rank(context(fp, m, wl, policy=policy))
    pick = next((c for c in ranked if c.fits), None)
    # Speeds compare with the fastest plan the policy allows, not with one it forbids.
    fastest = min((c.seconds for c in ranked if c.fits), default=None)
    comps = fp.components.values()
    return {
        "pipeline": facts.pipeline,
        "components_gib": {n: gib(c.bytes, 3) for n, c in fp.components.items()},
        "S_total_gib": gib(fp.total, 3),
        "S_max_gib": gib(fp.largest, 3),
        "S_block_gib": gib(max((c.block_bytes for c in comps), default=0), 3),
        "S_leaf_gib": gib(max((c.leaf_bytes for c in comps), default=0), 3),
        "S_total_lc_gib": gib(sum(c.stored_bytes("fp8") for c in comps), 3),
        "S_max_lc_gib": gib(max((c.stored_bytes("fp8") for c in comps), default=0), 3),
        "vram_budget_gib": gib(m.budget_bytes),
        "ram_available_gib": gib(m.host_available_bytes),
        "pinned_available_gib": gib(m.pinned_room),
        "workload": {"height": wl.height, "width": wl.width, "frames": wl.frames, "batch": wl.batch,
                     "steps": wl.steps},
        "policy": policy,
        "pick": (list(pick.names) or ["device"]) if pick else None,
        "compile_note": compiling.gain_note(facts.pipeline, m.device_type),
        "by_strategy": _by_strategy(rows, ranked, policy, fp, fastest),
        "strategies": [_row(c, fp, fastest) for c in rows if every or c.fits],
    }


def _by_strategy(rows: list, ranked: list, policy: str, fp: Any, fastest: float | None) -> list[dict[str, Any]]:
    """The guide's Step 3 table: one row per strategy, fitting or not: the fastest plan using it,
    one that fits under ``policy`` first (a lossy strategy under "quality" says so)."""
    from autofit.planning.context import POLICIES
    from autofit.plan import PLACEMENTS
    from autofit.planning.rungs import RUNGS

    fits_memory = {c.plan for c in rows if c.fits}
    table = []
    for name in (PLACEMENTS[0], *RUNGS):  # the baseline ("device": no rung) first
        using = [c for c in ranked if (name in (c.plan.family, *c.plan.extras) if name in RUNGS else not c.names)]
        if using:
            best = min(using, key=lambda c: (not c.fits, c.quality not in POLICIES[policy],
                                             c.plan not in fits_memory, c.seconds))
            table.append(_row(best, fp, fastest, name))
    return table


def _row(c: Any, fp: Any, fastest: float | None, strategy: str | None = None) -> dict[str, Any]:
    from autofit.planning.cost import pinned_bytes, resident_split

    out: dict[str, Any] = {"strategy": strategy} if strategy is not None else {}
    if c.plan.placing.scheme == "partial":  # partial residency: what stays, what streams
        split = resident_split(c.plan, fp).values()
        out.update(resident_gib=gib(sum(r for r, _ in split)), streamed_gib=gib(sum(s for _, s in split)))
    return {**out, "plan": list(c.names) or ["device"], "fits": c.fits, "vram_gib": gib(c.vram),
            "ram_gib": gib(c.ram), "pinned_gib": gib(pinned_bytes(c.plan, fp)), "seconds": round(c.seconds, 2),
            "relative_speed": round(fastest / c.seconds, 2) if fastest else None, "quality": c.quality,
            "why_not": c.why_not, "peaks_gib": {k: gib(v) for k, v in c.peaks.items()}}


def render(doc: dict[str, Any], *, every: bool, json_out: bool) -> None:
    """The document as JSON, or as the header, the per-strategy table (``every``: and every plan)
    and the pick."""
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    wl = doc["workload"]
    print(f"{doc['pipeline']}: {doc['S_total_gib']} GiB of weights; budget {doc['vram_budget_gib']} GiB VRAM, "
          f"{doc['ram_available_gib']} GiB RAM ({doc['pinned_available_gib']} GiB can be pinned); "
          f"{wl['width']}x{wl['height']}, batch {wl['batch']}, {wl['steps']} steps")
    _table(doc["by_strategy"], "rung (fastest plan using it)", doc["pick"])
    if every:
        print()
        _table(doc["strategies"], "every plan", doc["pick"])
    print(f"\nautofit would pick: {'+'.join(doc['pick']) if doc['pick'] else 'nothing fits'} (policy {doc['policy']})")
    print(f"note: {doc['compile_note']}")
    if doc.get("plot"):
        print(f"plot of seconds against the VRAM budget: {doc['plot']}")


def _table(rows: list[dict[str, Any]], first: str, picked: list[str] | None) -> None:
    print(f"{first:<64} {'fits':<5} {'VRAM':>7} {'RAM':>7} {'pinned':>7} {'sec':>7} {'speed':>6}  quality")
    for r in rows:
        label = r.get("strategy") or "+".join(r["plan"])
        if r.get("strategy") and r["plan"] != [r["strategy"]]:
            label = f"{r['strategy']} ({'+'.join(r['plan'])})"
        mark = "*" if r["plan"] == picked else " "
        note = f"  ({r['why_not']})" if r["why_not"] else ""
        if "streamed_gib" in r:
            note = f"  (resident {r['resident_gib']} GiB, streamed {r['streamed_gib']} GiB)" + note
        print(f"{mark}{label[:63]:<63} {str(r['fits']):<5} {r['vram_gib']:>7.2f} {r['ram_gib']:>7.2f} "
              f"{r['pinned_gib']:>7.2f} {r['seconds']:>7.2f} {r['relative_speed'] or 0:>6.2f}  {r['quality']}{note}")


def write_plot(facts: Facts, path: str, *, policy: str) -> str:
    """Sweep the VRAM budget and draw the families' predicted seconds at ``path``; returns it."""
    from autofit.cli import plot
    from autofit.files import write_atomically

    lines = plot.sweep(facts.footprint, facts.machine, facts.workload, policy)
    wl, now = facts.workload, facts.machine.budget_bytes
    title = (f"{facts.pipeline}, {wl.width}x{wl.height}, batch {wl.batch}, {wl.steps} steps, policy {policy}: "
             "predicted seconds per call against the VRAM budget")
    target = Path(path)
    if target.suffix.lower() == ".png":
        write_atomically(target, lambda tmp: plot.png(lines, tmp, now=now, title=title))
    else:
        document = plot.svg(lines, now=now, title=title)
        write_atomically(target, lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return str(target)
