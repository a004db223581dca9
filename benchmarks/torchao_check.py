"""Should autofit grow a torchao int8 weight-only rung (issue 4: "and torchao int8 weight-only if it
serves better")? One SDXL-sized UNet forward with its weights stored as autofit's fp8, bitsandbytes
nf4 and LLM.int8, and torchao int8 weight-only, against the unquantized forward: weight bytes,
seconds per forward, and the numeric drift of the output (relative error, cosine).

    python benchmarks/torchao_check.py --device cuda --out torchao.json     # GPU: all three figures
    python benchmarks/torchao_check.py --device cpu --latent 32             # CPU: bytes and drift only
    python benchmarks/torchao_check.py --tiny --device cpu                  # smoke path

torchao is not a dependency of autofit: carry a wheel matching the torch build (0.18 for 2.11+).
Random weights: the drift measures the storage format's rounding, not perceived image quality.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored, inner tensors of tensor subclasses included
    (torchao's quantized weights) and bitsandbytes' nf4 scales."""

    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        total = t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        return total

    return sum(size(p) for p in module.parameters()) + sum(size(b) for b in module.buffers())


def inputs(unet, latent: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
                                       "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]]).to(device, dtype)}}
    return sample.to(device, dtype), torch.tensor([500], device=device), text.to(device, dtype), extra


def apply(variant: str, unet, device):
    if variant == "fp8 (layerwise casting)":
        unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=unet.dtype)
    elif variant in ("bnb nf4", "bnb int8"):
        from autofit.strategies.quantize import quantize_module

        quantize_module(unet, variant.split()[1], device)
    elif variant == "torchao int8 weight-only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(unet, Int8WeightOnlyConfig())
    return unet.to(device)


def timed(unet, args_, device, repeat: int) -> tuple[torch.Tensor, float]:
    sample, t, text, extra = args_
    with torch.no_grad():
        out = unet(sample, t, text, **extra).sample  # warm-up (and the output)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            unet(sample, t, text, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return out.float().cpu(), (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024x1024 images)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    if args.tiny:
        from autofit.testing import tiny_sdxl

        base = tiny_sdxl().unet.to(dtype).eval()
        args.latent = min(args.latent, 8)
    else:
        from sized import sdxl_sized_unet

        base = sdxl_sized_unet("cpu", dtype)
    rows = []
    reference = None
    variants = ["unquantized", "fp8 (layerwise casting)", "bnb nf4", "bnb int8", "torchao int8 weight-only"]
    for variant in variants:
        unet = copy.deepcopy(base)
        try:
            unet = apply(variant, unet, device)
            out, seconds = timed(unet, inputs(unet, args.latent, device, dtype), device, args.repeat)
        except Exception as exc:  # a format this build cannot run is reported, not fatal
            row = {"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        else:
            row = {"variant": variant, "weight_gib": round(stored_bytes(unet) / 2**30, 3),
                   "s_per_forward": round(seconds, 4)}
            if reference is None:
                reference = out
            else:
                err = (out - reference).norm() / reference.norm()
                cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
                row.update(rel_error=round(float(err), 5), cosine=round(float(cos), 6))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del unet
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "latent": args.latent, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d")}
    try:
        import torchao

        meta["torchao"] = torchao.__version__
    except ImportError:
        meta["torchao"] = None
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
