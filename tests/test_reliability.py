"""Reliability: a generated fault matrix, OOM during a remedy, interrupted recovery, bad input,
threads, and a seeded soak. Everything runs real tiny pipelines on the CPU."""

import gc
import itertools
import os
import random
import threading

import psutil
import pytest
import torch

from autofit import AutoFitExhausted, AutoFitUsageError, autofit
from autofit.ladder import Facts, next_plan
from autofit.plan import CallShape, Plan
from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

from conftest import BUILDERS, CALL_KWARGS, PROMPT, run
from footprints import SDXL

STAGES = ["load", "encode", "denoise", "decode", "glue"]
START_PLANS = [(), ("offload_encoders",), ("offload_for_decode",), ("model_offload",), ("group_block",),
               ("group_leaf",), ("vae_tiling",), ("vae_cpu",)]
MATRIX = list(itertools.product(["sdxl", "flux"], START_PLANS, STAGES, ["first", "later"]))
FAST = {"num_inference_steps": 2}



def _all_params_where_plan_says(pipe):
    # On the CPU every placement keeps every weight on the CPU, none on meta.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                assert p.device.type == "cpu", f"parameter left on {p.device}"


def test_fault_matrix_size_is_reported(capsys):
    """The matrix is generated, and its size printed."""
    with capsys.disabled():
        print(f"\nautofit fault matrix: {len(MATRIX)} cases "
              f"({len(STAGES)} stages x {len(START_PLANS)} start plans x first/later call x sdxl/flux)")
    assert len(MATRIX) == 2 * len(START_PLANS) * len(STAGES) * 2


@pytest.mark.parametrize("kind, start, stage, when", MATRIX)
def test_fault_matrix(kind, start, stage, when):
    """Every stage x rung x first/later call x pipeline: recovered or exhausted, never wedged."""
    pipe = BUILDERS[kind]()
    proxy = autofit(pipe, plan=start, cache=False)
    if when == "later":
        run(proxy, kind, **FAST)
    # "load" can only fail while weights move: force a re-placement on the later call.
    if stage == "load" and when == "later":
        proxy.autofit._rt._applied = None
    with inject_oom(proxy, stage=stage) as fault:
        try:
            image = run(proxy, kind, **FAST)
            assert torch.isfinite(image).all()
            recovered = True
        except AutoFitExhausted as exc:
            assert exc.stage in ("load", "encode", "denoise", "decode")
            assert isinstance(exc.history, tuple)
            assert exc.history or "Tried: nothing" in str(exc)
            recovered = False
    if fault.fired and recovered:
        assert proxy.autofit.history, "an OOM fired and was recovered, but nothing was recorded"
    if not fault.fired:  # e.g. a load fault on a placement that moves no weights
        assert recovered and not proxy.autofit.history
    _all_params_where_plan_says(pipe)
    after = run(proxy, kind, **FAST)  # usable for the next call, whatever happened
    assert after.shape[0] == 1 and torch.isfinite(after).all()


def test_oom_while_weights_move_during_a_remedy_tries_the_next_rung():
    """An OOM while a rung moves weights is a load OOM: the next rung is tried, nothing half-moved."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, plan=("offload_encoders",), cache=False)
    run(proxy, "sdxl", **FAST)  # placed
    # The denoise OOM asks for model offload, which moves every component: the encoder's move fails.
    with inject_oom(proxy, stage="denoise"), inject_oom(proxy, stage="load", component="text_encoder") as move:
        image = run(proxy, "sdxl", **FAST)
    assert move.fired == 1
    stages = [(r.stage, r.action) for r in proxy.autofit.history]
    assert stages[0] == ("denoise", "model_offload") and stages[1][0] == "load"
    assert torch.isfinite(image).all()
    _all_params_where_plan_says(pipe)


def test_oom_while_offload_hooks_are_installed():
    """An OOM raised while model offload installs its hooks leads to the next rung, consistently."""
    pipe = tiny_flux()
    proxy = autofit(pipe, plan=("offload_encoders",), cache=False)
    run(proxy, "flux", **FAST)
    # enable_model_cpu_offload moves every component to the CPU first: the VAE's move fails.
    with inject_oom(proxy, stage="denoise"), inject_oom(proxy, stage="load", component="vae") as move:
        image = run(proxy, "flux", **FAST)
    assert move.fired == 1
    actions = [r.action for r in proxy.autofit.history]
    assert actions[0] == "model_offload" and len(actions) >= 2
    assert torch.isfinite(image).all()
    assert run(proxy, "flux", **FAST).shape[0] == 1


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupt_during_recovery_restores_the_plan_in_force(error):
    """A non-OOM exception raised while a rung is applied: plan restored, exception propagates."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, plan=("offload_encoders",), cache=False)
    run(proxy, "sdxl", **FAST)
    real_apply = type(pipe.text_encoder)._apply
    calls = []

    def failing_apply(fn, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise error("interrupted while moving weights")
        return real_apply(pipe.text_encoder, fn, *a, **k)

    pipe.text_encoder._apply = failing_apply
    with inject_oom(proxy, stage="denoise"):
        with pytest.raises(error):
            run(proxy, "sdxl", **FAST)
    del pipe.text_encoder._apply
    assert proxy.autofit.plan == ("offload_encoders",)  # the plan in force before the failed switch
    image = run(proxy, "sdxl", **FAST)
    assert torch.isfinite(image).all()


def test_host_oom_leads_to_rungs_that_need_less_host_ram():
    """A host-RAM OOM on a GPU goes to low-RAM rungs, never to device rungs that pin more."""
    facts = Facts(footprint=SDXL, device_type="cuda", host_available=10**12)
    plan, action, _ = next_plan(Plan("group_leaf_stream"), "denoise", host_oom=True, facts=facts,
                                shape=CallShape(), policy="quality")
    assert action == "group_leaf_lowmem"
    # Nothing lossless needs less host RAM than pinning on the fly; fp8 halves it when allowed.
    _, none_left, _ = next_plan(plan, "denoise", host_oom=True, facts=facts, shape=CallShape(), policy="quality")
    _, action2, _ = next_plan(plan, "denoise", host_oom=True, facts=facts, shape=CallShape(), policy="balanced")
    assert none_left is None and action2 == "fp8"
    none, _, skipped = next_plan(Plan(), "denoise", host_oom=True, facts=facts, shape=CallShape(), policy="quality")
    assert none is None and all("host RAM" in r or "policy" in r for _, r in skipped)


# ---- bad input ------------------------------------------------------------------------------
def test_not_a_pipeline():
    """Wrapping something that is not a pipeline says what to pass."""
    with pytest.raises(AutoFitUsageError, match="DiffusionPipeline"):
        autofit(torch.nn.Linear(2, 2))


def test_already_wrapped():
    """Wrapping a proxy again is refused with the way out."""
    proxy = autofit(tiny_sdxl(), cache=False)
    with pytest.raises(AutoFitUsageError, match="already wrapped"):
        autofit(proxy)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"policy": "fast"}, "policy"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"device": "warp-drive"}, "device"),
        ({"plan": ("teleport",)}, "plan"),
        ({"plan": ("model_offload", "group_leaf")}, "one placement"),
        ({"max_vram": "lots"}, "max_vram"),
        ({"max_ram": -5}, "max_ram"),
    ],
)
def test_invalid_options(options, match):
    """Each invalid option value gets an AutoFitUsageError naming it, and the pipeline is untouched."""
    pipe = tiny_sdxl()
    before = {n: m.forward for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    with pytest.raises(AutoFitUsageError, match=match):
        autofit(pipe, **options)
    after = {n: m.forward for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert before.keys() == after.keys()


def test_user_offloaded_pipeline_is_adopted_as_is():
    """A pipeline the user already offloaded keeps its hooks: autofit starts from that placement."""
    pipe = tiny_sdxl()
    pipe.enable_model_cpu_offload(device="cpu")
    hooks = list(pipe._all_hooks)
    proxy = autofit(pipe, cache=False)
    assert proxy.autofit.plan == ("model_offload",)
    image = run(proxy, "sdxl", **FAST)
    assert torch.isfinite(image).all()
    assert len(pipe._all_hooks) == len(hooks)  # re-hooked by diffusers itself, not torn down by us


def test_pipeline_without_offload_seq_skips_model_offload():
    """No model_cpu_offload_seq: model offload is skipped with a reason, the ladder goes on."""
    pipe = tiny_sdxl()
    pipe.model_cpu_offload_seq = None
    proxy = autofit(pipe, cache=False)
    with inject_oom(proxy, stage="denoise", times=2):
        run(proxy, "sdxl", **FAST)
    second = proxy.autofit.history[1]
    assert second.action == "group_block"
    assert ("model_offload", "pipeline class has no model_cpu_offload_seq") in second.skipped


def test_user_vae_settings_are_restored():
    """The user's own VAE tiling settings come back when the plan no longer tiles."""
    pipe = tiny_sdxl()
    pipe.vae.enable_slicing()
    proxy = autofit(pipe, plan=("vae_tiling",), cache=False)
    run(proxy, "sdxl", **FAST)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    proxy.autofit.reset()
    proxy.autofit._rt.initial_plan = Plan()
    proxy.autofit.reset()
    run(proxy, "sdxl", **FAST)
    assert pipe.vae.use_tiling is False and pipe.vae.use_slicing is True


# ---- threads --------------------------------------------------------------------------------
def test_concurrent_calls_are_serialised_and_see_whole_plans():
    """Calls from several threads on one proxy give the same images as sequential calls."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, cache=False)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    fault = inject_oom(proxy, stage="decode", at=2)

    def worker(seed):
        try:
            results[seed] = run(proxy, "sdxl", seed=seed, **FAST)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fault.remove()
    assert not errors and fault.fired == 1
    for seed in range(4):
        torch.testing.assert_close(results[seed], run(proxy, "sdxl", seed=seed, **FAST))


# ---- soak -----------------------------------------------------------------------------------
# 1,000 calls take ~3.5 min on 2 cores; CI runs 300, `AUTOFIT_SOAK_CALLS=1000 make test` the full soak
# (its result is in docs/benchmarks.md).
SOAK_CALLS = int(os.environ.get("AUTOFIT_SOAK_CALLS", "300"))


def _slope_per_1000(values: list[float], every: int) -> float:
    n = len(values)
    xs = [i * every for i in range(n)]
    mx, my = sum(xs) / n, sum(values) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, values)) / var


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_soak_random_ooms(capsys):
    """1,000 calls with seeded random OOMs: no unexpected exception, results finite, memory flat."""
    rng = random.Random(1234)
    pipe = tiny_flux()
    proxy = autofit(pipe, cache=False)
    kwargs = dict(CALL_KWARGS["flux"], num_inference_steps=1, height=16, width=16)
    rss, tensors, exhausted, ooms = [], [], 0, 0
    proc = psutil.Process()
    for i in range(SOAK_CALLS):
        stage = rng.choice(["none"] * 6 + ["encode", "denoise", "decode", "glue"])
        before_plan, before_hist = proxy.autofit.plan, len(proxy.autofit.history)
        fault = inject_oom(proxy, stage=stage) if stage != "none" else None
        try:
            out = proxy(PROMPT, generator=torch.Generator().manual_seed(i), **kwargs).images
            assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
        except AutoFitExhausted:
            exhausted += 1
            proxy.autofit.reset()  # a batch job would go on from the start plan
        finally:
            if fault is not None:
                fault.remove()
                ooms += fault.fired
        if fault is None:
            assert proxy.autofit.plan == before_plan and len(proxy.autofit.history) == before_hist
        if i % 50 == 49:
            rss.append(proc.memory_info().rss)
            tensors.append(_live_tensors())
    # Skip the first samples: allocator caches and lazily built kernels settle early.
    rss_slope = _slope_per_1000([r / 2**20 for r in rss[2:]], 50)
    tensor_slope = _slope_per_1000([float(t) for t in tensors[2:]], 50)
    with capsys.disabled():
        print(f"\nsoak: {SOAK_CALLS} calls, {ooms} OOMs injected, {exhausted} exhausted ladders; slopes per "
              f"1000 calls: RSS {rss_slope:+.2f} MiB, live tensors {tensor_slope:+.2f}")
    assert ooms > SOAK_CALLS // 10
    assert rss_slope < 32
    assert abs(tensor_slope) < 5
