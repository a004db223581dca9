"""Measured weight sizes of a pipeline's components (the guide's S_total, S_max, S_block, S_leaf,
and the sizes after fp8 layerwise casting), read from the loaded modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .stages import module_components, role_of

# Module types fp8 layerwise casting really casts (diffusers' SUPPORTED_PYTORCH_LAYERS), and the
# name patterns it skips by default (norms, embeddings, in/out projections).
_CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
             torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
# Encoders that cast activations to the weight dtype inside forward: fp8 storage breaks them
# (measured on an H200: "expected mat1 and mat2 to have the same dtype ... Float8_e4m3fn").
FP8_INCOMPATIBLE = ("T5EncoderModel", "UMT5EncoderModel", "T5Model", "MT5EncoderModel")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True, slots=True)
class ComponentFootprint:
    name: str
    role: str | None
    class_name: str
    bytes: int
    leaf_bytes: int  # largest single leaf module (S_leaf)
    block_bytes: int  # largest block of a top-level ModuleList (S_block); the whole module if none
    cast_bytes: int  # size after fp8 layerwise casting (S_lc), castable or not
    fp8_ok: bool


@dataclass(frozen=True, slots=True)
class Footprint:
    components: dict[str, ComponentFootprint] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components.values())

    @property
    def largest(self) -> int:
        return max((c.bytes for c in self.components.values()), default=0)

    def by_role(self, role: str) -> list[ComponentFootprint]:
        return [c for c in self.components.values() if c.role == role]


def _own_bytes(module: torch.nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in module.parameters(recurse=False)) + sum(
        _tensor_bytes(b) for b in module.buffers(recurse=False)
    )


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in module.parameters()) + sum(_tensor_bytes(b) for b in module.buffers())


def measure_component(name: str, module: torch.nn.Module) -> ComponentFootprint:
    total = _module_bytes(module)
    leaf = max((_own_bytes(m) for m in module.modules()), default=0)
    blocks = [
        _module_bytes(block)
        for child in module.children()
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
        for block in child
    ]
    saved = 0
    for sub_name, sub in module.named_modules():
        if not isinstance(sub, _CASTABLE):
            continue
        leaf_name = sub_name.rsplit(".", 1)[-1]
        if any(re.search(p, sub_name) or re.search(p, leaf_name) for p in _SKIP_PATTERNS):
            continue
        for p in sub.parameters(recurse=False):
            if p.is_floating_point() and p.element_size() > 1:
                saved += p.numel() * (p.element_size() - 1)
    cls = type(module).__name__
    return ComponentFootprint(
        name=name,
        role=role_of(name),
        class_name=cls,
        bytes=total,
        leaf_bytes=leaf,
        block_bytes=max(blocks) if blocks else total,
        cast_bytes=total - saved,
        fp8_ok=cls not in FP8_INCOMPATIBLE and saved > 0,
    )


def measure(pipe: Any) -> Footprint:
    return Footprint({n: measure_component(n, m) for n, m in module_components(pipe).items()})
