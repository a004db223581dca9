"""VAE slicing and tiling, with a tile size that really tiles at the resolution being decoded.

Measured on an H200: SDXL's default tile (1024 px) does not tile a 1024x1024 image, so
``enable_tiling()`` alone saved nothing. The tile is chosen from the latent actually decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class VaeSettings:
    """The user's own VAE settings, restored whenever a plan no longer needs ours."""

    use_slicing: bool | None
    use_tiling: bool | None
    tile_sample_min_size: object
    tile_latent_min_size: object

    @classmethod
    def read(cls, vae: torch.nn.Module) -> "VaeSettings":
        return cls(
            getattr(vae, "use_slicing", None),
            getattr(vae, "use_tiling", None),
            getattr(vae, "tile_sample_min_size", None),
            getattr(vae, "tile_latent_min_size", None),
        )


def can_tile(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "use_tiling")


def can_slice(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "use_slicing")


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
    original: VaeSettings,
    slicing: bool,
    tiling: str | None,
    latent_hw: tuple[int, int] | None,
) -> None:
    if can_slice(vae):
        vae.use_slicing = bool(original.use_slicing) or slicing
    if not can_tile(vae):
        return
    if tiling is None:
        vae.use_tiling = original.use_tiling
        if original.tile_sample_min_size is not None:
            vae.tile_sample_min_size = original.tile_sample_min_size
            vae.tile_latent_min_size = original.tile_latent_min_size
        return
    vae.use_tiling = True
    if latent_hw is not None and hasattr(vae, "tile_latent_min_size"):
        latent = tile_latent(latent_hw, tiling)
        default = original.tile_latent_min_size
        if isinstance(default, int) and default < latent:
            latent = default
        vae.tile_latent_min_size = latent
        vae.tile_sample_min_size = latent * _scale(vae)
