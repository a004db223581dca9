"""VAE slicing and tiling, with a tile size that really tiles at the resolution being decoded.

Measured on an H200: SDXL's default tile (1024 px) does not tile a 1024x1024 image, so
``enable_tiling()`` alone saved nothing. The tile is chosen from the latent actually decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autofit import _diffusers


@dataclass(frozen=True, slots=True)
class VaeSettings:
    """The user's own VAE settings, restored whenever a plan no longer needs ours."""

    use_slicing: bool | None
    use_tiling: bool | None
    tile_sample_min_size: object
    tile_latent_min_size: object

    @classmethod
    def read(cls, vae: torch.nn.Module) -> "VaeSettings":
        return cls(*_diffusers.vae_settings(vae))


class UserVae:
    """The user's VAE settings, kept up to date: a change the user makes after wrapping
    (``proxy.vae.enable_tiling()``) is adopted as the new starting point, not undone at the next
    decode. A change is anything that differs from what autofit itself last set."""

    def __init__(self, vae: torch.nn.Module):
        self.settings = VaeSettings.read(vae)
        self._ours = self.settings  # what the VAE had when autofit last looked or set it

    def current(self, vae: torch.nn.Module) -> VaeSettings:
        now = VaeSettings.read(vae)
        if now != self._ours:
            self.settings = now  # set by the user since autofit last touched it
        return self.settings

    def record(self, vae: torch.nn.Module) -> None:
        self._ours = VaeSettings.read(vae)


def can_tile(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "use_tiling")


def can_slice(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "use_slicing")


def spatial_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel along a side."""
    return _scale(vae)


def _scale(vae: torch.nn.Module) -> int:
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None) or (0,)
    return 2 ** (len(channels) - 1)


def tile_latent(latent_hw: tuple[int, int], tiling: str) -> int:
    """Latent tile edge: half the shorter side (a quarter for small tiles), so it really tiles."""
    side = min(latent_hw)
    return max(side // (2 if tiling == "normal" else 4), 4)


def configure_vae(
    vae: torch.nn.Module,
    *,
    original: UserVae,
    slicing: bool,
    tiling: str | None,
    latent_hw: tuple[int, int] | None,
) -> None:
    """Set slicing and tiling for a plan on top of the user's own settings (which win where they
    ask for more: a user's tiling stays on under a plan without it)."""
    user = original.current(vae)
    try:
        _configure(vae, user, slicing, tiling, latent_hw)
    finally:
        original.record(vae)


def _configure(
    vae: torch.nn.Module, original: VaeSettings, slicing: bool, tiling: str | None, latent_hw: tuple[int, int] | None
) -> None:
    if can_slice(vae):
        _diffusers.set_vae_slicing(vae, bool(original.use_slicing) or slicing)
    if not can_tile(vae):
        return
    if tiling is None:
        restore = original.tile_sample_min_size is not None
        _diffusers.set_vae_tiling(vae, original.use_tiling, latent_min=original.tile_latent_min_size if restore else None,
                                  sample_min=original.tile_sample_min_size)
        return
    if latent_hw is not None and _diffusers.can_set_tile_size(vae):
        latent = tile_latent(latent_hw, tiling)
        default = original.tile_latent_min_size
        if isinstance(default, int) and default < latent:
            latent = default
        _diffusers.set_vae_tiling(vae, True, latent_min=latent, sample_min=latent * _scale(vae))
    else:
        _diffusers.set_vae_tiling(vae, True)
