"""fp8 layerwise casting: weights stored in float8_e4m3fn, computed in their own dtype. One-way."""

from __future__ import annotations

from typing import Any

import torch

from .. import _diffusers
from ..footprint import Footprint
from ..stages import module_components


def _compute_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def apply_fp8(pipe: Any, footprint: Footprint) -> list[str]:
    """Cast every fp8-safe component (the denoisers, see footprint._fp8_ok); returns the names cast."""
    cast = []
    for name, module in module_components(pipe).items():
        c = footprint.components.get(name)
        if c is None or not c.fp8_ok:
            continue
        if _diffusers.is_fp8_cast(module):
            continue
        _diffusers.apply_fp8_casting(module, _compute_dtype(module))
        cast.append(name)
    return cast
