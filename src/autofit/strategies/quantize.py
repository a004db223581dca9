"""bitsandbytes weight quantization (nf4, LLM.int8) of already-loaded components, in place.

Every ``nn.Linear`` of a target component (the denoiser, large text encoders) that fp8 casting
would also treat (norms, embeddings and in/out projections are left alone) is swapped for a
bitsandbytes layer built around the same weight tensor; bitsandbytes quantizes it when the layer
is moved to its device, one layer at a time, so the full-precision component never has to fit on
the device. The original ``nn.Linear`` modules are kept (on the CPU, where the weights already
are after teardown): they are the copy that makes this one-way rung undoable, bit for bit.

Works on CUDA and, since bitsandbytes 0.48, on the CPU (its pure-torch backend), which is what the
tests use. A pipeline loaded quantized by the user is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..footprint import Footprint, skipped_layer
from ..stages import module_components
from .casting import compute_dtype

LEVELS = ("nf4", "int8")
MIN_BNB = (0, 48)  # CPU backend, and int8 weights that can move between devices


def missing(device_type: str) -> str | None:
    """Why bitsandbytes quantization cannot run here, or None."""
    if device_type not in ("cuda", "cpu", "xpu"):
        return f"bitsandbytes has no backend for device type {device_type!r}"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising anything
        return f"bitsandbytes is not usable ({type(exc).__name__}); pip install 'autofit[quant]'"
    try:
        version = tuple(int(x) for x in bnb.__version__.split(".")[:2])
    except ValueError:
        return None
    if version < MIN_BNB:
        return f"bitsandbytes {bnb.__version__} is too old; need >= {'.'.join(map(str, MIN_BNB))}"
    return None


def quantized_level(module: torch.nn.Module) -> str | None:
    """'nf4' / 'int8' when ``module`` holds bitsandbytes weights (autofit's or the user's)."""
    for p in module.parameters():
        kind = type(p).__name__
        if kind == "Params4bit":
            return "nf4"
        if kind == "Int8Params":
            return "int8"
    return None


def _bnb_layer(linear: torch.nn.Linear, level: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if level == "nf4":
        # Built on the meta device: its own (discarded) weight would cost a full-size allocation.
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=False, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=False,
                                         quant_type="nf4")
    else:
        # threshold 6.0: LLM.int8's outlier split, the default of transformers' BitsAndBytesConfig.
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


@dataclass(slots=True)
class _Swaps:
    """The layers swapped in one component: (parent, attribute, original nn.Linear)."""

    done: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)

    def undo(self) -> None:
        for parent, attr, original in reversed(self.done):
            setattr(parent, attr, original)
        self.done.clear()


def quantize_module(module: torch.nn.Module, level: str, device: torch.device) -> Callable[[], None]:
    """Quantize ``module``'s Linear layers in place, each on ``device``; returns the undo.

    Transactional: if a layer fails (an OOM included), the layers already swapped are put back
    and the error goes on up."""
    if level not in LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {LEVELS}")
    dtype = compute_dtype(module)
    swaps = _Swaps()
    targets = [
        (name, sub) for name, sub in module.named_modules()
        if type(sub) is torch.nn.Linear and sub.weight.is_floating_point() and not skipped_layer(name)
    ]
    try:
        for name, linear in targets:
            owner, _, attr = name.rpartition(".")
            parent = module.get_submodule(owner) if owner else module
            layer = _bnb_layer(linear, level, dtype)
            setattr(parent, attr, layer)
            swaps.done.append((parent, attr, linear))
            layer.to(device)  # bitsandbytes quantizes here
    except BaseException:
        swaps.undo()
        raise
    return swaps.undo


def apply_quantization(
    pipe: Any, footprint: Footprint, level: str, device: torch.device, *, skip: frozenset[str] = frozenset()
) -> dict[str, Callable[[], None]]:
    """Quantize every target component (``quant_ok`` in the footprint) not in ``skip`` and not
    quantized already. Returns component -> undo. All or nothing: on failure the components done
    so far are restored before the error goes on up."""
    undos: dict[str, Callable[[], None]] = {}
    try:
        for name, module in module_components(pipe).items():
            c = footprint.components.get(name)
            if c is None or not c.quant_ok or name in skip or quantized_level(module):
                continue
            undos[name] = quantize_module(module, level, device)
    except BaseException:
        for undo in undos.values():
            undo()
        raise
    return undos
