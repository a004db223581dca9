"""What users do around the call after wrapping: settings, methods, derived pipelines, copies."""

import copy
import json
import pickle

import pytest
import structlog
import torch
from diffusers import StableDiffusionXLPipeline

from autofit import AutoFitExhausted, AutoFitPipeline, AutoFitUsageError, autofit
from autofit import _diffusers
from autofit.testing import inject_oom, tiny_sdxl

from helpers import PROMPT, run

FAST = dict(num_inference_steps=1)


def _decode_flags(vae):
    """Records (use_tiling, use_slicing) each time the VAE's decoder runs."""
    seen = []
    vae.decoder.register_forward_pre_hook(lambda *a: seen.append((vae.use_tiling, vae.use_slicing)))
    return seen


def test_vae_settings_made_after_wrapping_are_kept_at_decode():
    """proxy.vae.enable_tiling()/enable_slicing() after wrapping are in force when the VAE decodes."""
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl", **FAST)
    seen = _decode_flags(proxy.vae)
    proxy.vae.enable_tiling()
    proxy.vae.enable_slicing()
    run(proxy, "sdxl", **FAST)
    assert seen and all(flags == (True, True) for flags in seen)
    proxy.vae.disable_tiling()  # and switching it off again is respected too
    run(proxy, "sdxl", **FAST)
    assert seen[-1] == (False, True)


def test_methods_that_return_the_pipeline_return_the_proxy():
    """pipe = autofit(pipe).to('cpu') keeps autofit; other methods pass through unchanged."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, cache=False).to("cpu")
    assert isinstance(proxy, AutoFitPipeline) and proxy.autofit.plan == ()
    assert proxy.to(torch.float32) is proxy
    assert proxy.progress_bar is not None and proxy.components["unet"] is pipe.unet


def test_model_offload_enabled_after_wrapping_is_adopted_not_fought():
    """enable_model_cpu_offload() through the proxy becomes the plan, and a call leaves it in place."""
    pipe = tiny_sdxl()
    reference = run(StableDiffusionXLPipeline(**tiny_sdxl().components), "sdxl", **FAST)
    proxy = autofit(pipe, cache=False)
    run(proxy, "sdxl", **FAST)  # autofit placed it first
    proxy.enable_model_cpu_offload(device="cpu")
    assert proxy.autofit.plan == ("model_offload",)
    image = run(proxy, "sdxl", **FAST)
    assert _diffusers.detect_placement(pipe) == "model_offload"  # still the user's offload
    assert proxy.autofit.plan == ("model_offload",) and not proxy.autofit.history
    assert torch.equal(image, reference)


def test_encode_prompt_through_the_proxy_recovers_from_an_oom():
    """proxy.encode_prompt runs under recovery: an encoder OOM is escalated and retried."""
    proxy = autofit(tiny_sdxl(), cache=False)
    kwargs = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    with inject_oom(proxy, stage="encode") as fault:
        embeds = proxy.encode_prompt(PROMPT, **kwargs)
    assert fault.fired
    assert [r.stage for r in proxy.autofit.history] == ["encode"]
    clean = proxy.__wrapped__.encode_prompt(PROMPT, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(embeds, clean))


def test_a_pipeline_made_from_a_proxy_under_model_offload_wraps_correctly():
    """Pipeline(**proxy.components) under the base proxy's model offload is not taken for
    sequential offload, and both proxies keep working one after the other."""
    base = autofit(tiny_sdxl(), plan=("model_offload",), device="cpu", cache=False)
    first = run(base, "sdxl", **FAST)
    derived_pipe = StableDiffusionXLPipeline(**base.components)
    assert _diffusers.detect_placement(derived_pipe) is None  # the hooks are the base's
    derived = autofit(derived_pipe, device="cpu", cache=False)
    assert derived.autofit.plan != ("sequential",)
    with structlog.testing.capture_logs() as logs:
        out = run(derived, "sdxl", **FAST)
    assert [e for e in logs if e["event"] == "autofit.preflight"]  # planned afresh, nothing adopted
    assert torch.equal(out, first)
    assert torch.equal(run(base, "sdxl", **FAST), first)  # re-placed: its hooks were taken down
    assert _diffusers.detect_placement(base.__wrapped__) == "model_offload"


@pytest.mark.parametrize("action", [copy.copy, copy.deepcopy, pickle.dumps])
def test_copying_or_pickling_the_proxy_says_what_to_do(action):
    """copy, deepcopy and pickle give a TypeError that says what to do instead."""
    proxy = autofit(tiny_sdxl(), cache=False)
    with pytest.raises(TypeError, match="autofit") as info:
        action(proxy)
    assert "__wrapped__" in str(info.value) or "before wrapping" in str(info.value)
    assert not isinstance(info.value, NotImplementedError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_device_on_a_cpu_only_torch_is_refused_at_wrap_time():
    """device='cuda' without CUDA raises AutoFitUsageError when wrapping, saying what to do."""
    with pytest.raises(AutoFitUsageError, match="device='cpu'"):
        autofit(tiny_sdxl(), device="cuda", cache=False)


@pytest.mark.parametrize("policy", ["quality", "balanced", "speed", "memory"])
def test_exhausted_advice_fits_the_policy(policy):
    """Exhaustion never says 'Tried: nothing' and only advises a policy that would allow more."""
    proxy = autofit(tiny_sdxl(), policy=policy, max_retries=0, cache=False, preflight=False)
    with inject_oom(proxy, stage="encode"), pytest.raises(AutoFitExhausted) as info:
        run(proxy, "sdxl", **FAST)
    text = str(info.value)
    assert "Tried: nothing" not in text and "the plan in force was everything on the device" in text
    assert ("policy='balanced'" in text) == (policy == "quality")
    assert ("policy=" in text) == (policy != "memory")


def test_exhausted_message_names_what_was_tried_and_the_plan():
    """With rungs tried, the message lists them and the plan that was in force."""
    from autofit.errors import exhausted_message

    text = exhausted_message(stage="decode", why="no rung left", tried=["vae_tiling", "vae_cpu"],
                             plan=("vae_cpu",), policy="balanced", error="CUDA out of memory.")
    assert "Tried: vae_tiling, vae_cpu; the plan in force was vae_cpu." in text
    assert "policy='memory'" in text and "policy='balanced'" not in text


def test_memory_policy_starts_lossless():
    """policy='memory' changes no weights before any OOM when a lossless plan fits."""
    proxy = autofit(tiny_sdxl(), policy="memory", device="cpu", cache=False, max_vram="4GiB")
    run(proxy, "sdxl", **FAST)
    assert not set(proxy.autofit.plan) & {"fp8", "int8", "nf4"}, proxy.autofit.plan
    assert proxy.autofit.plan  # least VRAM: something is offloaded


def test_demo_plan_file_stores_history_as_records():
    """demo.plan.json stores each escalation as a structured record, not a repr string."""
    from autofit.demo import plan_record

    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="decode"):
        run(proxy, "sdxl", **FAST)
    record = json.loads(json.dumps(plan_record(proxy)))
    assert record["plan"] == list(proxy.autofit.plan)
    assert [r["stage"] for r in record["escalations"]] == ["decode"]
    assert record["escalations"][0]["action"] == proxy.autofit.history[0].action
