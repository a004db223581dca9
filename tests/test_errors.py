"""Errors that are not OOMs, exhaustion, and what the user's pipeline looks like afterwards."""


import pytest
import torch

from autofit import AutoFitExhausted, autofit
from autofit.testing import inject_oom

from helpers import BUILDERS, run


class Boom(RuntimeError):
    pass


def test_non_oom_passes_through_untouched(pipe, kind):
    """A non-OOM error is the same object with its traceback, and the plan does not change."""
    proxy = autofit(pipe)
    boom = Boom("not memory")

    def raise_boom(module, args):
        raise boom

    handle = pipe.vae.decoder.conv_in.register_forward_pre_hook(raise_boom)
    with pytest.raises(Boom) as info:
        run(proxy, kind)
    handle.remove()
    assert info.value is boom
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "raise_boom"
    assert proxy.autofit.plan == () and proxy.autofit.history == ()
    assert run(proxy, kind).shape[0] == 1  # still usable


def test_a_user_error_that_mentions_out_of_memory_passes_through(backoff_waits):
    """A plain RuntimeError whose text merely contains an OOM phrase, raised inside the UNet after
    wrapping: the same object reaches the caller on the first attempt, no retry, no wait, no rung."""
    pipe = BUILDERS["sdxl"]()
    proxy = autofit(pipe)
    for text in ("worker 3 said: CUDA out of memory", "tensor out of memory on device 0?",
                 "oops DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"):
        mine = RuntimeError(text)
        calls = []

        def raise_mine(module, args):
            calls.append(1)
            raise mine

        handle = pipe.unet.conv_in.register_forward_pre_hook(raise_mine)
        with pytest.raises(RuntimeError) as info:
            run(proxy, "sdxl")
        handle.remove()
        assert info.value is mine and type(info.value) is RuntimeError, text
        assert len(calls) == 1 and backoff_waits == [], text
        assert proxy.autofit.plan == () and proxy.autofit.history == (), text


def test_exhaustion_keeps_the_allocator_error_as_its_cause(pipe, kind):
    """When recovery gives up, the OOM that was raised (its type and message) is the cause."""
    proxy = autofit(pipe, max_retries=1)
    with inject_oom(proxy, stage="denoise", times=100, kind="cudnn"):
        with pytest.raises(AutoFitExhausted) as info:
            run(proxy, kind)
    cause = info.value.__cause__
    assert type(cause) is RuntimeError and str(cause) == "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
    assert cause.__traceback__ is None  # the failed attempt's frames are not kept


def test_keyboard_interrupt_passes_through(pipe, kind):
    """Ctrl-C in the middle of a stage, inside autofit's stage wrapper, is not swallowed."""
    proxy = autofit(pipe)

    def interrupt(module, args):
        raise KeyboardInterrupt

    # A submodule of the text encoder: its hooks run inside the encoder's forward, which autofit
    # wraps (a hook on the encoder itself would run before the wrapper and prove nothing).
    handle = pipe.text_encoder.encoder.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        run(proxy, kind)
    handle.remove()
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "autofit_stage_call" in frames and frames[-1] == "interrupt"
    assert proxy.autofit.history == () and proxy.autofit.plan == ()
    assert run(proxy, kind).shape[0] == 1  # still usable


def test_exhaustion_raises_subclass_of_oom_with_history(pipe, kind):
    """When nothing is left, AutoFitExhausted (a torch.OutOfMemoryError) carries the history."""
    proxy = autofit(pipe)
    with inject_oom(proxy, stage="decode", times=100) as fault:
        with pytest.raises(torch.OutOfMemoryError) as info:
            run(proxy, kind)
    exc = info.value
    assert isinstance(exc, AutoFitExhausted)
    assert exc.stage == "decode"
    assert [r.action for r in exc.history] == ["offload_for_decode", "vae_tiling", "vae_tiling_small", "vae_cpu",
                                               "retry_same_plan", "retry_same_plan", "retry_same_plan"]
    assert fault.fired == 8  # the original, four rungs, three retries of the last one with backoff
    assert "What to do" in str(exc) and "vae_cpu" in str(exc)
    # The pipeline stays usable for the next call, from the last plan.
    image = run(proxy, kind)
    assert torch.isfinite(image).all()
    assert proxy.autofit.plan[-1] == "vae_cpu"


def test_max_retries_bounds_escalations(pipe, kind):
    """max_retries caps escalations within one call."""
    proxy = autofit(pipe, max_retries=1)
    with inject_oom(proxy, stage="denoise", times=100):
        with pytest.raises(AutoFitExhausted) as info:
            run(proxy, kind)
    assert len(info.value.history) == 1
    assert "max_retries=1" in str(info.value)


def test_lossy_rungs_need_a_policy(pipe, kind):
    """fp8 casting is never applied under the default policy, and is under 'balanced'."""
    proxy = autofit(pipe, device="cpu")
    with inject_oom(proxy, stage="denoise", times=100):
        with pytest.raises(AutoFitExhausted) as info:
            run(proxy, kind)
    assert "fp8" not in [r.action for r in info.value.history]
    balanced = autofit(BUILDERS[kind](), policy="balanced", device="cpu")
    with inject_oom(balanced, stage="denoise", times=5):
        image = run(balanced, kind)
    assert balanced.autofit.history[-1].action == "fp8"
    assert "fp8" in balanced.autofit.plan
    assert torch.isfinite(image).all()
    # The next call starts from the fp8 plan and works (dtype-sensitive pipeline code included).
    again = run(balanced, kind)
    torch.testing.assert_close(image, again)
