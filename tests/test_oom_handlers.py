"""Errors raised inside a component's own OOM handler pass through autofit untouched."""

import pytest
import torch

from autofit import autofit
from autofit.testing import oom_error

from tiny_pipelines import sd15


def run(p, kwargs):
    return p(**kwargs, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def warm():
    """A wrapped tiny SD 1.5 that has run once (its plan placed), and its call."""
    pipe, kwargs = sd15()
    proxy = autofit(pipe)
    run(proxy, kwargs)
    return pipe, proxy, kwargs


def _handler_raising(module, error):
    """Make ``module`` run out of memory and, in its ``except torch.OutOfMemoryError`` block,
    raise ``error`` (as transformers' mxfp4 or diffusers' Sana fallbacks do)."""
    first = next(m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))

    def pre_hook(mod, args):
        try:
            raise oom_error("cuda")
        except torch.OutOfMemoryError:
            raise error

    return first.register_forward_pre_hook(pre_hook)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), ValueError("the fallback needs a smaller tile")],
                         ids=["KeyboardInterrupt", "ValueError"])
def test_error_raised_in_an_oom_handler_passes_through(warm, error):
    """The very exception raised in the handler comes out; no plan change, nothing escalated."""
    pipe, proxy, kwargs = warm
    plan = proxy.autofit.plan
    handle = _handler_raising(pipe.text_encoder, error)
    try:
        with pytest.raises(type(error)) as caught:
            run(proxy, kwargs)
    finally:
        handle.remove()
    assert caught.value is error
    assert list(proxy.autofit.history) == []
    assert proxy.autofit.plan == plan
