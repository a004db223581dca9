"""Each private touch of diffusers, accelerate and torch in autofit._diffusers works against the
installed releases: a library upgrade that moves one fails here, by name."""

import torch

from autofit import _diffusers
from autofit.facts.footprint import fp8_cast_params
from autofit.plan import Plan
from autofit.strategies import place
from autofit.testing import tiny_sdxl


def test_each_pinning_function_of_group_offloading_exists():
    """diffusers' group offloading still pins in the three methods autofit classifies by."""
    from diffusers.hooks.group_offloading import ModuleGroup

    for name in _diffusers._PINNING_METHODS:
        assert hasattr(ModuleGroup, name), f"diffusers' ModuleGroup has no {name} any more"
    names = {c.co_name for c in _diffusers.pinning_code()}
    assert set(_diffusers._PINNING_METHODS) <= names


def test_layerwise_casting_constants_come_from_diffusers():
    """The castable layers and skip patterns are diffusers' own, not autofit's fallback copy."""
    from diffusers.hooks import layerwise_casting as lc

    layers, patterns = _diffusers.layerwise_casting_defaults()
    assert patterns == tuple(lc.DEFAULT_SKIP_MODULES_PATTERN)
    assert torch.nn.Linear in layers and torch.nn.Conv2d in layers


def test_fp8_cast_params_are_the_ones_diffusers_casts():
    """The parameters autofit predicts fp8 casting stores in fp8 are exactly those diffusers'
    enable_layerwise_casting stores in fp8 (the model's own skip patterns included)."""
    unet = tiny_sdxl().unet
    predicted = {name for name, _ in fp8_cast_params(unet)}
    _diffusers.apply_fp8_casting(unet, torch.float32)
    cast = {name for name, p in unet.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert predicted and predicted == cast


def test_offload_hooks_are_removed_with_the_pipelines_own_method():
    """After model offload, no accelerate hook is left and the pipeline forgets its hook list."""
    pipe = tiny_sdxl()
    place(pipe, Plan("model_offload"), torch.device("cpu"))
    assert _diffusers.detect_placement(pipe) == "model_offload"
    _diffusers.remove_offload_hooks(pipe)
    assert _diffusers.detect_placement(pipe) is None
    assert not pipe._all_hooks


def test_vae_tile_size_drives_diffusers_tiling():
    """The tile attributes autofit writes are the ones AutoencoderKL tiles by: a small tile
    changes the decoded image (tiles blended), the untiled decode does not."""
    vae = tiny_sdxl().vae
    z = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z).sample
        _diffusers.set_vae_tiling(vae, True, latent_min=8, sample_min=8 * 2 ** (len(vae.config.block_out_channels) - 1))
        tiled = vae.decode(z).sample
        _diffusers.set_vae_tiling(vae, False)
        again = vae.decode(z).sample
    assert _diffusers.vae_settings(vae)[3] == 8
    assert not torch.equal(plain, tiled)
    assert torch.equal(plain, again)


def test_torch_has_a_way_to_empty_the_pinned_host_cache():
    """The public call or the private one autofit falls back to exists in this torch."""
    public = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    assert callable(public) or callable(getattr(torch._C, "_host_emptyCache", None))
