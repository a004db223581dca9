"""``autofit doctor``: devices, memory, limits, versions, and what each rung lacks here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from autofit.cli import args as a
from autofit.units import GIB, gib

_VERSIONS = ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes", "torchao", "nvidia-ml-py",
             "structlog")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="devices, memory, limits, versions, what each rung lacks")
    a.add_machine_options(p)
    p.set_defaults(fn=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    a.check_device(args.device)
    report = gather(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render(report)
    return 0


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gather(args: argparse.Namespace) -> dict[str, Any]:
    """The report ``doctor --json`` prints."""
    import torch

    from autofit import __version__
    from autofit.facts.memory import cgroup_memory, host_available_bytes, pinned_in_use

    hw = a.hardware(args)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        # This distribution is autofit-diffusers (the PyPI name `autofit` is another project).
        "autofit": {"version": __version__, "distribution": "autofit-diffusers",
                    "path": str(Path(__file__).parent.parent), "other_autofit": _version("autofit")},
        "versions": {n: _version(n) for n in _VERSIONS} | {"autofit-diffusers": __version__},
        "device": hw.as_dict(),
        "cuda_available": torch.cuda.is_available(),
        "host_available_gib": gib(host_available_bytes()),
        "pinned_in_use_gib": gib(pinned_in_use()),
        "cgroup": cgroup_memory(),  # the tightest memory limit on this process's cgroup, or None
    }
    if args.device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        from autofit.facts.hardware import read_machine

        # Every visible GPU: a batch job runs one process per GPU (autofit batch --distributed).
        report["devices"] = [read_machine(f"cuda:{i}").as_dict() for i in range(torch.cuda.device_count())]
    report["missing"] = _missing(hw.device_type)
    return report


def _missing(device_type: str) -> dict[str, str]:
    """Strategy (or fact) -> what this machine lacks for it."""
    import torch

    from autofit.strategies.quantize import missing as quant_missing

    missing = {}
    if not torch.cuda.is_available():
        missing["group_leaf_stream / group_leaf_lowmem"] = "CUDA or XPU streams (no accelerator found)"
        missing["sequential"] = "an accelerator (accelerate's hooks fail with the CPU as execution device)"
    if not hasattr(torch, "float8_e4m3fn"):
        missing["fp8"] = "a torch build with float8_e4m3fn"
    if importlib.util.find_spec("pynvml") is None:
        missing["nvml"] = "nvidia-ml-py for device memory used by other processes (pip install nvidia-ml-py)"
    quant_reason = quant_missing(device_type)  # absent, too old, broken, or no backend for the device
    if quant_reason is not None:
        missing["quantization (nf4/int8)"] = quant_reason
    return missing


def render(report: dict[str, Any]) -> None:
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
    for what, need in report["missing"].items():  # quantize.missing's reason is a whole sentence
        print(f"  unavailable: {what}: " + (need if what == "quantization (nf4/int8)" else f"needs {need}"))
