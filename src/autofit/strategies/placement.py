"""Where the weights live: everything on the device, or one of the offloading schemes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from autofit import _diffusers, disk
from autofit.facts.memory import release_pinned_cache
from autofit.strategies import partial
from autofit.plan import Plan
from autofit.facts.components import roles
from autofit._diffusers import module_components
from autofit.strategies.quantize import quantized_level

CPU = torch.device("cpu")


def module_device(module: torch.nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


def _all_on(module: torch.nn.Module, device: torch.device) -> bool:
    # Not only the first parameter: a component quantized layer by layer on the device has its
    # quantized layers there and its norms and embeddings still on the CPU.
    return all(p.device == device for p in module.parameters())


def tear_down(pipe: Any) -> None:
    """Back to a consistent state: no offload hooks, every weight on the CPU. Also mends a
    half-moved pipeline left by a weight move that ran out of memory. Weights offloaded to disk
    are read back first, and autofit's offload folder removed."""
    comps = module_components(pipe)
    partial.remove(comps)
    folders = set().union(*(_diffusers.disk_offload_folders(m) for m in comps.values()))
    _diffusers.remove_offload_hooks(pipe)  # reads disk-offloaded weights back into host RAM
    for module in comps.values():
        module.to(CPU)
    disk.remove(folders)


def unpin(pipe: Any, *, is_pinned=None) -> int:
    """Give weights left in pinned host memory pageable storage again; returns the bytes moved.

    Streamed group offload points every weight at a pinned copy, and removing its hooks leaves
    them there. A plan that keeps weights in host RAM would then hold them page-locked, in blocks
    rounded up to a power of two (1.3-1.5x the weights), so a switch meant to save host RAM
    saved none. The pinned blocks are released as the copies are made, so the host holds at
    most ~1 GiB of both at once. ``is_pinned`` is for tests (pinning needs CUDA)."""
    check = is_pinned or (lambda t: t.is_pinned())
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original kept alive, copy)
    moved = pending = 0
    for table, name, t in _table_entries(pipe):
        # Plain tensors only: quantized subclasses stay on the device under group offload.
        if t.device.type != "cpu" or type(t) not in (torch.Tensor, torch.nn.Parameter):
            continue
        if id(t) not in done:
            if not check(t):
                continue
            copy = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
            copy.copy_(t.detach())
            done[id(t)] = (t, copy)  # holding t: its id cannot be reused meanwhile
            moved += t.numel() * t.element_size()
            pending += t.numel() * t.element_size()
        if isinstance(t, torch.nn.Parameter):
            t.data = done[id(t)][1]  # the same Parameter object: ties hold
        else:
            table[name] = done[id(t)][1]
        if pending >= 1 << 30:
            release_pinned_cache()
            pending = 0
    if moved:
        release_pinned_cache()
    return moved


def _table_entries(pipe: Any):
    """(table, name, tensor) for every parameter and buffer entry of the pipeline's modules, a
    tensor held in two places once per place (each entry is rewritten)."""
    for module in module_components(pipe).values():
        for sub in module.modules():
            for table in _diffusers.tensor_tables(sub):
                for name, t in table.items():
                    if t is not None:
                        yield table, name, t


def on_demand(role: str | None, plan: Plan) -> bool:
    """Components (of stage ``role``) that live on the CPU under the ``device`` placement."""
    return plan.on_cpu(role)


def _disk_offload(comps: dict[str, torch.nn.Module], device: torch.device, *, skip: set[str]) -> None:
    """Block-level group offload whose offloaded blocks live in files (``autofit.disk``), one
    folder per component, each file held open while the placement lasts; the skipped components
    (the VAE, quantized ones) go to the device."""
    from diffusers.hooks import apply_group_offloading

    folder = disk.new_folder()
    disk.track(folder, {n: m for n, m in comps.items() if n not in skip})
    for name, module in comps.items():
        if name in skip:
            module.to(device)
            continue
        kwargs: dict[str, Any] = dict(onload_device=device, offload_device=CPU, offload_type="block_level",
                                      num_blocks_per_group=1, offload_to_disk_path=str(folder / name))
        skew = _skew(module)
        if hasattr(module, "enable_group_offload"):
            module.enable_group_offload(**kwargs)
        else:
            apply_group_offloading(module=module, **kwargs)
        # Its files open from now on: read through the descriptor into tensors aligned as the
        # weights were, and readable still when a cleaner removes them.
        _diffusers.hold_disk_groups(module, skew)


def _skew(module: torch.nn.Module) -> dict[int, int]:
    """id(tensor) -> bytes its data starts past a 64-byte boundary, for the host tensors not on
    one: weights mapped from a checkpoint on the CPU sit at the file's offsets. Read back from
    disk at the same place, they run the same kernels as before (identical outputs)."""
    out = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu" and t.data_ptr() % 64:
            out[id(t)] = t.data_ptr() % 64
    return out


# How each placement scheme (autofit.plan.Placing.scheme, in the placement's row) is applied to a
# torn-down pipeline; ``tear_down`` undoes every one of them. A new scheme registers here.
Apply = Callable[[Any, dict[str, torch.nn.Module], Plan, torch.device, "Layout"], None]
SCHEMES: dict[str, Apply] = {}


@dataclass(frozen=True, slots=True)
class Layout:
    """What every scheme is told: the pipeline's VAE components, the quantized components kept
    on the device (under group offload), and whether to move components already in place."""

    vae: list[str]
    keep: set[str]
    force: bool


def scheme(name: str) -> Callable[[Apply], Apply]:
    def register(fn: Apply) -> Apply:
        SCHEMES[name] = fn
        return fn

    return register


@scheme("none")
def _on_device(pipe: Any, comps: dict[str, torch.nn.Module], plan: Plan, device: torch.device, at: Layout) -> None:
    stage = roles(pipe)
    for name, module in comps.items():
        target = CPU if on_demand(stage[name], plan) else device
        if at.force or not _all_on(module, target):
            module.to(target)


@scheme("partial")
def _partial(pipe: Any, comps: dict[str, torch.nn.Module], plan: Plan, device: torch.device, at: Layout) -> None:
    streamed = partial.apply(comps, device, plan.resident or 0)
    for name, module in comps.items():
        if name not in streamed:
            module.to(device)


@scheme("component")
def _model_offload(pipe: Any, comps: dict[str, torch.nn.Module], plan: Plan, device: torch.device, at: Layout) -> None:
    pipe.enable_model_cpu_offload(device=device)


@scheme("layer")
def _sequential(pipe: Any, comps: dict[str, torch.nn.Module], plan: Plan, device: torch.device, at: Layout) -> None:
    pipe.enable_sequential_cpu_offload(device=device)


@scheme("group")
def _group_offload(pipe: Any, comps: dict[str, torch.nn.Module], plan: Plan, device: torch.device, at: Layout) -> None:
    terms = plan.placing
    if terms.disk:
        _disk_offload(comps, device, skip=set(at.vae) | at.keep)
        return
    kwargs: dict[str, Any] = dict(onload_device=device, offload_device=CPU, exclude_modules=at.vae + sorted(at.keep))
    if terms.group == "block":
        kwargs.update(offload_type="block_level", num_blocks_per_group=1)
    else:
        kwargs.update(offload_type="leaf_level")
    if terms.stream:
        kwargs.update(use_stream=True, low_cpu_mem_usage=terms.lowmem)
    pipe.enable_group_offload(**kwargs)


def place(pipe: Any, plan: Plan, device: torch.device, *, force: bool = False) -> None:
    """Apply ``plan``'s placement to a torn-down pipeline (or top up a ``device`` placement).

    ``force`` calls ``.to()`` on every component even where it already sits: the first placement
    of a pipeline goes through the same move a real load would (and can fail like one)."""
    comps = module_components(pipe)
    # Partial residency has no diffusers/accelerate hooks, so a switch may come here without a
    # tear_down: its streamed weights go back to pageable memory first (resident ones stay put).
    partial.remove(comps)
    stage = roles(pipe)
    vae_names = [n for n in comps if stage[n] == "decode"]
    terms = plan.placing
    # Quantized components stay on the device under group offloading (see cost.kept_on_device).
    keep = {n for n, m in comps.items() if terms.scheme == "group" and quantized_level(m)}
    for name in keep:
        comps[name].to(device)
    SCHEMES[terms.scheme](pipe, comps, plan, device, Layout(vae_names, keep, force))
    if not terms.offloads:
        return
    if plan.decode_on_cpu:
        for name in vae_names:
            _diffusers.remove_component_hooks(comps[name])
            comps[name].to(CPU)
