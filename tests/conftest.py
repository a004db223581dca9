import logging

import pytest
import torch

from autofit.testing import tiny_flux, tiny_sdxl

logging.getLogger("diffusers").setLevel(logging.ERROR)

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


@pytest.fixture(params=["sdxl", "flux"])
def kind(request):
    return request.param


@pytest.fixture
def pipe(kind):
    return BUILDERS[kind]()


@pytest.fixture
def call_kwargs(kind):
    return dict(CALL_KWARGS[kind])


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_plan_cache(tmp_path, monkeypatch):
    """Each test gets its own plan cache folder: no test sees another's plans."""
    monkeypatch.setenv("AUTOFIT_CACHE_DIR", str(tmp_path / "autofit-cache"))


def pytest_report_header(config):
    from test_reliability import MATRIX

    return f"autofit fault matrix: {len(MATRIX)} cases"
