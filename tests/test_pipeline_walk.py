"""Every pipeline family that builds tiny: autofit changes nothing without an OOM, and a one-off
OOM in each component call of each stage is retried in place with the raw pipeline's output.

The families and what each run covers are listed in docs/pipelines.md (the whole walk: ~17-20 s on
2 cores).
"""

import numpy as np
import pytest
import torch

from autofit import autofit
from autofit.facts.components import entry_points, roles
from autofit.testing import inject_oom

from helpers import CallCounter
from tiny_pipelines import BUILDERS, STEPS


def _output(out):
    first = out[0]
    if isinstance(first, list) and first and hasattr(first[0], "size"):  # PIL images
        return np.stack([np.asarray(im, dtype=np.float32) for im in first])
    return np.asarray(first.float() if isinstance(first, torch.Tensor) else first, dtype=np.float32)


def _run(p, kwargs):
    return _output(p(**kwargs, generator=torch.Generator().manual_seed(0)))


def _calls(pipe):
    """(component, stage) of each wrapped entry point of the pipeline."""
    found = []
    for name, role in roles(pipe).items():
        module = getattr(pipe, name)
        for attr, stage in entry_points(name, module, role):
            if stage == "vae_encode" and not hasattr(module, "encoder"):
                continue  # the fault is raised from the encoder's first layer (Stable Cascade's VQ-GAN has none)
            if attr in ("forward", "encode", "decode"):
                found.append((name, stage))
    return found


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    pipe, kwargs = BUILDERS[request.param]()
    return request.param, pipe, kwargs, _run(pipe, kwargs)


def test_no_oom_no_change_and_each_stage_retried_in_place(family):
    """Under autofit without an OOM the output is the raw pipeline's; then a one-off OOM in each
    component call the pipeline makes is retried in place (scope "stage", same component), and
    the output is still the raw pipeline's."""
    name, pipe, kwargs, raw = family
    proxy = autofit(pipe, cache=False)  # each fault below starts from the planner's plan
    counting = {(c, s): inject_oom(proxy, stage=s, component=c, when=lambda n: False) for c, s in _calls(pipe)}
    clean = _run(proxy, kwargs)
    for fault in counting.values():
        fault.remove()
    assert list(proxy.autofit.history) == []
    np.testing.assert_allclose(clean, raw, rtol=0, atol=1e-5)
    called = [(c, s) for c, s in _calls(pipe) if counting[c, s].calls > 0]
    assert called, f"{name}: no component call seen"
    for component, stage in called:
        proxy.autofit.reset()
        with inject_oom(proxy, stage=stage, component=component) as fault:
            image = _run(proxy, kwargs)
        assert fault.fired == 1, (component, stage)
        last = proxy.autofit.history[-1]
        assert (last.stage, last.component, last.scope) == (stage, component, "stage"), (name, last)
        np.testing.assert_allclose(image, raw, rtol=0, atol=1e-5, err_msg=f"{name}: {component} {stage}")


def test_upcast_vae_oom_is_a_decode_oom_retried_in_place():
    """SDXL's upcast of an fp16 VAE (force_upcast) running out is the decode stage's: the cast is
    retried after a decode rung, the denoiser is not rerun, and the image is the raw one."""
    pipe, kwargs = BUILDERS["StableDiffusionXLPipeline (fp16 VAE, force_upcast)"]()
    raw = _run(pipe, kwargs)
    assert pipe.vae.dtype == torch.float16  # the pipeline cast it back after decoding
    proxy = autofit(pipe)
    _run(proxy, kwargs)  # placed; the next call moves nothing
    unet = CallCounter(pipe.unet)
    fired = []

    def when(n):  # the first cast of the VAE once the denoising loop is done: upcast_vae
        if unet.n >= STEPS and not fired:
            fired.append(n)
            return True
        return False

    with inject_oom(proxy, stage="load", component="vae", when=when) as fault:
        image = _run(proxy, kwargs)
    assert fault.fired == 1
    assert unet.n == STEPS  # the denoising loop ran once
    last = proxy.autofit.history[-1]
    assert (last.stage, last.component, last.scope) == ("decode", "vae", "stage")
    np.testing.assert_allclose(image, raw, rtol=0, atol=1e-5)
    assert pipe.vae.dtype == torch.float16
