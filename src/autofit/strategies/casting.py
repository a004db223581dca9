"""fp8 layerwise casting: weights stored in float8_e4m3fn, computed in their own dtype. One-way."""

from __future__ import annotations

from typing import Any

import torch

from .. import _diffusers
from ..footprint import Footprint
from ..stages import module_components


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a component computes in: that of its first floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


Originals = dict[str, torch.Tensor]


def _snapshot(module: torch.nn.Module) -> Originals:
    """A CPU copy of every parameter and buffer, to undo the cast if the component breaks."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict(keep_vars=True).items()}


def apply_fp8(
    pipe: Any, footprint: Footprint, *, skip: frozenset[str] = frozenset(), host_available: int = 0
) -> tuple[list[str], dict[str, Originals]]:
    """Cast every fp8-safe component (the denoisers, see footprint._fp8_ok) not in ``skip``.

    Returns the names cast and, where host RAM allows, a CPU copy of each one's original
    weights: casting cannot be undone in place, the copy is what makes it reversible."""
    cast, originals = [], {}
    budget = host_available
    for name, module in module_components(pipe).items():
        c = footprint.components.get(name)
        if c is None or not c.fp8_ok or name in skip or _diffusers.is_fp8_cast(module):
            continue
        if c.bytes * 1.2 < budget:
            originals[name] = _snapshot(module)
            budget -= c.bytes
        _diffusers.apply_fp8_casting(module, compute_dtype(module))
        cast.append(name)
    return cast, originals


def restore_original(module: torch.nn.Module, original: Originals) -> None:
    """Undo fp8 storage: drop the casting hooks and put the original tensors back."""
    _diffusers.remove_fp8_casting(module)
    live = module.state_dict(keep_vars=True)
    for key, tensor in original.items():
        target = live.get(key)
        if target is None:
            continue
        value = tensor.to(target.device)
        if isinstance(target, torch.nn.Parameter):
            target.data = value
        else:
            owner, _, leaf = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[leaf] = value
