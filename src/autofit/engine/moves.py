"""Per-call residency: the moves a plan makes around each stage (encoders onto the device for
encode and off after it, the rest off the device for decode, the VAE's inputs to the CPU), and
re-asserting where weights belong before each call. Owned by :class:`autofit.engine.placement.Placement`,
which hands it the plan in force and the pipeline's components."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from autofit import _diffusers
from autofit.facts.components import roles
from autofit._diffusers import module_components
from autofit.planning.context import Workload
from autofit.plan import Plan
from autofit.strategies import UserVae, configure_vae
from autofit.strategies.placement import CPU, module_device, on_demand
from autofit.strategies.residency import HostShadows
from autofit.strategies.vae import spatial_factor

Modules = dict[str, torch.nn.Module]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class Moves:
    def __init__(self, pipe: Any, device: torch.device, shadows: HostShadows, vae_original: dict[str, UserVae]):
        self._pipe, self._device, self._shadows, self._vae_original = pipe, device, shadows, vae_original

    def enforce_residency(self, plan: Plan, vaes: Modules) -> None:
        """Undo per-call moves (weights moved off the device for decode) and re-assert plan
        invariants that diffusers may have reset (it re-hooks every component after each call)."""
        if not plan.offloads:
            stage = roles(self._pipe)
            for name, module in module_components(self._pipe).items():
                here = module_device(module)
                if on_demand(stage[name], plan):
                    if here not in (None, CPU):
                        self._shadows.offload(module)
                elif here not in (None, self._device):
                    self._shadows.onload(module)
        elif plan.decode_on_cpu:
            for vae in vaes.values():
                _diffusers.remove_component_hooks(vae)
                if module_device(vae) != CPU:
                    vae.to(CPU)

    def before(self, plan: Plan, comps: Modules, shape: Workload | None, name: str, stage: str,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], Workload | None]:
        """Before a component of ``stage`` runs: the moves ``plan`` makes for it. Returns the
        arguments to call it with, and the call's shape (a decode learns the latent size)."""
        device = self._device
        module = comps.get(name)
        if stage == "encode" and not plan.offloads and plan.encoders_on_demand:
            if module is not None and module_device(module) != device:
                self._shadows.onload(module)
            # Pipelines send the inputs to where the encoder was (diffusers asks the module for
            # its execution device): bring them along, as accelerate's hooks would.
            args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        elif stage == "decode":
            z = args[0] if args else kwargs.get("z")
            vae = name in self._vae_original
            if vae and isinstance(z, torch.Tensor) and z.dim() >= 4 and shape is not None:
                shape = replace(shape, batch=int(z.shape[0]), latent_hw=(int(z.shape[-2]), int(z.shape[-1])))
            if vae:
                configure_vae(
                    module,
                    original=self._vae_original[name],
                    slicing=plan.decode_sliced,
                    tiling=plan.tiling,
                    latent_hw=shape.latent_hw if shape else None,
                )
            if not plan.offloads and plan.decode_alone:
                self._others_off(comps)
            if plan.decode_on_cpu:
                args, kwargs = _to_device(args, CPU), _to_device(kwargs, CPU)
        elif stage == "vae_encode":
            # The VAE's encoder: the decode rungs apply to it too (slicing, tiles sized to the image
            # being encoded, the other components off the device while it runs, the CPU).
            x = args[0] if args else kwargs.get("x")
            if name in self._vae_original:
                hw = None
                if isinstance(x, torch.Tensor) and x.dim() >= 4:
                    f = spatial_factor(module)
                    hw = (max(int(x.shape[-2]) // f, 1), max(int(x.shape[-1]) // f, 1))
                configure_vae(module, original=self._vae_original[name], slicing=plan.decode_sliced,
                              tiling=plan.tiling, latent_hw=hw)
            if not plan.offloads and plan.decode_alone:
                self._others_off(comps)
            if plan.decode_on_cpu:
                args, kwargs = _to_device(args, CPU), _to_device(kwargs, CPU)
        return args, kwargs, shape

    def _others_off(self, comps: Modules) -> None:
        """Everything but the decode-stage components (VAE, vocoder...) leaves the device."""
        stage = roles(self._pipe)
        for other, m in comps.items():
            if stage.get(other) != "decode" and module_device(m) == self._device:
                self._shadows.offload(m)

    def after(self, plan: Plan, comps: Modules, name: str, stage: str) -> None:
        """After a component of ``stage`` produced its output."""
        if stage == "encode" and not plan.offloads and plan.encoders_on_demand:
            module = comps.get(name)
            if module is not None:
                self._shadows.offload(module)
        elif stage == "vae_encode" and not plan.offloads and plan.decode_alone:
            # The denoiser runs next: what left the device for the encoder comes back.
            stage_of = roles(self._pipe)
            for other, m in comps.items():
                if not on_demand(stage_of.get(other), plan) and module_device(m) not in (None, self._device):
                    self._shadows.onload(m)
