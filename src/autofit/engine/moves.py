"""Per-call residency: the moves a plan makes around each stage (encoders onto the device for
encode and off after it, the rest off the device for decode, the VAE's inputs to the CPU), and
re-asserting where weights belong before each call."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from autofit import _diffusers
from autofit.facts.components import roles
from autofit._diffusers import module_components
from autofit.plan import Plan
from autofit.strategies import configure_vae
from autofit.strategies.placement import CPU, module_device, on_demand
from autofit.strategies.vae import spatial_factor

if TYPE_CHECKING:
    from autofit.engine.runtime import Runtime


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def enforce_residency(rt: Runtime, plan: Plan) -> None:
    """Undo per-call moves (weights moved off the device for decode) and re-assert plan
    invariants that diffusers may have reset (it re-hooks every component after each call)."""
    if plan.placement == "device":
        stage = roles(rt.pipe)
        for name, module in module_components(rt.pipe).items():
            here = module_device(module)
            if on_demand(stage[name], plan):
                if here not in (None, CPU):
                    rt.shadows.offload(module)
            elif here not in (None, rt.device):
                rt.shadows.onload(module)
    elif "vae_cpu" in plan.extras:
        for vae in rt.vaes.values():
            _diffusers.remove_component_hooks(vae)
            if module_device(vae) != CPU:
                vae.to(CPU)


def before(rt: Runtime, name: str, stage: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """Before a component of ``stage`` runs: the moves the plan in force makes for it."""
    plan, call, device = rt.state.plan, rt.state.call, rt.device
    module = rt.comps.get(name)
    if stage == "encode" and plan.placement == "device" and "offload_encoders" in plan.extras:
        if module is not None and module_device(module) != device:
            rt.shadows.onload(module)
        # Pipelines send the inputs to where the encoder was (diffusers asks the module for
        # its execution device): bring them along, as accelerate's hooks would.
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
    elif stage == "decode":
        z = args[0] if args else kwargs.get("z")
        vae = name in rt.vae_original
        if vae and isinstance(z, torch.Tensor) and z.dim() >= 4 and call is not None:
            call.shape = replace(call.shape, batch=int(z.shape[0]), latent_hw=(int(z.shape[-2]), int(z.shape[-1])))
        if vae:
            configure_vae(
                module,
                original=rt.vae_original[name],
                slicing="vae_slicing" in plan.extras,
                tiling=plan.tiling,
                latent_hw=call.shape.latent_hw if call else None,
            )
        if plan.placement == "device" and "offload_for_decode" in plan.extras:
            _others_off(rt)
        if "vae_cpu" in plan.extras:
            args, kwargs = _to_device(args, CPU), _to_device(kwargs, CPU)
    elif stage == "vae_encode":
        # The VAE's encoder: the decode rungs apply to it too (slicing, tiles sized to the image
        # being encoded, the other components off the device while it runs, the CPU).
        x = args[0] if args else kwargs.get("x")
        if name in rt.vae_original:
            hw = None
            if isinstance(x, torch.Tensor) and x.dim() >= 4:
                f = spatial_factor(module)
                hw = (max(int(x.shape[-2]) // f, 1), max(int(x.shape[-1]) // f, 1))
            configure_vae(module, original=rt.vae_original[name], slicing="vae_slicing" in plan.extras,
                          tiling=plan.tiling, latent_hw=hw)
        if plan.placement == "device" and "offload_for_decode" in plan.extras:
            _others_off(rt)
        if "vae_cpu" in plan.extras:
            args, kwargs = _to_device(args, CPU), _to_device(kwargs, CPU)
    return args, kwargs


def _others_off(rt: Runtime) -> None:
    """Everything but the decode-stage components (VAE, vocoder...) leaves the device."""
    stage = roles(rt.pipe)
    for other, m in rt.comps.items():
        if stage.get(other) != "decode" and module_device(m) == rt.device:
            rt.shadows.offload(m)


def after(rt: Runtime, name: str, stage: str) -> None:
    """After a component of ``stage`` produced its output."""
    plan = rt.state.plan
    if stage == "encode" and plan.placement == "device" and "offload_encoders" in plan.extras:
        module = rt.comps.get(name)
        if module is not None:
            rt.shadows.offload(module)
    elif stage == "vae_encode" and plan.placement == "device" and "offload_for_decode" in plan.extras:
        # The denoiser runs next: what left the device for the encoder comes back.
        stage_of = roles(rt.pipe)
        for other, m in rt.comps.items():
            if not on_demand(stage_of.get(other), plan) and module_device(m) not in (None, rt.device):
                rt.shadows.onload(m)
