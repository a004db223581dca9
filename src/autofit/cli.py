"""``autofit`` command line: ``plan``, ``doctor``, ``run``, ``batch`` and ``cache``.

One error boundary (:func:`main`): every failure is one line on stderr that says what to do, with
the exit code of :data:`EXIT_CODES`; ``--debug`` shows the traceback of an unexpected error. User
errors are found before any model is loaded (an output path that cannot be written among them).
Results go to stdout (``--json``: one JSON document), log events to stderr; a closed stdout
(``| head``) ends the command quietly. torch and diffusers are imported only by the commands that
need them, so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

GIB = 2**30
SIZE_HELP = "sizes take a unit (8GiB, 512MiB, 16GB); a bare number is read as GiB, with a warning"
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu)(:\d+)?")
_PIPELINE_IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# What each exit code means (README, "Command line"; the --help epilog).
EXIT_CODES = {
    0: "done",
    1: "failed: nothing fits (plan), an output that cannot be written, an unexpected error",
    2: "a mistake in the command, found before any model is loaded",
    3: "run: memory ran out at the last rung",
    4: "batch: some items failed (see manifest.jsonl)",
    130: "interrupted (Ctrl-C)",
    141: "stdout was closed early (| head): nothing more is printed",
}


class UsageError(Exception):
    """A mistake in what the user asked: one line, exit code 2."""


class OutputError(Exception):
    """An output that cannot be written for want of space (not a mistake in the command: a rerun
    after freeing space works): one line, exit code 1."""


# A full disk, a quota, a file-size limit: not a mistake in the command.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block; --help still shows the usage.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _size(text: str) -> int:
    from .proxy import parse_bytes

    if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text):
        print(f"autofit: warning: size {text.strip()} has no unit; read as {text.strip()}GiB "
              f"(write {text.strip()}GiB to say so)", file=sys.stderr)
        text = f"{text.strip()}GiB"
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole(text: str, unit: str = "") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{unit}") from None


def _count(text: str) -> int:
    value = _whole(text)
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (and at most 100000)")
    return value


def _pixels(text: str) -> int:
    value = _whole(text, " of pixels")
    if not 8 <= value <= 16_384 or value % 8:
        raise argparse.ArgumentTypeError(f"{value} pixels: use a multiple of 8 from 8 to 16384")
    return value


def _seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is out of range; use 0..{2**64 - 1}")
    return value


def _device_name(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cuda, cuda:1, cpu, mps or xpu")
    return text


def _check_device(device: str | None) -> None:
    """The device exists in this torch build (before anything is loaded onto it)."""
    if device is None or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", lambda: False)
    if kind == "mps":
        available = torch.backends.mps.is_available
    if not available():
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if kind == "cuda" and not torch.version.cuda else "")
        raise UsageError(f"--device {device}: no {kind} device in this {build}; use --device cpu or install a "
                         f"torch build for your accelerator")
    count = getattr(backend, "device_count", lambda: 1)()
    if index and int(index) >= count:
        raise UsageError(f"--device {device}: this machine has {count} {kind} device(s), numbered from 0")


def _check_model_dir(model_dir: str) -> None:
    path = Path(model_dir)
    if not path.exists():
        hint = (" (a hub id? autofit reads a local folder: download it first, e.g. "
                f"`hf download {model_dir} --local-dir DIR`)" if "/" in model_dir and not path.is_absolute() else "")
        raise UsageError(f"{model_dir}: no such folder{hint}")
    if not path.is_dir():
        raise UsageError(f"{model_dir}: not a folder; pass the folder of a diffusers pipeline")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"{model_dir} has no model_index.json; pass the folder of a diffusers pipeline "
                         "(the one save_pretrained() wrote, or a snapshot from the hub cache)")


def _check_out_dir(folder: Path, option: str, given: str) -> None:
    """``folder`` exists or can be made, and a file can be made in it (and is removed again): checked before the model loads, so a bad --out costs a second, not a load and
    a generation. A regular file in the way, a read-only file system, a name too long: UsageError
    (exit 2); no space: OutputError (exit 1)."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{option} {given}: {blocker} is a file, not a folder; choose another {option}")
    step = f"cannot create the folder {folder}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        step = f"cannot write in {folder}"
        fd, made = tempfile.mkstemp(prefix=".autofit-probe-", dir=folder)  # a new name: never a user's file
        os.close(fd)
        os.unlink(made)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _NO_SPACE:
            raise OutputError(f"{option} {given}: {step} ({reason}); free space and rerun") from None
        raise UsageError(f"{option} {given}: {step} ({reason}); choose another {option}") from None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _save_image(image: Any, out: Path) -> tuple[Path, str | None]:
    """Save ``image`` at ``out`` (a temporary file renamed into place). When that fails, the image,
    made at the cost of a whole generation, goes to a fresh name in the current folder, else in the
    temp folder: never lost, never over another file. Returns where it went and why not at ``out``
    (None when it is there)."""
    # A name no file has (pid and a random token): removing it on failure removes only what this
    # save wrote. Saved by PIL itself, so the image gets the umask's usual permissions.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{out.suffix}")
    try:
        image.save(tmp)
        os.replace(tmp, out)
        return out, None
    except Exception as exc:  # OSError mostly; PIL's own errors for a format it cannot write
        problem = (exc.strerror if isinstance(exc, OSError) else None) or f"{type(exc).__name__}: {exc}"
        _unlink_quietly(tmp)
    folders: list[Path] = []
    try:
        folders.append(Path.cwd())
    except OSError:  # the current folder was removed
        pass
    folders.append(Path(tempfile.gettempdir()))
    for folder in dict.fromkeys(folders):
        for suffix in dict.fromkeys((out.suffix, ".png")):
            try:
                fd, name = tempfile.mkstemp(prefix=f"{out.stem[:64]}-", suffix=suffix, dir=folder)
            except OSError:
                break
            os.close(fd)
            try:
                image.save(name)
                return Path(name), problem
            except Exception:
                _unlink_quietly(Path(name))
    where = " or ".join(map(str, dict.fromkeys(folders)))
    raise OutputError(f"cannot write {out} ({problem}), nor a copy in {where}")


def _hardware(args: argparse.Namespace):
    from .hardware import probe

    device = args.device or ("cuda" if _cuda() else "cpu")
    return probe(device, max_vram=args.vram, max_ram=args.ram)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _folder_defaults(folder: Path, pipeline: str) -> dict[str, Any]:
    """What a call of the pipeline in ``folder`` makes when it is given no size or frames: its
    ``__call__``'s defaults, else the denoiser's ``sample_size`` x the VAE's scale (as SD 1.5
    and SDXL compute it), else 1024; and whether it makes videos (takes ``num_frames``)."""
    from .preflight import call_defaults

    params: dict[str, Any] = {}
    try:
        with _quiet(True):  # importing the class imports its encoders' libraries, with their notices
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


def cmd_plan(args: argparse.Namespace) -> int:
    from .footprint import measure_folder
    from . import disk
    from .context import POLICIES, Machine, Workload, context
    from .cost import pinned_bytes, resident_split
    from .planner import rank
    from .rungs import RUNGS
    from .strategies.quantize import missing

    _check_model_dir(args.model_dir)
    if args.vram is None:
        _check_device(args.device)  # with --vram, planning for another machine's device is the point
    pipeline, fp = measure_folder(args.model_dir, dtype=args.dtype)  # a broken index: AutoFitUsageError
    if not fp.components:
        raise UsageError(f"{args.model_dir}: no component with weights found (model_index.json lists none that "
                         "has *.safetensors or *.bin files); pass the folder of a complete diffusers pipeline")
    defaults = _folder_defaults(Path(args.model_dir), pipeline)
    if args.frames is not None and args.frames > 1 and not defaults["video"]:
        raise UsageError(f"--frames {args.frames}: {pipeline} makes images, not videos; leave --frames out "
                         "(it is for video pipelines: Wan, CogVideoX, LTX, HunyuanVideo...)")
    args.frames = args.frames or defaults["frames"]
    args.height = args.height or defaults["height"]
    args.width = args.width or defaults["width"]
    if args.vram is not None and args.device is not None:
        # Planning for another machine's device: its kind decides streams and quantization
        # backends; the bandwidths are this machine's when it has that device, else the host's.
        try:
            _check_device(args.device)
            hw = _hardware(args)
        except UsageError:
            hw = _hardware(argparse.Namespace(**{**vars(args), "device": "cpu"}))
        device_type = args.device.split(":")[0]
    else:
        hw = _hardware(args)
        device_type = hw.device_type if args.vram is None else "cuda"
    budget = args.vram if args.vram is not None else hw.budget_bytes
    host = args.ram if args.ram is not None else hw.host_available_bytes
    # What can be page-locked: --pinned, else this machine's (unless --ram describes another one).
    pinned = args.pinned if args.pinned is not None else (hw.pinned_available_bytes if args.ram is None else None)
    free_disk = args.disk if args.disk is not None else disk.free_bytes()
    machine = Machine(budget, host, device_type, hw.pinned_gbps, hw.pageable_gbps, quant_missing=missing(device_type),
                      pinned_available_bytes=pinned, disk_available_bytes=free_disk,
                      disk_unusable=disk.unusable() if args.disk is None else None)
    cfg = "Flux" not in pipeline
    wl = Workload(height=args.height, width=args.width, frames=args.frames, batch=args.batch, steps=args.steps, cfg=cfg)
    # Rank under the permissive policy so lossy rows show too; the pick honours --policy.
    rows = rank(context(fp, machine, wl, policy="speed"))
    ranked = rank(context(fp, machine, wl, policy=args.policy))
    pick = next((c for c in ranked if c.fits), None)
    # Speeds compare with the fastest plan --policy allows, not with one it forbids.
    fastest = min((c.seconds for c in ranked if c.fits), default=None)

    def row(c, strategy: str | None = None) -> dict[str, Any]:
        out = {"strategy": strategy} if strategy is not None else {}
        if c.plan.family == "resident_stream":  # partial residency: what stays, what streams
            split = resident_split(c.plan, fp).values()
            out.update(resident_gib=round(sum(r for r, _ in split) / GIB, 2),
                       streamed_gib=round(sum(s for _, s in split) / GIB, 2))
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
    for name in ("device", *RUNGS):
        using = [c for c in ranked if (name in (c.plan.family, *c.plan.extras) if name != "device" else not c.names)]
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
            if "streamed_gib" in r:
                note = f"  (resident {r['resident_gib']} GiB, streamed {r['streamed_gib']} GiB)" + note
            print(f"{mark}{label[:63]:<63} {str(r['fits']):<5} {r['vram_gib']:>7.2f} {r['ram_gib']:>7.2f} "
                  f"{r['pinned_gib']:>7.2f} {r['seconds']:>7.2f} {r['relative_speed'] or 0:>6.2f}  {r['quality']}{note}")

    show(by_strategy, "strategy (fastest plan using it)")
    if args.all:
        print()
        show(table, "every plan")
    print(f"\nautofit would pick: {'+'.join(summary['pick']) if pick else 'nothing fits'} (policy {args.policy})")
    return 0 if pick else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from .memory import cgroup_memory, host_available_bytes, pinned_in_use
    from .strategies.quantize import missing as quant_missing

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    _check_device(args.device)
    hw = _hardware(args)
    from . import __version__

    report: dict[str, Any] = {
        "python": platform.python_version(),
        # This distribution is autofit-diffusers (the PyPI name `autofit` is another project).
        "autofit": {"version": __version__, "distribution": "autofit-diffusers", "path": str(Path(__file__).parent),
                    "other_autofit": ver("autofit")},
        "versions": {n: ver(n) for n in ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes",
                                        "torchao", "nvidia-ml-py", "structlog")}
                    | {"autofit-diffusers": __version__},
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
        print(f"  {name:<17} {v or '-'}")
    if report["autofit"]["other_autofit"]:
        print(f"  warning: the unrelated PyPI project `autofit` (PyAutoFit) {report['autofit']['other_autofit']} is "
              "installed too and also imports as `autofit`; `pip uninstall autofit` unless you need it")
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
    try:
        return DiffusionPipeline.from_pretrained(args.model_dir, **_diffusers.dtype_kwargs(dtype))
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{args.model_dir}: cannot load the pipeline ({type(exc).__name__}: {first})") from None


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from PIL import Image

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {args.out}: {out.suffix or 'no extension'} is not an image format; "
                         f"use one of {', '.join(_PIPELINE_IMAGES)}")
    _check_model_dir(args.model_dir)
    _check_device(args.device)
    if out.is_dir():
        raise UsageError(f"--out {args.out}: is a folder; name the image file, e.g. {out / 'image.png'}")
    _check_out_dir(out.parent, "--out", args.out)

    from . import AutoFitExhausted, autofit

    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=bool(getattr(args, "quiet", False)))
    proxy = autofit(pipe, device=args.device, policy=args.policy, max_vram=args.vram, max_ram=args.ram,
                    cache=args.cache_dir or True)
    kwargs: dict[str, Any] = dict(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    if args.height is not None:
        kwargs["height"] = args.height
    if args.width is not None:
        kwargs["width"] = args.width
    try:
        image = proxy(args.prompt, **kwargs).images[0]
    except AutoFitExhausted as exc:
        print(f"autofit run: {_one_line(exc)}; try a smaller --height/--width, --policy speed (lossy rungs) "
              "or free device memory", file=sys.stderr)
        return 3
    saved, problem = _save_image(image, out)
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
    plan_path = saved.with_suffix(".plan.json")
    try:
        plan_path.write_text(json.dumps(record, indent=2, default=str))
        plan_problem = None
    except OSError as exc:
        plan_problem = exc.strerror or str(exc)
    if problem is not None:
        print(f"autofit run: cannot write {out} ({problem}); the image is saved as {saved} instead"
              + (f", its plan as {plan_path}" if plan_problem is None else ""), file=sys.stderr)
        return 1
    if plan_problem is not None:
        print(f"autofit run: wrote {out}, but cannot write {plan_path} ({plan_problem})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"image": str(out), "plan_file": str(plan_path), **record}, default=str))
    else:
        print(f"wrote {out} and {plan_path} (plan: {'+'.join(proxy.autofit.plan) or 'device'})")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch_items import read_items
    from .errors import AutoFitUsageError

    try:
        items, rejected = read_items(args.prompts, base_seed=args.seed)
    except AutoFitUsageError as exc:
        raise UsageError(str(exc)) from None
    if not items and not rejected:
        raise UsageError(f"{args.prompts}: no prompts in it")
    for bad in rejected:  # recorded in the manifest as failed too; the others run
        print(f"autofit batch: skipping {bad.error}", file=sys.stderr)
    _check_model_dir(args.model_dir)
    if args.ray is None:  # with --ray, the device is the workers', not this machine's
        _check_device(args.device)
    out = Path(args.out)
    _check_out_dir(out, "--out", args.out)
    for shard in out.glob("manifest*.jsonl"):
        if not shard.is_file():
            raise UsageError(f"--out {args.out}: {shard.name} there is not a file; move it away or choose "
                             "another --out")

    from . import autofit
    from .batch import BatchError, pending, run_batch

    defaults: dict[str, Any] = {"num_inference_steps": args.steps}
    if args.height is not None:
        defaults["height"] = args.height
    if args.width is not None:
        defaults["width"] = args.width
    if not rejected:
        # Resuming a finished batch: the manifest says so in a second, without loading the model.
        try:
            index = json.loads((Path(args.model_dir) / "model_index.json").read_text())
        except (OSError, ValueError):
            index = {}  # the load below says what is wrong with it
        pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
        try:
            todo = pending(items, out, defaults=defaults, model=f"{pipeline}:{args.model_dir}")
        except BatchError as exc:
            print(f"autofit batch: {exc}", file=sys.stderr)
            return 1
        if not todo:
            summary = {"done": 0, "skipped": len(items), "failed": {}, "seconds": 0.0, "out": str(args.out)}
            print(json.dumps(summary) if args.json else
                  f"done 0, skipped {len(items)} (finished before), failed 0 -> {args.out} (nothing to do: "
                  "the model was not loaded)")
            return 0
    if args.ray is not None:  # the same job on a Ray cluster (src/autofit/ray.py)
        try:
            from .ray import cli_batch
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        return cli_batch(args, items, rejected, defaults)
    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    options = dict(policy=args.policy, max_vram=args.vram, max_ram=args.ram, cache=args.cache_dir or True)
    if not args.distributed:
        pipe = autofit(pipe, device=args.device, **options)
    try:
        report = run_batch(pipe, [*rejected, *items], args.out, defaults=defaults,
                           progress=not (args.json or getattr(args, "quiet", False)),
                           distributed=args.distributed, options=options)
    except BatchError as exc:
        print(f"autofit batch: {exc}", file=sys.stderr)
        return 1
    summary = {"done": len(report.done), "skipped": len(report.skipped), "failed": report.failed,
               "seconds": round(report.seconds, 2), "out": str(args.out)}
    print(json.dumps(summary) if args.json else
          f"done {summary['done']}, skipped {summary['skipped']} (finished before), failed {len(report.failed)} "
          f"in {summary['seconds']} s -> {args.out}" + (" (see manifest.jsonl for the errors)" if report.failed else ""))
    return 0 if not report.failed else 4


def _cache_row(entry: Any, now: float) -> dict[str, Any]:
    """One `autofit cache list` row: what the record's key says of the workload (model, size,
    batch, budget, policy), its plan and age. Fields a record lacks are None."""
    record = entry.record or {}
    key = record.get("key") if isinstance(record.get("key"), dict) else {}

    def number(value: Any) -> Any:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    size = record.get("size")
    size = size if isinstance(size, list) and len(size) == 2 and all(number(v) for v in size) else None
    pixels, budget, updated = number(key.get("pixels_bucket")), number(key.get("budget_bucket")), number(record.get("updated"))
    return {"key": entry.key, "pipeline": key.get("pipeline"), "model": key.get("pipeline"),
            "size": size,  # [height, width] of the last call stored, where the record has it
            "megapixels": round(pixels * 65536 / 1e6, 2) if pixels is not None else None,  # the key's bucket
            "frames": number(key.get("frames")), "batch": number(key.get("batch")),
            "budget_gib": budget * 0.5 if budget is not None else None,  # the 512 MiB bucket's floor
            "policy": key.get("policy"), "device": key.get("device"),
            "plan": record.get("plan"), "updated": updated,
            "age_s": round(max(0.0, now - updated), 1) if updated is not None else None,
            "problem": entry.problem}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{int(seconds // length)} {unit} ago"
    return f"{int(seconds)} s ago"


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import PlanCache

    cache = PlanCache(args.cache_dir)
    if args.action == "list":
        import time

        now = time.time()
        rows = [_cache_row(e, now) for e in cache.entries()]
        if args.json:
            print(json.dumps({"directory": str(cache.directory), "records": rows}, indent=2))
            return 0
        print(f"{cache.directory}: {len(rows)} record(s)")
        table = [("MODEL", "SIZE", "BATCH", "BUDGET", "POLICY", "PLAN", "AGE", "KEY")]
        for r in rows:
            what = f"ignored: {r['problem']}" if r["problem"] else "+".join(r["plan"] or []) or "device"
            size = r["size"] and "x".join(map(str, r["size"]))
            if not size and r["megapixels"] is not None:
                size = f"~{r['megapixels']:g} MP"
            if size and (r["frames"] or 1) > 1:
                size += f" x{r['frames']}f"
            budget = f"{r['budget_gib']:g} GiB" if r["budget_gib"] is not None else "?"
            table.append((r["model"] or "?", size or "?", str(r["batch"] or "?"), budget, r["policy"] or "?",
                          what, _age(r["age_s"]), r["key"]))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        return 0
    if args.action == "show":
        if not args.key:
            raise UsageError("cache show needs a KEY (see `autofit cache list`)")
        try:
            path = cache._path(args.key)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        record = cache.get(args.key)
        if record is None:
            raise UsageError(f"no usable record {args.key} in {path.parent}")
        print(json.dumps(record, indent=2))
        return 0
    if args.model:
        _check_model_dir(args.model)
    n = cache.clear(model_dir=args.model)
    print(json.dumps({"removed": n}) if args.json else f"removed {n} record(s) from {cache.directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    codes = "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    parser = _Parser(prog="autofit", description="Fit diffusers pipelines to the memory you have.",
                     epilog=f"{SIZE_HELP}. Exit codes: {codes}.")
    parser.add_argument("--version", action="version", version=f"autofit {__version__}")
    # --debug and --quiet go before or after the command (SUPPRESS: a subcommand's default does
    # not override what was given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an unexpected error, show the traceback instead of one line")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, and only errors from autofit and its dependencies on stderr")
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    def hw_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vram", type=_size, default=None, help=f"device memory to plan for, e.g. 8GiB ({SIZE_HELP})")
        p.add_argument("--ram", type=_size, default=None, help="host RAM to plan for, e.g. 32GiB")
        p.add_argument("--device", type=_device_name, default=None,
                       help="cuda, cuda:1, cpu, mps, xpu (default: first accelerator)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plan", help="every strategy with predicted VRAM, RAM, speed and quality")
    p.add_argument("model_dir")
    hw_opts(p)
    p.add_argument("--height", type=_pixels, default=None,
                   help="default: the pipeline's own (its __call__'s, else sample_size x the VAE's scale)")
    p.add_argument("--width", type=_pixels, default=None, help="default: as --height")
    p.add_argument("--frames", type=_count, default=None,
                   help="video pipelines only (default: the pipeline's num_frames)")
    p.add_argument("--batch", type=_count, default=1)
    p.add_argument("--steps", type=_count, default=30)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="the dtype the pipeline will be loaded in (default: as stored)")
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--pinned", type=_size, default=None,
                   help="host RAM that can be page-locked (default: this machine's; Windows/WSL2 cap it)")
    p.add_argument("--disk", type=_size, default=None,
                   help="free disk for group_disk's offload folder (default: this machine's, at "
                        "$AUTOFIT_OFFLOAD_DIR or the cache folder's offload/)")
    p.add_argument("--all", action="store_true",
                   help="after the one-row-per-strategy table, list every combination of strategies, "
                        "fitting or not")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("doctor", help="devices, memory, limits, versions, what each strategy lacks")
    hw_opts(p)
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("run", help="generate one image with recovery; writes the plan beside it")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="the image to write (.png, .jpg, .webp...)")
    p.add_argument("--steps", type=_count, default=30)
    p.add_argument("--height", type=_pixels, default=None)
    p.add_argument("--width", type=_pixels, default=None)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--cache-dir", default=None)
    hw_opts(p)
    p.set_defaults(fn=cmd_run)  # --json: the plan record, with where the image and plan went

    p = sub.add_parser("batch", help="resumable batch: prompts file in, images + manifest.jsonl out")
    p.add_argument("model_dir")
    p.add_argument("--prompts", required=True,
                   help=".jsonl or .csv with a 'prompt' per item, or .txt with one prompt a line (UTF-8)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--steps", type=_count, default=30)
    p.add_argument("--height", type=_pixels, default=None)
    p.add_argument("--width", type=_pixels, default=None)
    p.add_argument("--seed", type=_seed, default=0, help="base seed: item i uses seed+i unless it sets one")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--policy", choices=["quality", "balanced", "speed", "memory"], default="quality")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--distributed", action="store_true",
                   help="one process per GPU under `accelerate launch`; items split with PartialState")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster, one actor per GPU: the one at ADDRESS (ray://host:10001, "
                        "host:6379, auto), else a new local one; --out must be a folder every node sees; "
                        "put --ray after MODEL_DIR (needs the [ray] extra)")
    hw_opts(p)
    p.set_defaults(fn=cmd_batch)

    p = sub.add_parser("cache", help="list, show or clear what the plan cache learned")
    p.add_argument("action", choices=["list", "show", "clear"])
    p.add_argument("key", nargs="?", help="the record to show (from `autofit cache list`)")
    p.add_argument("--model", default=None, help="clear: only the records of the pipeline in this folder")
    p.add_argument("--cache-dir", default=None, help="default: $AUTOFIT_CACHE_DIR or ~/.cache/autofit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_cache)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record; while a tqdm progress bar
    is on the terminal, through ``tqdm.write``, which clears the bar, writes the line and draws
    the bar again below it (a log line never lands in the middle of a bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        tqdm_std = sys.modules.get("tqdm.std")
        bars = getattr(getattr(tqdm_std, "tqdm", None), "_instances", None)
        if not bars:
            super().emit(record)
            return
        try:
            tqdm_std.tqdm.write(self.format(record), file=sys.stderr)  # type: ignore[union-attr]
        except Exception:
            self.handleError(record)


# Loggers of dependencies that write warnings and notices on import or load (transformers'
# torchvision fallbacks, bitsandbytes' kernel downloads...): --quiet raises them to ERROR.
_NOISY = ("transformers", "diffusers", "accelerate", "bitsandbytes", "huggingface_hub", "torchao", "torch")
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1"}


@contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """--quiet: dependencies' loading bars, warnings and notices silenced (errors still show), for
    the command's duration; environment, loggers and warning filters are restored afterwards."""
    if not on:
        yield
        return
    import warnings

    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    loggers = {name: logging.getLogger(name) for name in _NOISY}
    levels = {name: log.level for name, log in loggers.items()}
    for log in loggers.values():
        log.setLevel(logging.ERROR)
    bars = []  # (module, was enabled) for libraries already imported
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "is_progress_bar_enabled"):
            bars.append((module, module.is_progress_bar_enabled()))
            module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, log in loggers.items():
            log.setLevel(levels[name])
        for module, enabled in bars:
            if enabled:
                module.enable_progress_bar()


@contextmanager
def _logs_to_stderr(quiet: bool = False) -> Iterator[None]:
    """Results go to stdout, logs to stderr, always (``autofit batch --json | jq`` works); INFO
    and up, WARNING and up under --quiet. The logger is left as it was afterwards: ``main()``
    called in-process configures nothing for good."""
    log = logging.getLogger("autofit")
    level = log.level
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (the first line, at most 300 characters)."""
    text = " ".join(str(exc).split("\n")[0].split())[:300]
    return text or type(exc).__name__


def _stdout_gone() -> None:
    """stdout's reader went away (``| head``): point stdout at /dev/null so that the flush at exit
    does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    """The error boundary: whatever goes wrong is one line on stderr and an exit code of
    :data:`EXIT_CODES` (``--debug``: an unexpected error's traceback too)."""
    args = build_parser().parse_args(argv)
    from .errors import AutoFitUsageError

    debug, quiet = getattr(args, "debug", False), getattr(args, "quiet", False)
    say = f"autofit {args.command}:"
    try:
        with _quiet(quiet), _logs_to_stderr(quiet):
            code = int(args.fn(args))
            sys.stdout.flush()  # a closed pipe shows here, inside the boundary
            return code
    except (UsageError, AutoFitUsageError) as exc:
        print(f"{say} {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"{say} {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{say} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 141
    except Exception as exc:
        if debug:
            raise
        import torch

        what = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else "unexpected error"
        print(f"{say} {what}: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback; "
              "if it looks like a bug in autofit, report it with that traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
