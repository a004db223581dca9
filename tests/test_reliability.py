"""Reliability: a generated fault matrix, OOM during a remedy, interrupted recovery, bad input,
threads, and a seeded soak. Everything runs real tiny pipelines on the CPU."""

import gc
import os
import random
import threading

import psutil
import pytest
import torch

from autofit import AutoFitExhausted, AutoFitUsageError, autofit
from autofit.planning.context import Machine, context
from autofit.planning.ladder import next_plan
from autofit.plan import Plan
from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

from helpers import BUILDERS, CALL_KWARGS, MATRIX, PROMPT, STAGES, START_PLANS, forget_placement, run, switch_plan
from footprints import SDXL

FAST = {"num_inference_steps": 1}  # one step still crosses every stage; the matrix is 180 cases



def _pipeline_matches_plan(pipe, plan, *, or_torn_down=False):
    """The pipeline is in the state the plan in force says, read from diffusers' and accelerate's
    own markers (not from autofit's bookkeeping): offload hooks exactly where the placement puts
    them, VAE tiling on exactly when a tiling rung is in the plan, weights on real storage, and
    no autofit stage wrapper left on a component between calls."""
    placement = Plan.from_names(tuple(plan)).placement
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    grouped = {n for n, m in modules.items()
               if any(getattr(s, "_diffusers_hook", None) is not None
                      and s._diffusers_hook.get_hook("group_offloading") is not None for s in m.modules())}
    if or_torn_down and not grouped and not getattr(pipe, "_all_hooks", None):
        # After exhaustion the placement is taken down and applied again at the next call:
        # then no offload hook may be left anywhere.
        assert not any(hasattr(m, "_hf_hook") for module in modules.values() for m in module.modules())
        placement = "device"
    assert bool(grouped) == placement.startswith("group"), (plan, grouped)
    assert bool(getattr(pipe, "_all_hooks", None)) == (placement == "model_offload"), plan
    tiling = any(name.startswith("vae_tiling") for name in plan)
    assert bool(getattr(pipe.vae, "use_tiling", False)) == tiling, plan
    for name, module in modules.items():
        for attr in ("forward", "decode"):
            assert getattr(module.__dict__.get(attr), "__name__", "") != "autofit_stage_call", (name, attr)
        for p in module.parameters():
            assert p.device.type == "cpu", f"{name}: parameter left on {p.device}"


def test_fault_matrix_size_is_reported(capsys):
    """The matrix is generated, and its size printed."""
    with capsys.disabled():
        print(f"\nautofit fault matrix: {len(MATRIX)} cases "
              f"({len(STAGES)} stages x {len(START_PLANS)} start plans x first/later call x sdxl/flux)")
    assert len(MATRIX) == 2 * len(START_PLANS) * len(STAGES) * 2


@pytest.mark.parametrize("kind, start, stage, when", MATRIX)
def test_fault_matrix(kind, start, stage, when):
    """Every stage x rung x first/later call x pipeline: a one-off OOM is always recovered, never
    exhausted, and the pipeline is usable afterwards."""
    pipe = BUILDERS[kind]()
    proxy = autofit(pipe, plan=start, cache=False)
    if when == "later":
        run(proxy, kind, **FAST)
    # "load" can only fail while weights move: force a re-placement on the later call.
    if stage == "load" and when == "later":
        forget_placement(proxy)
    with inject_oom(proxy, stage=stage) as fault:
        image = run(proxy, kind, **FAST)  # a one-off OOM never fails the call
    assert torch.isfinite(image).all()
    if fault.fired:
        assert proxy.autofit.history, "an OOM fired and was recovered, but nothing was recorded"
    else:  # e.g. a load fault on a placement that moves no weights
        assert not proxy.autofit.history
    _pipeline_matches_plan(pipe, proxy.autofit.plan)
    after = run(proxy, kind, **FAST)  # usable for the next call, whatever happened
    assert after.shape[0] == 1 and torch.isfinite(after).all()
    _pipeline_matches_plan(pipe, proxy.autofit.plan)


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
    _pipeline_matches_plan(pipe, proxy.autofit.plan)


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
    quality, balanced = (context(SDXL, Machine(0, 10**12), policy=p) for p in ("quality", "balanced"))
    plan, action, _ = next_plan(Plan("group_leaf_stream"), "denoise", host_oom=True, ctx=quality)
    assert action == "group_leaf_lowmem"
    # Nothing lossless needs less host RAM than pinning on the fly; fp8 halves it when allowed.
    _, none_left, _ = next_plan(plan, "denoise", host_oom=True, ctx=quality)
    _, action2, _ = next_plan(plan, "denoise", host_oom=True, ctx=balanced)
    assert none_left is None and action2 == "fp8"
    none, _, skipped = next_plan(Plan(), "denoise", host_oom=True, ctx=quality)
    assert none is None and all("host RAM" in r or "policy" in r or "disk" in r for _, r in skipped)
    assert dict(skipped)["group_disk"] == "free disk space at the offload folder is not known"


def test_host_oom_with_free_disk_streams_the_weights_from_disk():
    """With disk to write the weights to, a host OOM under the RAM-backed offloads goes to
    group_disk (lossless) before fp8; without enough disk it is skipped, saying why."""
    weights = sum(c.bytes for c in SDXL.components.values())
    roomy, cramped = (context(SDXL, Machine(0, 10**12, disk_available_bytes=d), policy="balanced")
                      for d in (4 * weights, weights // 4))
    plan, action, _ = next_plan(Plan("group_block"), "denoise", host_oom=True, ctx=roomy)
    assert action == "group_disk" and plan.placement == "group_disk"
    _, action, skipped = next_plan(Plan("group_block"), "denoise", host_oom=True, ctx=cramped)
    assert action == "fp8" and "GiB free at the offload folder" in dict(skipped)["group_disk"]


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


def _pipeline_state(pipe):
    """What autofit could change on a pipeline: each component object, its forward/decode (the
    callables, by identity), its hooks, and every parameter's storage, dtype and device."""
    state = {}
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            state[name] = id(module)
            continue
        state[name] = (
            id(module), module.__dict__.get("forward"), module.__dict__.get("decode"),
            [(n, len(m._forward_pre_hooks), len(m._forward_hooks), getattr(m, "_hf_hook", None),
              getattr(m, "_diffusers_hook", None)) for n, m in module.named_modules()],
            [(n, p.data_ptr(), p.dtype, p.device) for n, p in module.named_parameters()],
        )
    return state


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
    before = _pipeline_state(pipe)
    with pytest.raises(AutoFitUsageError, match=match):
        autofit(pipe, **options)
    assert _pipeline_state(pipe) == before


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
    switch_plan(proxy, Plan())
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
            exhausted += 1  # no reset(): the next call goes on from wherever the plan is
        finally:
            if fault is not None:
                fault.remove()
                ooms += fault.fired
        if fault is None:
            # A call without an OOM changes the plan only by a probe (one step back down), recorded.
            new = [r.action for r in proxy.autofit.history[before_hist:]]
            assert new in ([], ["probe", "relaxed"]) and (new or proxy.autofit.plan == before_plan)
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
    assert exhausted == 0  # every OOM here is a one-off: none may fail a call
    assert rss_slope < 32
    assert abs(tensor_slope) < 5
