"""Host RAM and time of the undo copy of a quantized component: kept in RAM vs read back from the
checkpoint the component was loaded from (``autofit.facts.checkpoint``).

An SDXL-sized UNet (fp16, random weights) is saved to a folder, loaded back with from_pretrained,
quantized in place, then restored; once keeping the original weights in RAM, once releasing the
ones that equal the file. Runs on the CPU (bitsandbytes' CPU backend) or a GPU (--device cuda).

    python benchmarks/undo_copy_check.py [--device cpu] [--level nf4] [--tiny]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30


def _rss() -> float:
    gc.collect()
    try:  # hand freed heap back to the OS, so RSS shows what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss / GIB


def _unet(tiny: bool):
    if tiny:
        from autofit.testing import tiny_sdxl

        return tiny_sdxl().unet.to(torch.float16)
    from sized import sdxl_sized_unet

    return sdxl_sized_unet("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--level", default="nf4", choices=("nf4", "int8"))
    ap.add_argument("--tiny", action="store_true", help="tiny UNet (smoke test, no figures claimed)")
    ap.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--checkpoint-first", action="store_true", help="measure the checkpoint mode first (order check)")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from autofit.facts.checkpoint import Checkpoint
    from autofit.strategies.quantize import quantize_module

    device = torch.device(args.device)
    root = Path(args.folder or tempfile.mkdtemp(prefix="autofit-undo-"))
    folder = root / "unet"
    t = time.perf_counter()
    unet = _unet(args.tiny)
    unet.save_pretrained(folder)
    del unet
    print(f"built and saved in {time.perf_counter() - t:.1f} s to {folder}", file=sys.stderr)
    rows = []
    modes = ("copy in RAM", "checkpoint")
    for mode in reversed(modes) if args.checkpoint_first else modes:
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).eval()
        with torch.no_grad():  # weights in anonymous memory, as after a tear-down from the GPU
            for p in unet.parameters():
                p.data = p.data.clone()
        weights = sum(p.numel() * p.element_size() for p in unet.parameters()) / GIB
        before = _rss()
        t0 = time.perf_counter()
        source = Checkpoint.of(unet) if mode == "checkpoint" else None
        undo = quantize_module(unet, args.level, device, source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        quantize_s = time.perf_counter() - t0
        after = _rss()
        held = undo.held_bytes
        t1 = time.perf_counter()
        undo()
        undo_s = time.perf_counter() - t1
        file_state = load_file(str(next(folder.glob("*.safetensors"))))
        state = unet.to("cpu").state_dict()
        exact = all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in file_state.items())
        del file_state
        rows.append({"mode": mode, "weights_gib": round(weights, 3), "quantize_s": round(quantize_s, 2),
                     "rss_growth_after_quantize_gib": round(after - before, 3),
                     "rss_after_quantize_gib": round(after, 3), "held_gib": round(held / GIB, 3),
                     "undo_s": round(undo_s, 2), "restored_bit_for_bit": exact})
        del unet, undo, state
        gc.collect()
    for r in rows:
        print(json.dumps(r))
    a, b = sorted(rows, key=lambda r: r["mode"] != "copy in RAM")
    print(json.dumps({"level": args.level, "device": str(device), "torch": torch.__version__,
                      "rss_after_quantize_checkpoint_vs_copy_gib": round(b["rss_after_quantize_gib"]
                                                                         - a["rss_after_quantize_gib"], 3),
                      "quantize_time_ratio_checkpoint_vs_copy": round(b["quantize_s"] / a["quantize_s"], 3)}))
    if not args.folder:
        for f in folder.iterdir():
            os.remove(f)
        folder.rmdir()
        root.rmdir()


if __name__ == "__main__":
    main()
