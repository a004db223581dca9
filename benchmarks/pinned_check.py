"""Pinned host memory of streamed group offload: predicted (each tensor rounded up to a power of
two, as torch's pinned allocator does) against torch's pinned-allocator statistics, and what is
left pinned after switching to a plan that pins nothing. Also prints what NVML and torch say of
the device (NVML is asked by the device's UUID).

    python benchmarks/pinned_check.py [--device cuda] [--tiny] [--out pinned.json]

On the CPU (--tiny) only the prediction is computed: there is no pinned allocator to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny pipeline (smoke test, no figures claimed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from autofit import autofit
    from autofit.facts.hardware import read_machine
    from autofit.planning.cost import pinned_bytes
    from autofit.facts.memory import pinned_in_use
    from autofit.plan import Plan

    if args.tiny:
        from autofit.testing import tiny_sdxl

        pipe = tiny_sdxl()
    else:
        from sized import sdxl_sized

        pipe = sdxl_sized("cpu")
    stream = Plan("group_leaf_stream")
    result: dict = {"device": args.device, "torch": torch.__version__}
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    proxy = autofit(pipe, plan=("group_leaf_stream",) if cuda else (), device=args.device, cache=False)
    fp = proxy.autofit.footprint
    result["weights_gib"] = round(fp.total / GIB, 3)
    result["predicted_pinned_gib"] = round(pinned_bytes(stream, fp) / GIB, 3)
    if cuda:
        hw = read_machine(args.device)
        free, total = torch.cuda.mem_get_info()
        result["probe"] = {"source": hw.source, "name": hw.device_name, "total_gib": round(hw.total_bytes / GIB, 2),
                           "free_gib": round(hw.free_bytes / GIB, 2), "torch_free_gib": round(free / GIB, 2),
                           "torch_total_gib": round(total / GIB, 2)}
        before = pinned_in_use()
        t = time.perf_counter()
        proxy("a photo", num_inference_steps=2, height=512, width=512, output_type="latent")
        result["first_call_s"] = round(time.perf_counter() - t, 2)
        result["measured_pinned_gib"] = round((pinned_in_use() - before) / GIB, 3)
        rt = proxy._self_runtime
        with rt.lock:
            rt._switch(Plan("model_offload"))  # a plan that pins nothing: the copies must go back
        result["pinned_after_switch_gib"] = round(pinned_in_use() / GIB, 3)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
