"""Every touch of the private parts of diffusers, accelerate, bitsandbytes and torch lives here
(hook registries, ``_hf_hook``, private model and pipeline attributes, layerwise casting's
constants, group offloading's pinning functions, AutoencoderKL's tile attributes, bitsandbytes'
LLM.int8 state, torch's host allocator), so a library upgrade breaks in one place;
tests/test_diffusers_touches.py checks each against the installed releases.

diffusers, accelerate and bitsandbytes are imported where first needed: ``import autofit`` stays
light, and a missing optional library fails only the feature that needs it."""

from __future__ import annotations

import functools
import inspect
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any

import torch

from autofit.plan import placement_of, placing


# diffusers' group offloading pins host memory in these ModuleGroup methods: a CUDA "out of
# memory" raised in them is a host (page-locked memory) failure, not a device one.
_PINNING_METHODS = ("_to_cpu", "_init_cpu_param_dict", "_pinned_memory_tensors")

# Copies of diffusers' layerwise casting constants, used only where diffusers does not have them.
_FALLBACK_CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                      torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_FALLBACK_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


@functools.lru_cache(maxsize=1)
def pinning_code() -> frozenset[CodeType]:
    """The code objects of diffusers' functions that pin host memory (empty where diffusers
    has none of them). Matched by identity, so a renamed function of ours changes nothing."""
    try:
        from diffusers.hooks.group_offloading import ModuleGroup
    except Exception:  # no group offloading in this diffusers: nothing of its pins memory
        return frozenset()
    out = set()
    for name in _PINNING_METHODS:
        fn = inspect.getattr_static(ModuleGroup, name, None)
        fn = getattr(fn, "__func__", fn)  # staticmethod
        fn = inspect.unwrap(fn) if fn is not None else None  # @contextmanager
        if fn is not None and hasattr(fn, "__code__"):
            todo = [fn.__code__]
            while todo:  # with the comprehensions inside (their own frames before Python 3.12)
                code = todo.pop()
                out.add(code)
                todo.extend(c for c in code.co_consts if isinstance(c, CodeType))
    return frozenset(out)


@functools.lru_cache(maxsize=1)
def layerwise_casting_defaults() -> tuple[tuple[type, ...], tuple[str, ...]]:
    """(module types fp8 layerwise casting casts, name patterns it skips by default), as the
    installed diffusers has them."""
    try:
        from diffusers.hooks import layerwise_casting as lc
    except Exception:
        return _FALLBACK_CASTABLE, _FALLBACK_SKIP_PATTERNS
    layers = getattr(lc, "_GO_LC_SUPPORTED_PYTORCH_LAYERS", None) or getattr(lc, "SUPPORTED_PYTORCH_LAYERS", None)
    patterns = getattr(lc, "DEFAULT_SKIP_MODULES_PATTERN", None)
    return (tuple(layers) if layers else _FALLBACK_CASTABLE,
            tuple(patterns) if patterns else _FALLBACK_SKIP_PATTERNS)


def model_fp8_skip_patterns(model: "torch.nn.Module | type | None") -> tuple[str, ...]:
    """The patterns a diffusers model (or model class) adds to layerwise casting's skips: the
    modules it keeps in fp32 and its own skip patterns."""
    return (tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
            + tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ()))


@functools.lru_cache(maxsize=64)
def model_class(class_name: str) -> type | None:
    """The diffusers model class named in a model_index.json, without building it."""
    try:
        import diffusers

        # A name diffusers does not export (a transformers text encoder) would make its lazy
        # module search every submodule (~9 s): look it up only when diffusers lists it.
        if class_name not in dir(diffusers):
            return None
        return getattr(diffusers, class_name, None)
    except Exception:  # a broken diffusers install must not break `autofit plan`
        return None

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


def disk_groups(module: torch.nn.Module) -> list[Any]:
    """The group-offloading groups of ``module`` that keep their weights in files on disk."""
    groups = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_HOOKS[0]) if registry is not None else None
        group = getattr(hook, "group", None)
        if group is not None and getattr(group, "offload_to_disk_path", None):
            groups[id(group)] = group
    return list(groups.values())


def disk_offload_folders(module: torch.nn.Module) -> set[str]:
    return {g.offload_to_disk_path for g in disk_groups(module)}


def hold_disk_groups(module: torch.nn.Module, skew: dict[int, int] | None = None) -> None:
    """Keep the file of each of ``module``'s disk-offloaded groups open, and read its weights from
    that descriptor into fresh tensors from now on (``autofit.disk.HeldFile``), aligned as each
    weight was before it was offloaded: ``skew`` maps ``id(tensor)`` to the bytes its data
    started past a 64-byte boundary (absent: 0, the allocator's alignment).

    diffusers reads a group back by its file's name with ``safetensors.load_file``: a removed
    file fails every later call, and the tensors it returns view one buffer at the file's
    offsets (other kernels run on the CPU there, and the output differs in the last bits).
    Groups that stream (a CUDA side stream) keep diffusers' own reads."""
    from autofit import disk

    for group in disk_groups(module):
        if getattr(group, "stream", None) is not None or getattr(group, "_autofit_file", None) is not None:
            continue
        try:
            held = disk.HeldFile(group.safetensors_file_path)
        except FileNotFoundError:  # removed in the moment between diffusers' write and this open
            raise disk.OffloadUnreadable(f"{group.safetensors_file_path} was removed as soon as diffusers wrote it, "
                                         f"before autofit could hold it: the weights of {type(module).__name__} "
                                         "in it are lost; reload the pipeline") from None
        try:
            _check_held(group, held)
        except BaseException:
            held.close()
            raise
        group._autofit_file = held
        group._autofit_skew = {key: (skew or {}).get(id(t), 0) for key, t in group.key_to_tensor.items()}
        ref = weakref.ref(group)  # no cycle through the group's own dict
        group._onload_from_disk = lambda ref=ref: _onload_held(ref())


def _check_held(group: Any, held: Any) -> None:
    from autofit.disk import OffloadUnreadable

    if set(held.index) != set(group.key_to_tensor):
        raise OffloadUnreadable(f"{held.path} does not hold the tensors of its group (replaced since it was written?)")
    for key, tensor in group.key_to_tensor.items():
        dtype, shape = held.index[key][:2]
        if dtype != tensor.dtype or shape != tuple(tensor.shape):
            raise OffloadUnreadable(f"{held.path}: {key} is {dtype} {list(shape)} in the file, {tensor.dtype} "
                                    f"{list(tensor.shape)} in the module (replaced since it was written?)")


def _onload_held(group: Any) -> None:
    """ModuleGroup._onload_from_disk without a stream, from the held file."""
    loaded = group._autofit_file.read(group._autofit_skew)
    for key, tensor in group.key_to_tensor.items():
        tensor.data = loaded[key].to(group.onload_device)


def restore_disk_groups(module: torch.nn.Module) -> int:
    """Read the weights of disk-offloaded groups back into host RAM; returns the bytes read.

    Offloaded to disk, a group's tensors are placeholders (``torch.empty_like``) and its weights
    live only in its safetensors file: removing the hooks as they are would leave the module with
    uninitialised weights. diffusers does not read them back on removal. A file autofit holds is
    read through its descriptor (removed files included) and closed; the user's own files are
    read by name. Either way into fresh, aligned tensors; a file that cannot be read raises
    ``autofit.disk.OffloadUnreadable`` (the module is never left with placeholders silently)."""
    from autofit import disk

    read = 0
    for group in disk_groups(module):
        held = getattr(group, "_autofit_file", None)
        if getattr(group, "_is_offloaded_to_disk", False) and not any(
                t.device != group.offload_device for t in group.key_to_tensor.values()):  # onloaded: live ones hold them
            if held is not None:
                loaded = held.read(group._autofit_skew)
            else:
                try:
                    source = disk.HeldFile(group.safetensors_file_path)
                except FileNotFoundError:
                    raise disk.OffloadUnreadable(
                        f"{group.safetensors_file_path} is gone, and with it the only copy of weights of "
                        f"{type(module).__name__} (diffusers left placeholders in the module): reload the "
                        "pipeline") from None
                try:
                    loaded = source.read()
                finally:
                    source.close()
            for key, tensor in group.key_to_tensor.items():
                tensor.data = loaded[key]
                read += loaded[key].numel() * loaded[key].element_size()
            group._is_offloaded_to_disk = False
        if held is not None:
            held.close()
            del group._autofit_file, group._autofit_skew, group._onload_from_disk
    return read


def remove_group_offloading(module: torch.nn.Module) -> None:
    restore_disk_groups(module)
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
    if callable(getattr(pipe, "remove_all_hooks", None)):
        pipe.remove_all_hooks()  # hooks on the components themselves, and the pipeline's list of them
    for module in module_components(pipe).values():
        if has_accelerate_hooks(module):  # hooks below a component (what remove_all_hooks misses)
            remove_component_hooks(module)
        if group_offload_config(module) is not None:
            remove_group_offloading(module)


def remove_component_hooks(module: torch.nn.Module) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)


def detect_placement(pipe: Any) -> str | None:
    """The offloading the user already enabled on ``pipe``, as a placement name, or None."""
    for module in module_components(pipe).values():
        config = group_offload_config(module)
        if config is not None:
            kind = getattr(config.offload_type, "value", config.offload_type)
            if getattr(config, "offload_to_disk_path", None):
                return placement_of("group", disk=True)
            if kind == "block_level":
                return placement_of("group", group="block", disk=False)
            if config.stream is not None:
                return placement_of("group", group="leaf", stream=True, lowmem=bool(config.low_cpu_mem_usage))
            return placement_of("group", group="leaf", stream=False)
    if getattr(pipe, "_all_hooks", None):
        return placement_of("component")
    hooked = [m for m in module_components(pipe).values() if has_accelerate_hooks(m)]
    if hooked and all(_model_offload_hook(m) for m in hooked):
        # Model offload hooks this pipeline does not own: another pipeline sharing the components
        # (``from_pipe``, ``Pipeline(**proxy.components)``) placed them. Nothing of the user's to keep.
        return None
    if hooked:
        return placement_of("layer")
    return None


def _model_offload_hook(module: torch.nn.Module) -> bool:
    """True when ``module`` carries only a model-offload hook (accelerate's ``CpuOffload`` on the
    module itself), as ``enable_model_cpu_offload`` leaves it; sequential offload hooks submodules."""
    from accelerate.hooks import CpuOffload

    if not isinstance(getattr(module, "_hf_hook", None), CpuOffload):
        return False
    return not any(hasattr(sub, "_hf_hook") for name, sub in module.named_modules() if name)


def placement_intact(pipe: Any, placement: str) -> bool:
    """Whether the offloading autofit applied is still on the components: another pipeline that
    shares them (made with ``from_pipe``) or the user may have taken it down since."""
    comps = module_components(pipe).values()
    terms = placing(placement)
    if terms.accelerate_hooks:
        return any(has_accelerate_hooks(m) for m in comps)
    if terms.group:
        return any(group_offload_config(m) is not None for m in comps)
    return True  # everything on the device: the runtime re-asserts residency at every call


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


@contextmanager
def new_layers_in_compute_dtype(module: torch.nn.Module) -> Iterator[None]:
    """While a LoRA is loaded into an fp8-cast module: peft makes each adapter in its base layer's
    dtype (fp8, which would round the LoRA's weights) unless the base layer states a
    ``compute_dtype``, as bitsandbytes layers do. The cast layers state it for the load."""
    marked = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None and not hasattr(sub, "compute_dtype"):
            sub.compute_dtype = hook.compute_dtype
            marked.append(sub)
    try:
        yield
    finally:
        for sub in marked:
            del sub.compute_dtype


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


# ---- VAE slicing and tiling (AutoencoderKL and kin keep them as plain attributes) ---------------
def vae_settings(vae: torch.nn.Module) -> tuple[Any, Any, Any, Any]:
    """(use_slicing, use_tiling, tile_sample_min_size, tile_latent_min_size); None where absent."""
    return (getattr(vae, "use_slicing", None), getattr(vae, "use_tiling", None),
            getattr(vae, "tile_sample_min_size", None), getattr(vae, "tile_latent_min_size", None))


def set_vae_slicing(vae: torch.nn.Module, on: bool) -> None:
    vae.use_slicing = on


def set_vae_tiling(vae: torch.nn.Module, on: Any, *, latent_min: Any = None, sample_min: Any = None) -> None:
    """Turn tiling on or off; with tile sizes, tile at them (diffusers' enable_tiling takes none
    on every VAE, and its default tile does not tile at the size being decoded)."""
    vae.use_tiling = on
    if latent_min is not None:
        vae.tile_latent_min_size = latent_min
        vae.tile_sample_min_size = sample_min


def can_set_tile_size(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "tile_latent_min_size")


# ---- bitsandbytes: the LLM.int8 state kept beside the weight ------------------------------------
def int8_state_follow_weight(layer: torch.nn.Module) -> None:
    """Point an LLM.int8 layer's quantization state (``weight.CB/SCB``, ``state.CB/SCB``) at the
    weight's current storage and device, and drop the last call's outlier columns."""
    w = layer.weight
    if w.dtype != torch.int8:
        return
    state = layer.state
    if getattr(w, "CB", None) is not None:
        w.CB = w.data
    if getattr(w, "SCB", None) is not None:
        w.SCB = w.SCB.to(w.device)
    if state.CB is not None:
        state.CB = w.data
    if state.SCB is not None:
        state.SCB = state.SCB.to(w.device)
    state.idx = None  # rewritten by the next forward


# ---- torch -------------------------------------------------------------------------------------
def tensor_tables(module: torch.nn.Module) -> tuple[dict, dict]:
    """A module's own parameter and buffer tables. Rewriting an entry swaps the tensor a module
    holds without ``.to()`` (which would move everything) or ``register_*`` (which refuses a
    Parameter in place of a buffer and the reverse)."""
    return module._parameters, module._buffers


def empty_host_cache() -> None:
    """Return the pinned blocks torch's host allocator caches to the OS (``torch.accelerator``'s
    public call where this torch has it, the private one before)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is None:
        empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are torch modules, by name (``pipe.components`` holds
    tokenizers and schedulers too)."""
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
