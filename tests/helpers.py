"""Helpers shared by the tests: the tiny pipelines, their call arguments, and small counters."""

import itertools

import torch

from autofit.testing import tiny_flux, tiny_sdxl

PROMPT = "a photo of an astronaut riding a horse"


def _sdxl():
    return tiny_sdxl()


def _flux():
    return tiny_flux()


BUILDERS = {"sdxl": _sdxl, "flux": _flux}
CALL_KWARGS = {
    "sdxl": dict(num_inference_steps=4, height=64, width=64, output_type="pt"),
    "flux": dict(num_inference_steps=4, height=32, width=32, output_type="pt", max_sequence_length=16),
}
DENOISER = {"sdxl": "unet", "flux": "transformer"}


def run(p, kind, seed=0, **extra):
    kwargs = dict(CALL_KWARGS[kind])
    kwargs.update(extra)
    return p(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


class CallCounter:
    """Counts completed forward calls of a real module (a post-hook runs only on success)."""

    def __init__(self, module, method="forward"):
        self.n = 0
        if method == "forward":
            self._h = module.register_forward_hook(lambda *a: self._inc())
        else:  # e.g. vae.decode: count through the decoder submodule
            self._h = module.decoder.register_forward_hook(lambda *a: self._inc())

    def _inc(self):
        self.n += 1

    def remove(self):
        self._h.remove()


# The fault matrix of test_reliability (its size goes in the report header).
STAGES = ["load", "encode", "denoise", "decode", "glue"]
START_PLANS = [(), ("offload_encoders",), ("offload_for_decode",), ("model_offload",), ("group_block",),
               ("group_leaf",), ("group_disk",), ("vae_tiling",), ("vae_cpu",)]
MATRIX = list(itertools.product(["sdxl", "flux"], START_PLANS, STAGES, ["first", "later"]))
