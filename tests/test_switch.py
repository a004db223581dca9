"""The plan switch and preflight: a plan that cannot be placed leaves the previous one in force
(the next call is not doomed), and reset() really plans again."""

import json

import structlog
import torch
from diffusers import StableDiffusionXLPipeline

from autofit import autofit
from autofit.testing import inject_oom, tiny_sdxl

from helpers import run

FAST = {"num_inference_steps": 2}


class NoOffloadSeqPipeline(StableDiffusionXLPipeline):
    """A real pipeline class that declares no model offload order: diffusers refuses model offload."""

    model_cpu_offload_seq = None


def _no_seq_pipe():
    return NoOffloadSeqPipeline(**tiny_sdxl().components)


def _refused_or_recovered(proxy):
    """Run once: either diffusers' refusal passes through untouched, or autofit recovers."""
    try:
        return run(proxy, "sdxl", **FAST)
    except ValueError as exc:
        assert "model_cpu_offload_seq" in str(exc)
        return None


def test_a_start_plan_diffusers_refuses_leaves_the_previous_plan_in_force():
    """plan=("model_offload",) on a pipeline without model_cpu_offload_seq: the first call fails
    with diffusers' error (or recovers), the plan in force stays the one before, and the next
    call runs on it instead of failing again."""
    reference = run(autofit(_no_seq_pipe(), cache=False, preflight=False), "sdxl", **FAST)
    proxy = autofit(_no_seq_pipe(), plan=("model_offload",), cache=False)
    _refused_or_recovered(proxy)
    assert "model_offload" not in proxy.autofit.plan
    torch.testing.assert_close(run(proxy, "sdxl", **FAST), reference)
    assert "model_offload" not in proxy.autofit.plan


def test_a_cached_plan_diffusers_refuses_is_not_chosen_again(tmp_path):
    """A plan cache that says model_offload for a pipeline class without model_cpu_offload_seq
    (a real file, as another version of the pipeline could have stored it): the first call fails
    with diffusers' error or starts elsewhere, and the next call is not doomed."""
    first = autofit(_no_seq_pipe(), cache=tmp_path)
    reference = run(first, "sdxl", **FAST)
    (record_path,) = (tmp_path / "plans").glob("*.json")
    record = json.loads(record_path.read_text())
    record["plan"] = ["model_offload"]
    record_path.write_text(json.dumps(record))

    proxy = autofit(_no_seq_pipe(), cache=tmp_path)
    _refused_or_recovered(proxy)
    assert "model_offload" not in proxy.autofit.plan
    torch.testing.assert_close(run(proxy, "sdxl", **FAST), reference)
    assert "model_offload" not in proxy.autofit.plan
    assert "model_offload" not in json.loads(record_path.read_text())["plan"]  # the cache is healed


def test_reset_plans_again_at_the_next_call():
    """After an escalation, reset() makes the next call plan afresh (a preflight event, the
    planner's pick) instead of keeping the escalated plan."""
    proxy = autofit(tiny_sdxl(), cache=False)
    with structlog.testing.capture_logs() as first:
        run(proxy, "sdxl", **FAST)
    picked = proxy.autofit.plan
    assert [e["event"] for e in first].count("autofit.preflight") == 1
    with inject_oom(proxy, stage="decode", times=1):
        run(proxy, "sdxl", **FAST)
    assert proxy.autofit.plan != picked  # escalated
    proxy.autofit.reset()
    with structlog.testing.capture_logs() as again:
        run(proxy, "sdxl", **FAST)
    assert [e["event"] for e in again].count("autofit.preflight") == 1
    assert proxy.autofit.plan == picked


def test_reset_goes_back_to_the_start_plan_without_preflight():
    """With preflight off, reset() goes back to the plan autofit started with."""
    proxy = autofit(tiny_sdxl(), plan=("vae_tiling",), cache=False)
    run(proxy, "sdxl", **FAST)
    with inject_oom(proxy, stage="denoise", times=1):
        run(proxy, "sdxl", **FAST)
    assert proxy.autofit.plan != ("vae_tiling",)
    proxy.autofit.reset()
    run(proxy, "sdxl", **FAST)
    assert proxy.autofit.plan == ("vae_tiling",)
