"""``autofit run MODEL_DIR --prompt ... --out IMAGE``: one image with recovery, and beside it the plan
that made it (``IMAGE.plan.json``, the form of :func:`autofit.records.plan_record`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from autofit.cli import args as a
from autofit.cli import loading
from autofit.cli.args import OutputError, UsageError
from autofit.cli.terminal import one_line

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="generate one image with recovery; writes the plan beside it")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="the image to write (.png, .jpg, .webp...)")
    a.add_generation_options(p)
    p.add_argument("--seed", type=a.seed, default=0)
    p.add_argument("--dtype", choices=a.DTYPES, default=None)
    p.add_argument("--policy", choices=a.POLICIES, default="quality")
    p.add_argument("--cache-dir", default=None)
    a.add_machine_options(p)
    p.set_defaults(fn=cmd_run)  # --json: the plan record, with where the image and plan went


def cmd_run(args: argparse.Namespace) -> int:
    out = _checked_out(args)
    import torch

    from autofit import AutoFitExhausted, autofit
    from autofit.records import plan_record

    pipe = loading.load_pipeline(args)
    pipe.set_progress_bar_config(disable=bool(getattr(args, "quiet", False)))
    proxy = autofit(pipe, device=args.device, policy=args.policy, max_vram=args.vram, max_ram=args.ram,
                    cache=args.cache_dir or True)
    kwargs: dict[str, Any] = dict(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    kwargs.update({k: v for k in ("height", "width") if (v := getattr(args, k)) is not None})
    try:
        image = proxy(args.prompt, **kwargs).images[0]
    except AutoFitExhausted as exc:
        print(f"autofit run: {one_line(exc)}; try a smaller --height/--width, --policy speed (lossy rungs) "
              "or free device memory", file=sys.stderr)
        return 3
    saved, problem = save_image(image, out)
    record = {**plan_record(proxy.autofit.plan, proxy.autofit.history, proxy.autofit.last_call),
              "prompt": args.prompt, "seed": args.seed}
    return _report(args, out, saved, problem, record)


def _checked_out(args: argparse.Namespace) -> Path:
    """--out names an image this command can write (checked before the model loads)."""
    from PIL import Image

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {args.out}: {out.suffix or 'no extension'} is not an image format; "
                         f"use one of {', '.join(_IMAGE_SUFFIXES)}")
    a.check_model_dir(args.model_dir)
    a.check_device(args.device)
    if out.is_dir():
        raise UsageError(f"--out {args.out}: is a folder; name the image file, e.g. {out / 'image.png'}")
    a.check_out_dir(out.parent, "--out", args.out)
    return out


def _report(args: argparse.Namespace, out: Path, saved: Path, problem: str | None, record: dict[str, Any]) -> int:
    """Write the plan beside the image and say where both went."""
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
        print(f"wrote {out} and {plan_path} (plan: {'+'.join(record['plan']) or 'device'})")
    return 0


def save_image(image: Any, out: Path) -> tuple[Path, str | None]:
    """Save ``image`` at ``out`` (written whole, then renamed into place). When that fails, the
    image, made at the cost of a whole generation, goes to a fresh name in the current folder, else
    in the temp folder: never lost, never over another file. Returns where it went and why not at
    ``out`` (None when it is there)."""
    from autofit.files import write_atomically

    try:  # saved by PIL itself, so the image gets the umask's usual permissions
        write_atomically(out, image.save)
        return out, None
    except Exception as exc:  # OSError mostly; PIL's own errors for a format it cannot write
        problem = (exc.strerror if isinstance(exc, OSError) else None) or f"{type(exc).__name__}: {exc}"
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
                try:
                    os.unlink(name)
                except OSError:
                    pass
    where = " or ".join(map(str, dict.fromkeys(folders)))
    raise OutputError(f"cannot write {out} ({problem}), nor a copy in {where}")
