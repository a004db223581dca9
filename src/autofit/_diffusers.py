"""Every touch of diffusers / accelerate internals lives here (hook registries, ``_hf_hook``,
private pipeline attributes), so a library upgrade breaks in one place."""

from __future__ import annotations

import os
from typing import Any

import torch

from .stages import module_components

# Functions that pin host memory: a CUDA "out of memory" raised in them is a host (page-locked
# memory) failure, not a device one. diffusers' group offloading pins in the first three;
# autofit's own reusable host buffers in the last.
PINNING_FUNCTIONS = frozenset({"_to_cpu", "_init_cpu_param_dict", "_pinned_memory_tensors", "_host_like"})

_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
_LAYERWISE_CASTING_HOOK = "layerwise_casting"


def group_offload_config(module: torch.nn.Module) -> Any | None:
    """The top-level group offloading config of ``module``, or None when it is not group offloaded."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            hook = registry.get_hook(_GROUP_HOOKS[0])
            if hook is not None:
                return hook.config
    return None


def has_accelerate_hooks(module: torch.nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def remove_group_offloading(module: torch.nn.Module) -> None:
    # Leaf-level offloading of a module without a registry of its own (e.g. a transformers text
    # encoder) leaves hooks on many submodules: visit every registry, not only the top one.
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            for name in _GROUP_HOOKS:
                registry.remove_hook(name, recurse=False)


def remove_offload_hooks(pipe: Any) -> None:
    """Remove accelerate hooks (model/sequential offload) and diffusers group offloading from every
    component. Layerwise casting hooks are kept: casting is one-way."""
    from accelerate.hooks import remove_hook_from_module

    for module in module_components(pipe).values():
        if has_accelerate_hooks(module):
            remove_hook_from_module(module, recurse=True)
        if group_offload_config(module) is not None:
            remove_group_offloading(module)
    if hasattr(pipe, "_all_hooks"):
        pipe._all_hooks = []


def remove_component_hooks(module: torch.nn.Module) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)


def detect_placement(pipe: Any) -> str | None:
    """The offloading the user already enabled on ``pipe``, as a placement name, or None."""
    for module in module_components(pipe).values():
        config = group_offload_config(module)
        if config is not None:
            kind = getattr(config.offload_type, "value", config.offload_type)
            if kind == "block_level":
                return "group_block"
            if config.stream is not None:
                return "group_leaf_lowmem" if config.low_cpu_mem_usage else "group_leaf_stream"
            return "group_leaf"
    if getattr(pipe, "_all_hooks", None):
        return "model_offload"
    if any(has_accelerate_hooks(m) for m in module_components(pipe).values()):
        return "sequential"
    return None


def is_fp8_cast(module: torch.nn.Module) -> bool:
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_LAYERWISE_CASTING_HOOK) is not None:
            return True
    return False


def apply_fp8_casting(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    if hasattr(module, "enable_layerwise_casting"):
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    else:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def remove_fp8_casting(module: torch.nn.Module) -> None:
    """Unhook layerwise casting. diffusers refuses to (its hook's deinitialisation raises, since
    the fp8 weights alone cannot be cast back losslessly); autofit restores the original weights
    from its own copy right after, so the hook's refusal is bypassed here."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            hook.deinitalize_hook = lambda m: m  # instance attribute: only this hook object
            registry.remove_hook(_LAYERWISE_CASTING_HOOK, recurse=False)


def source_folder(module: torch.nn.Module) -> str | None:
    """The folder ``from_pretrained`` loaded ``module`` from (diffusers and transformers both record
    it as ``_name_or_path`` in the config), or None for a module built in memory."""
    config = getattr(module, "config", None)
    if isinstance(config, dict):
        path = config.get("_name_or_path")
    else:
        path = getattr(config, "_name_or_path", None)
    if isinstance(path, os.PathLike):  # from_pretrained(Path(...)) records the Path itself
        path = os.fspath(path)
    return path if isinstance(path, str) and path else None


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The from_pretrained keyword for a dtype: ``dtype`` where diffusers has it (``torch_dtype``
    warns there), ``torch_dtype`` on releases before it."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
