"""fp8 layerwise casting: weights stored in float8_e4m3fn, computed in their own dtype. One-way."""

from __future__ import annotations

from typing import Any

import torch

from autofit import _diffusers
from autofit.facts.checkpoint import Checkpoint
from autofit.facts.footprint import Footprint, fp8_cast_params
from autofit._diffusers import module_components


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a component computes in: that of its first floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class FromCheckpoint:
    """The original tensors of a cast component, read back from the checkpoint they were compared with."""

    def __init__(self, source: Checkpoint, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.source, self.layout = source, layout  # key -> (dtype, stride) before the cast

    def check(self) -> None:
        """Raise CheckpointChanged if a file changed or vanished since the comparison."""
        self.source.check_unchanged(self.layout)

    def items(self):
        self.check()
        for key, (dtype, stride) in self.layout.items():
            yield key, self.source.load(key, dtype, stride)


Originals = dict[str, torch.Tensor] | FromCheckpoint


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter and buffer, to undo the cast if the component breaks."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict(keep_vars=True).items()}


def _backed(module: torch.nn.Module) -> FromCheckpoint | None:
    """The checkpoint as the undo copy, if every tensor the cast changes equals its file."""
    source = Checkpoint.of(module)
    params = fp8_cast_params(module)
    if source is None or not params:
        return None
    try:
        if all(source.same(k, p) for k, p in params):  # same() counts an unreadable entry as different
            return FromCheckpoint(source, {k: (p.dtype, p.stride()) for k, p in params})
        return None
    finally:
        source.drop_scratch()  # kept with the undo copy otherwise


def held_bytes(original: Originals | None) -> int:
    """Host bytes an undo copy holds (none when it is read back from the checkpoint)."""
    if not isinstance(original, dict):
        return 0
    return sum(t.numel() * t.element_size() for t in original.values())


def apply_fp8(
    pipe: Any, footprint: Footprint, *, skip: frozenset[str] = frozenset(), host_available: int = 0
) -> tuple[list[str], dict[str, Originals]]:
    """Cast every fp8-safe component (the denoisers, see footprint._fp8_ok) not in ``skip``.

    Returns the names cast and each one's undo copy: casting cannot be undone in place. The copy
    is the checkpoint the component was loaded from where its weights equal it, else a CPU copy
    where host RAM allows; a component with neither cannot be uncast."""
    cast: list[str] = []
    originals: dict[str, Originals] = {}
    budget = host_available
    for name, module in module_components(pipe).items():
        c = footprint.components.get(name)
        if c is None or not c.fp8_ok or name in skip or _diffusers.is_fp8_cast(module):
            continue
        backed = _backed(module) if c.restorable else None
        if backed is not None:
            originals[name] = backed
        elif c.bytes * 1.2 < budget:
            originals[name] = _snapshot(module)
            budget -= c.bytes
        _diffusers.apply_fp8_casting(module, compute_dtype(module))
        if backed is not None:
            fp8 = {k for k, v in module.state_dict().items() if v.dtype == torch.float8_e4m3fn}
            if not fp8 <= backed.layout.keys():  # diffusers cast more than it used to: no full copy
                del originals[name]
        cast.append(name)
    return cast, originals


def restore_original(module: torch.nn.Module, original: Originals) -> None:
    """Undo fp8 storage: drop the casting hooks and put the original tensors back. A checkpoint
    changed or gone since the comparison is refused first, leaving the component cast and
    working; then the tensors are read one at a time (never all of them beside the fp8 copy)."""
    if isinstance(original, FromCheckpoint):
        original.check()
    _diffusers.remove_fp8_casting(module)
    live = module.state_dict(keep_vars=True)
    # A LoRA loaded after the cast (peft) put each layer it wraps under ``base_layer``: the
    # original ``to_q.weight`` is ``to_q.base_layer.weight`` now.
    where = {k: k for k in live}
    for k in live:
        if "base_layer." in k:
            where.setdefault(("." + k).replace(".base_layer.", ".")[1:], k)
    for key, tensor in original.items():
        key = where.get(key, key)
        target = live.get(key)
        if target is None:
            continue
        value = tensor.to(target.device)
        if isinstance(target, torch.nn.Parameter):
            target.data = value
        else:
            owner, _, leaf = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            _diffusers.tensor_tables(sub)[1][leaf] = value
