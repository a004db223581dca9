"""What every command shares: argument types, the checks made before any model is loaded, and
the two errors the boundary in :func:`autofit.cli.main` turns into one line.

Imports nothing heavy at module level: building the parser (``autofit --help``) stays fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
from pathlib import Path

from autofit.units import parse_bytes

SIZE_HELP = "sizes take a unit (8GiB, 512MiB, 16GB); a bare number is read as GiB, with a warning"
DTYPES = ("float16", "bfloat16", "float32")
POLICIES = ("quality", "balanced", "speed", "memory")
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu)(:\d+)?")
# A full disk, a quota, a file-size limit: not a mistake in the command.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class UsageError(Exception):
    """A mistake in what the user asked: one line, exit code 2."""


class OutputError(Exception):
    """An output that cannot be written for want of space (not a mistake in the command: a rerun
    after freeing space works): one line, exit code 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block; --help still shows the usage.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def size(text: str) -> int:
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


def count(text: str) -> int:
    value = _whole(text)
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (and at most 100000)")
    return value


def pixels(text: str) -> int:
    value = _whole(text, " of pixels")
    if not 8 <= value <= 16_384 or value % 8:
        raise argparse.ArgumentTypeError(f"{value} pixels: use a multiple of 8 from 8 to 16384")
    return value


def seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is out of range; use 0..{2**64 - 1}")
    return value


def device_name(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cuda, cuda:1, cpu, mps or xpu")
    return text


def add_machine_options(p: argparse.ArgumentParser) -> None:
    """--vram, --ram, --device and --json, as plan, doctor, run and batch take them."""
    p.add_argument("--vram", type=size, default=None, help=f"device memory to plan for, e.g. 8GiB ({SIZE_HELP})")
    p.add_argument("--ram", type=size, default=None, help="host RAM to plan for, e.g. 32GiB")
    p.add_argument("--device", type=device_name, default=None,
                   help="cuda, cuda:1, cpu, mps, xpu (default: first accelerator)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """What run and batch pass to the pipeline and to autofit."""
    p.add_argument("--steps", type=count, default=30)
    p.add_argument("--height", type=pixels, default=None)
    p.add_argument("--width", type=pixels, default=None)


def check_device(device: str | None) -> None:
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
    number = getattr(backend, "device_count", lambda: 1)()
    if index and int(index) >= number:
        raise UsageError(f"--device {device}: this machine has {number} {kind} device(s), numbered from 0")


def check_model_dir(model_dir: str) -> None:
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


def check_out_dir(folder: Path, option: str, given: str) -> None:
    """``folder`` exists or can be made, and a file can be made in it (and is removed again):
    checked before the model loads, so a bad --out costs a second, not a load and a generation.
    A regular file in the way, a read-only file system, a name too long: UsageError (exit 2); no
    space: OutputError (exit 1)."""
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


def hardware(args: argparse.Namespace):
    """This machine's facts for ``--device`` (default: CUDA when there is one), capped by --vram/--ram."""
    import torch

    from autofit.facts.hardware import read_machine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return read_machine(device, max_vram=args.vram, max_ram=args.ram)
