"""Each stage's recovery, on real tiny SDXL-class and Flux-class pipelines."""


import pytest
import torch

from autofit import autofit
from autofit.testing import inject_oom

from helpers import DENOISER, CallCounter, run


def test_decode_oom_retries_only_decode(pipe, kind):
    """An OOM in vae.decode never reruns the denoising loop, and the image equals a clean run."""
    proxy = autofit(pipe)
    denoiser = CallCounter(getattr(pipe, DENOISER[kind]))
    with inject_oom(proxy, stage="decode") as fault:
        image = run(proxy, kind)
    assert fault.fired == 1
    assert denoiser.n == 4  # 4 steps, none recomputed
    assert [r.stage for r in proxy.autofit.history] == ["decode"]
    assert proxy.autofit.history[0].action == "offload_for_decode"
    assert proxy.autofit.history[0].scope == "stage"
    clean = run(proxy, kind)  # same final plan, same seed
    torch.testing.assert_close(image, clean)


@pytest.mark.parametrize("step", [0, 2, 3])
def test_denoise_oom_resumes_at_the_failing_step(pipe, kind, step):
    """An OOM at denoising step k resumes at step k: steps before it are not recomputed."""
    proxy = autofit(pipe)
    denoiser = CallCounter(getattr(pipe, DENOISER[kind]))
    with inject_oom(proxy, stage="denoise", at=step + 1) as fault:
        image = run(proxy, kind)
    assert fault.fired == 1
    assert fault.calls == 4 + 1  # every step once, plus the failed attempt
    assert denoiser.n == 4
    assert proxy.autofit.history[-1].stage == "denoise"
    torch.testing.assert_close(image, run(proxy, kind))


def test_encode_oom_reruns_only_that_encoder(pipe, kind):
    """An OOM in the second text encoder reruns only that encoder."""
    proxy = autofit(pipe)
    first = CallCounter(pipe.text_encoder)
    second = CallCounter(pipe.text_encoder_2)
    clean_image = None
    with inject_oom(proxy, stage="encode", component="text_encoder_2") as fault:
        image = run(proxy, kind)
    calls_first, calls_second = first.n, second.n
    first.n = second.n = 0
    clean_image = run(proxy, kind)
    assert fault.fired == 1
    assert calls_first == first.n and calls_second == second.n  # no extra encoder passes
    assert proxy.autofit.history[0].stage == "encode"
    assert proxy.autofit.history[0].component == "text_encoder_2"
    torch.testing.assert_close(image, clean_image)


def test_load_oom_mends_half_moved_pipeline_and_offloads(pipe, kind):
    """An OOM while weights move onto the device leaves no half-moved module: the next rung places them."""
    proxy = autofit(pipe)
    with inject_oom(proxy, stage="load") as fault:
        image = run(proxy, kind)
    assert fault.fired == 1
    rec = proxy.autofit.history[0]
    assert (rec.stage, rec.scope, rec.action) == ("load", "load", "model_offload")
    assert proxy.autofit.plan == ("model_offload",)
    devices = {p.device.type for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
    assert devices == {"cpu"}
    torch.testing.assert_close(image, run(proxy, kind))


def test_glue_oom_reruns_call_with_generator_restored(pipe, kind):
    """An OOM outside any component reruns the whole call; the seed still holds."""
    proxy = autofit(pipe)
    with inject_oom(proxy, stage="glue", at=2) as fault:
        image = run(proxy, kind)
    assert fault.fired == 1
    assert proxy.autofit.history[0].scope == "call"
    assert proxy.autofit.history[0].stage == "denoise"
    torch.testing.assert_close(image, run(proxy, kind))


def test_failed_attempt_tensors_are_freed_before_retry(pipe, kind):
    """The tensors alive in the failing frame are gone when the component runs again."""
    proxy = autofit(pipe)
    with inject_oom(proxy, stage="denoise", at=2, times=2, ballast_bytes=8 << 20) as fault:
        run(proxy, kind)
    assert fault.fired == 2
    assert fault.freed_before_retry == [True, True]


def test_recovered_plan_is_kept_for_later_calls(pipe, kind):
    """Once a plan works, later calls start from it and raise no new escalation."""
    proxy = autofit(pipe)
    with inject_oom(proxy, stage="denoise", at=1, times=2):
        run(proxy, kind)
    plan, n = proxy.autofit.plan, len(proxy.autofit.history)
    assert plan and n == 2
    for seed in range(2):
        run(proxy, kind, seed=seed)
    assert proxy.autofit.plan == plan and len(proxy.autofit.history) == n
    assert proxy.autofit.last_call["attempts"] == 0


def test_escalation_climbs_the_denoise_ladder(pipe, kind):
    """Repeated denoise OOMs walk the lossless ladder in order, each rung applied for real (CPU ladder)."""
    proxy = autofit(pipe, device="cpu")
    with inject_oom(proxy, stage="denoise", at=1, times=3):
        image = run(proxy, kind)
    actions = [r.action for r in proxy.autofit.history]
    assert actions == ["offload_encoders", "model_offload", "group_block"]
    assert proxy.autofit.plan == ("group_block",)
    assert torch.isfinite(image).all()
    torch.testing.assert_close(image, run(proxy, kind))
