"""Compiled pipelines (issue 23): a component compiled with ``torch.compile`` is recognised,
wrapped and recovered like an eager one, the fault injection fires inside it, placements give
the eager output, and recompiles are bounded. Dynamo's cheap ``eager`` backend keeps this fast:
what is under test is dynamo's tracing and guards, not inductor's kernels."""

import logging

import pytest
import torch

from autofit import autofit
from autofit.facts import compiled
from autofit.facts.components import roles
from autofit.plan import Plan
from autofit.testing import inject_oom, tiny_sdxl

from helpers import CallCounter, run, switch_plan


def _compiled_sdxl(**kw):
    pipe = tiny_sdxl()
    inner = pipe.unet
    pipe.unet = torch.compile(pipe.unet, backend=kw.pop("backend", "eager"), **kw)
    return pipe, inner


@pytest.fixture(scope="module")
def eager_image():
    return run(tiny_sdxl(), "sdxl")


def test_a_compiled_component_is_recognised_without_tracing():
    """Role from the class under the wrapper, the same parameters (footprint, units), and each
    kind of compiled region found: whole module, repeated blocks, a compiled vae.decode."""
    pipe, inner = _compiled_sdxl()
    seq = pipe.model_cpu_offload_seq
    pipe.model_cpu_offload_seq = None  # not from the offload sequence: from the class
    try:
        assert roles(pipe)["unet"] == "denoise"
    finally:
        pipe.model_cpu_offload_seq = seq
    assert compiled.eager_module(pipe.unet) is inner
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in inner.parameters())
    assert [r.kind for r in compiled.regions(pipe.unet)] == ["module"]
    other = tiny_sdxl()
    other.unet.down_blocks[0].compile(backend="eager")
    other.vae.decode = torch.compile(other.vae.decode, backend="eager")
    assert [(r.kind, r.path) for r in compiled.regions(other.unet)] == [("block", "down_blocks.0")]
    assert [(r.kind, r.path) for r in compiled.regions(other.vae)] == [("method", "decode")]
    assert not compiled.regions(tiny_sdxl().unet)


def test_a_denoise_oom_inside_a_compiled_unet_resumes_at_the_failing_step(eager_image):
    """The injected OOM fires inside the compiled UNet, the step is retried in place (no step
    redone: 4 completed calls of the inner module), and the image is the compiled raw run's."""
    pipe, inner = _compiled_sdxl()
    raw = run(pipe, "sdxl")
    torch.testing.assert_close(raw, eager_image)
    proxy = autofit(pipe, device="cpu", cache=False)
    steps = CallCounter(inner)
    with inject_oom(proxy, stage="denoise", at=3) as fault:
        image = run(proxy, "sdxl")
    assert fault.fired == 1 and fault.calls == 4 + 1
    assert steps.n == 4
    assert [(r.stage, r.scope) for r in proxy.autofit.history] == [("denoise", "stage")]
    torch.testing.assert_close(image, raw)


def test_an_injection_that_never_fires_fails_the_test():
    """Leaving the with block with nothing fired raises, unless expect_fire=False."""
    pipe = tiny_sdxl()
    with pytest.raises(AssertionError, match="never fired"):
        with inject_oom(pipe, stage="denoise", at=1, expect_fire=True):
            pass
    with inject_oom(pipe, stage="denoise", at=1, expect_fire=False) as fault:
        pass
    assert fault.fired == 0
    with inject_oom(pipe, stage="denoise", at=99) as fault:  # default: the 99th call never came
        run(pipe, "sdxl", num_inference_steps=1)
    assert fault.calls == 1 and fault.fired == 0


@pytest.mark.parametrize("placement", ["model_offload", "group_block", "group_leaf", "resident_stream:50"])
def test_each_placement_on_a_compiled_unet_gives_the_eager_output(placement, eager_image, caplog):
    """Each placement applied to the compiled UNet gives what it gives the eager one, and a
    second call under the same plan compiles nothing new."""
    pipe, _ = _compiled_sdxl()
    proxy = autofit(pipe, device="cpu", plan=(placement,), cache=False)
    with caplog.at_level(logging.WARNING, logger="autofit"):
        image = run(proxy, "sdxl")
    torch.testing.assert_close(image, eager_image)
    settled = compiled.versions(pipe.unet)
    assert settled <= 1
    torch.testing.assert_close(run(proxy, "sdxl"), eager_image)
    assert compiled.versions(pipe.unet) == settled  # no recompile under an unchanged plan
    warned = [r for r in caplog.records if "compiled_eager" in r.getMessage()]
    assert bool(warned) == (placement in ("group_leaf", "resident_stream:50"))  # hooks inside: eager, said so


def test_sequential_matches_eager_behaviour(eager_image):
    """sequential on a compiled UNet behaves as on the eager one (on a CPU-only machine
    accelerate's sequential offload fails for both: that failure is not the compiler's)."""
    outcomes = []
    for pipe in (tiny_sdxl(), _compiled_sdxl()[0]):
        proxy = autofit(pipe, device="cpu", plan=("sequential",), cache=False)
        try:
            outcomes.append(run(proxy, "sdxl"))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(type(exc))
    if isinstance(outcomes[0], torch.Tensor):
        torch.testing.assert_close(outcomes[1], outcomes[0])
    else:
        assert outcomes[1] is outcomes[0]


def test_recompiles_are_bounded_across_plan_changes(eager_image):
    """A plan change recompiles the compiled UNet at most once; calls under an unchanged plan
    recompile nothing; going back to a plan seen before reuses its code."""
    pipe, _ = _compiled_sdxl()
    proxy = autofit(pipe, device="cpu", plan=(), cache=False)
    run(proxy, "sdxl")
    seen = [compiled.versions(pipe.unet)]
    for plan in (("model_offload",), ()):
        switch_plan(proxy, Plan.from_names(plan))
        before = compiled.versions(pipe.unet)
        torch.testing.assert_close(run(proxy, "sdxl"), eager_image)
        after = compiled.versions(pipe.unet)
        run(proxy, "sdxl")
        assert compiled.versions(pipe.unet) == after  # steady
        assert after - before <= 1
        seen.append(after)
    assert seen[-1] == seen[-2]  # back to the first plan: nothing new


def test_cuda_graphs_under_a_plan_that_moves_weights_run_eager_with_a_warning(caplog):
    """mode="reduce-overhead" is detected; under a plan that moves weights the component runs
    eager (CUDA graphs replay fixed weight addresses), with a WARNING saying so. Detection only
    on the CPU: nothing is compiled or run here."""
    m = torch.compile(torch.nn.Linear(2, 2), mode="reduce-overhead")
    (region,) = compiled.regions(m)
    assert compiled.uses_cuda_graphs(region)
    assert compiled.eager_reason(m, "device") is None
    assert compiled.eager_reason(m, "model_offload") == "cuda_graphs_with_moving_weights"
    assert compiled.eager_reason(torch.compile(torch.nn.Linear(2, 2)), "model_offload") is None
    with caplog.at_level(logging.WARNING, logger="autofit"):
        with compiled.run_context("unet", m, "group_block", "denoise"):
            assert torch.compiler.is_compiling() is False
    assert any("compiled_eager" in r.getMessage() and "reduce-overhead" in r.getMessage() for r in caplog.records)
