"""Tests that kill the mutants mutmut made of engine/placement.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix; ``ǁ`` separates a class from its method). They drive a real
:class:`Placement` (behind a proxy of a tiny pipeline) and read what a user can observe: where
each weight is (``param.device`` of the real modules, on the simulated device of
autofit.testing.simdev where a move must be seen), the offload hooks on the components (read
through autofit._diffusers), the VAE's own settings, the images, and the events of
docs/logging.md. Faults are raised inside a real strategy (``autofit.engine.placement.place``,
the host shadows) or a real component (``inject_oom``).
"""

import pytest
import structlog
import torch

import autofit.engine.placement as placement_module
from autofit import _diffusers
from autofit.engine.placement import holds_hooks
from autofit.plan import Plan
from autofit.planning.context import Workload
from autofit.testing import inject_oom, oom_error, tiny_sdxl

from helpers import engine, forget_placement, mark_broken, one_way_rungs, placed_plan, run, switch_plan, wrap

STEP = {"num_inference_steps": 1}
LONG = "the strategy refused this placement: " + "x" * 300  # longer than an event's error field


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sim():
    """The simulated device, by its full name: the moves compare devices, and "sim" != "sim:0"."""
    from autofit.testing import simdev

    simdev.require()
    return torch.device("sim:0")


def _plan(placement="device", *extras):
    return Plan(placement, frozenset(extras))


def _devices(pipe):
    """component -> the devices its weights are on (read from the real modules)."""
    return {n: {str(p.device) for p in m.parameters()} for n, m in _diffusers.module_components(pipe).items()}


def _failing_place(monkeypatch, *errors):
    """``place`` (the strategy ``_apply`` uses) raises ``errors`` on its first calls, then places."""
    real, left = placement_module.place, list(errors)

    def place(*args, **kwargs):
        if left:
            raise left.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(placement_module, "place", place)


def _events(logs, name):
    return [e for e in logs if e["event"] == f"autofit.{name}"]


# ---- switch as a transaction ------------------------------------------------------------------
def test_a_switch_refused_by_a_strategy_puts_the_previous_plan_back_where_it_was(sim, monkeypatch):
    """A non-OOM failure while placing passes through untouched; the previous plan is in force and
    placed again, every weight on the device it was on, its hooks back, and ``rolled_back`` (WARNING)
    says which plan failed, why, and which plan is back. The next call makes the same image.
    mutants: engine.placement.xǁPlacementǁswitch__mutmut_13..18,
    engine.placement.xǁPlacementǁ_restore__mutmut_1..5, _restore__mutmut_27, _restore__mutmut_29..33,
    _restore__mutmut_35..51"""
    pipe = tiny_sdxl()
    previous = _plan("group_block", "vae_tiling")
    proxy = wrap(pipe, device=sim, cache=False, preflight=False, plan=previous.names)
    before = run(proxy, "sdxl", **STEP)
    where = _devices(pipe)
    error = ValueError(LONG)
    _failing_place(monkeypatch, error)
    target = _plan("model_offload", "vae_slicing")
    with structlog.testing.capture_logs() as logs, pytest.raises(ValueError) as raised:
        switch_plan(proxy, target)
    assert raised.value is error
    assert proxy.autofit.plan == previous.names and placed_plan(proxy) == previous
    assert _devices(pipe) == where
    assert _diffusers.group_offload_config(pipe.unet) is not None
    (event,) = _events(logs, "rolled_back")
    assert event["log_level"] == "warning" and event["stage"] == "load"
    assert event["action"] == ",".join(target.names) and event["plan"] == ",".join(previous.names)
    assert event["error"] == f"ValueError: {LONG[:200]}"
    assert not _events(logs, "rollback_failed")
    torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)


def test_a_rollback_that_fails_too_tears_down_and_the_first_error_passes_through(sim, monkeypatch):
    """Putting the previous plan back fails as well: ``rollback_failed`` (ERROR) with that second
    error, every weight on the CPU with no hooks, nothing placed; the first error is the one raised,
    and the next call places the plan in force again and makes the same image.
    mutants: engine.placement.xǁPlacementǁ_restore__mutmut_6..21, _restore__mutmut_24..26"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False, plan=("group_block",))
    before = run(proxy, "sdxl", **STEP)
    first, second = RuntimeError("the target cannot be placed"), RuntimeError("and neither can " + LONG)
    _failing_place(monkeypatch, first, second)
    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError) as raised:
        switch_plan(proxy, _plan("model_offload"))
    assert raised.value is first
    (event,) = _events(logs, "rollback_failed")
    assert event["log_level"] == "error" and event["stage"] == "load" and event["action"] == "tear_down"  # logging.md
    assert event["error"] == str(second)[:200]
    assert _events(logs, "rolled_back")[0]["plan"] == "group_block"
    assert all(d == {"cpu"} for d in _devices(pipe).values()) and not holds_hooks(pipe)
    assert placed_plan(proxy) is None and proxy.autofit.plan == ("group_block",)
    torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
    assert _diffusers.group_offload_config(pipe.unet) is not None


def test_an_oom_while_placing_is_returned_with_nothing_placed_and_the_next_call_recovers(sim, monkeypatch):
    """An OOM while placing is returned, not raised; the previous plan stays in force with nothing
    placed (no roll back), and the next call places it and makes the same image.
    mutants: engine.placement.xǁPlacementǁswitch__mutmut_3, switch__mutmut_10..12"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False, plan=("group_block",))
    before = run(proxy, "sdxl", **STEP)
    _failing_place(monkeypatch, oom_error())
    pl = engine(proxy).placement
    with structlog.testing.capture_logs() as logs:
        failure = pl.switch(_plan("model_offload"))
    assert failure is not None and "CUDA out of memory" in failure.head
    assert pl.plan == Plan("group_block") and pl.applied is None
    assert not _events(logs, "rolled_back")
    torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
    assert placed_plan(proxy) == Plan("group_block")


# ---- _apply: which moves a switch makes ---------------------------------------------------------
def test_a_switch_within_the_same_placement_moves_no_weight_and_sets_the_vae_as_the_plan_says(sim):
    """Between plans of one placement only the extras change: no component is moved (a move would
    go through the real module's ``_apply``, where ``inject_oom`` counts it), the VAE is tiled or
    sliced as the new plan says, and ``vae_cpu`` puts the VAE on the CPU under group offload.
    mutants: engine.placement.xǁPlacementǁswitch__mutmut_4, engine.placement.xǁPlacementǁ_apply__mutmut_10,
    _apply__mutmut_15, _apply__mutmut_19, _apply__mutmut_38, _apply__mutmut_24..29, _apply__mutmut_53,
    _apply__mutmut_54"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    switch_plan(proxy, _plan())
    for target in (_plan("device", "vae_tiling"), _plan("device", "vae_slicing")):
        with inject_oom(proxy, stage="load", component="unet", expect_fire=False) as moves:
            switch_plan(proxy, target)
        assert moves.calls == 0
        assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == ("vae_tiling" in target.extras, "vae_slicing" in target.extras)
    switch_plan(proxy, _plan("device", "offload_encoders"))
    assert _devices(pipe)["text_encoder"] == {"cpu"} and _devices(pipe)["unet"] == {str(sim)}
    switch_plan(proxy, _plan())
    assert all(d == {str(sim)} for d in _devices(pipe).values())
    switch_plan(proxy, _plan("group_block"))
    with inject_oom(proxy, stage="load", component="unet", expect_fire=False) as moves:
        switch_plan(proxy, _plan("group_block", "vae_cpu"))
    assert moves.calls == 0
    assert _devices(pipe)["vae"] == {"cpu"} and _diffusers.group_offload_config(pipe.unet) is not None


@pytest.mark.parametrize("offload", ["group_block", "model_offload"])
def test_leaving_an_offload_plan_for_the_device_takes_its_hooks_off(sim, offload):
    """From an offload plan to everything on the device: no offload hook is left on any component
    and every weight is on the device.
    mutants: engine.placement.x_holds_hooks__mutmut_2..6, engine.placement.xǁPlacementǁ_apply__mutmut_30,
    _apply__mutmut_31, engine.placement.xǁPlacementǁ_replace__mutmut_33"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    switch_plan(proxy, _plan(offload))
    assert holds_hooks(pipe)
    switch_plan(proxy, _plan())
    comps = _diffusers.module_components(pipe).values()
    assert not any(_diffusers.has_accelerate_hooks(m) or _diffusers.group_offload_config(m) for m in comps)
    assert all(d == {str(sim)} for d in _devices(pipe).values())


def test_placing_a_pipeline_already_on_the_device_makes_no_round_trip_through_the_cpu(sim):
    """"From a plain pipeline: no tear-down round trip through the CPU, only the moves": the
    device counts no byte sent back to the host.
    mutants: engine.placement.x_holds_hooks__mutmut_5, engine.placement.xǁPlacementǁ_apply__mutmut_32,
    _apply__mutmut_33, _apply__mutmut_35"""
    from autofit.testing import simdev

    pipe = tiny_sdxl().to(sim)
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    simdev.reset_counters()
    switch_plan(proxy, _plan())
    assert simdev.counters()["d2h_bytes"] == 0
    assert all(d == {str(sim)} for d in _devices(pipe).values())
    forget_placement(proxy)
    simdev.reset_counters()
    switch_plan(proxy, _plan())
    assert simdev.counters()["d2h_bytes"] == 0


def test_the_first_placement_moves_every_component_as_a_load_would():
    """``force``: the first placement calls ``.to()`` even on a component already where it belongs
    (the CPU here), so an OOM of that move is met, and recovered from, as at a real load.
    mutants: engine.placement.xǁPlacementǁ_apply__mutmut_39, _apply__mutmut_43, _apply__mutmut_44"""
    reference = run(tiny_sdxl(), "sdxl", **STEP)
    proxy = wrap(tiny_sdxl(), device="cpu", cache=False, preflight=False)
    with inject_oom(proxy, stage="load", expect_fire=True) as fault:
        image = run(proxy, "sdxl", **STEP)
    assert fault.fired == 1 and proxy.autofit.history[0].stage == "load"
    torch.testing.assert_close(image, reference)


def test_a_placement_for_a_known_latent_tiles_at_half_its_shorter_side(sim):
    """vae.py: the tile is chosen from the latent decoded (half the shorter side), from the
    workload handed to ``place``.
    mutants: engine.placement.xǁPlacementǁplace__mutmut_12, place__mutmut_14, engine.placement.xǁPlacementǁswitch__mutmut_6,
    engine.placement.xǁPlacementǁ_apply__mutmut_55, _apply__mutmut_61"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    engine(proxy).placement.place(_plan("device", "vae_tiling"), Workload(latent_hw=(24, 40)))
    assert pipe.vae.use_tiling and pipe.vae.tile_latent_min_size == 12
    assert pipe.vae.tile_sample_min_size == 12 * pipe.vae_scale_factor


# ---- _replace: storage rungs and pinned copies ----------------------------------------------------
def test_leaving_a_streamed_plan_unpins_its_copies_and_says_how_much(sim):
    """Weights left in a streamed plan's pinned copies are made pageable under a plan that keeps
    them in host RAM; ``unpinned`` (INFO) gives the plan and the GiB (the device's pinned count).
    mutants: engine.placement.xǁPlacementǁ_replace__mutmut_4..25"""
    from autofit.testing import simdev

    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    switch_plan(proxy, _plan("group_leaf_stream"))
    pinned = simdev.counters()["pinned_bytes"]
    assert pinned > 0
    target = _plan("group_block", "vae_tiling")
    with structlog.testing.capture_logs() as logs:
        switch_plan(proxy, target)
    assert not any(p.is_pinned() for p in pipe.unet.parameters())
    (event,) = _events(logs, "unpinned")
    assert event["log_level"] == "info" and event["stage"] == "load"
    assert event["action"] == ",".join(target.names) and event["gib"] == round(pinned / 2**30, 3)


def test_fp8_is_not_applied_to_a_component_it_broke_and_switching_it_off_restores_the_weights():
    """A component fp8 broke keeps its weights under a plan with fp8; a switch off fp8 restores the
    original weights bit for bit.
    mutants: engine.placement.xǁPlacementǁ_apply__mutmut_4, engine.placement.xǁPlacementǁ_replace__mutmut_26"""
    original = tiny_sdxl().unet.state_dict()
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False)
    mark_broken(proxy, "fp8", {"unet"})
    switch_plan(proxy, _plan("device", "fp8"))
    assert not one_way_rungs(proxy) and all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False)
    switch_plan(proxy, _plan("device", "fp8"))
    assert pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    switch_plan(proxy, _plan())
    for key, value in pipe.unet.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


# ---- place, check_intact, forget ----------------------------------------------------------------
def test_the_vae_stays_on_the_cpu_at_each_call_under_model_offload_with_vae_cpu():
    """diffusers re-hooks every component after a call; the next call takes the VAE's hooks off
    again before it decodes (``vae_cpu``: the VAE lives and runs on the CPU).
    mutants: engine.placement.xǁPlacementǁplace__mutmut_3, place__mutmut_5"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False, plan=("model_offload", "vae_cpu"))
    hooked = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: hooked.append(_diffusers.has_accelerate_hooks(pipe.vae)))
    run(proxy, "sdxl", **STEP)
    assert _diffusers.has_accelerate_hooks(pipe.vae)  # diffusers put them back after the call
    run(proxy, "sdxl", **STEP)
    assert hooked == [False, False]


def test_an_oom_re_asserting_residency_is_recovered_and_another_error_passes_through(sim):
    """``offload_for_decode`` moves the denoiser off the device for the decode; the next call
    brings it back. An OOM there is recovered from (the call makes the same image); any other
    error passes through.
    mutants: engine.placement.xǁPlacementǁplace__mutmut_8..10"""
    for error in (oom_error(), ValueError("the user's own error")):
        pipe = tiny_sdxl()
        proxy = wrap(pipe, device=sim, cache=False, preflight=False, plan=("offload_for_decode",))
        before = run(proxy, "sdxl", **STEP)
        assert _devices(pipe)["unet"] == {"cpu"}
        shadows = engine(proxy).placement.shadows

        def onload(module, error=error, shadows=shadows):
            del shadows.onload  # once
            raise error

        shadows.onload = onload
        if isinstance(error, ValueError):
            with pytest.raises(ValueError, match="the user's own error"):
                run(proxy, "sdxl", **STEP)
        else:
            torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
            assert proxy.autofit.history[-1].stage == "load"


def test_a_placement_still_in_place_is_kept_and_one_taken_down_behind_autofits_back_is_redone():
    """check_intact: at the next call, group offload still on the components is not placed again
    (no move of the denoiser); taken off behind autofit's back, it is placed again, same image.
    mutants: engine.placement.xǁPlacementǁcheck_intact__mutmut_1, check_intact__mutmut_3..5,
    check_intact__mutmut_8, engine.placement.xǁPlacementǁforget__mutmut_1"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False, plan=("group_block",))
    before = run(proxy, "sdxl", **STEP)
    with inject_oom(proxy, stage="load", component="unet", expect_fire=False) as moves:
        run(proxy, "sdxl", **STEP)
    assert moves.calls == 0
    forget_placement(proxy)
    torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
    assert placed_plan(proxy) == Plan("group_block")

    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False, plan=("model_offload",))
    before = run(proxy, "sdxl", **STEP)
    pipe.remove_all_hooks()  # as another pipeline sharing the components (or the user) would
    assert not holds_hooks(pipe)
    torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
    assert _diffusers.has_accelerate_hooks(pipe.unet) and placed_plan(proxy) == Plan("model_offload")


# ---- the moves around each stage ------------------------------------------------------------------
def test_the_encoders_visit_the_device_to_encode_and_the_rest_leave_it_for_the_decode(sim):
    """``offload_encoders``: each text encoder is on the device while it encodes and back on the
    CPU before the denoiser runs; ``offload_for_decode``: the denoiser is off the device while the
    VAE decodes; ``vae_tiling`` tiles at half the latent's side: the image of the raw pipeline tiled so.
    mutants: engine.placement.xǁPlacementǁ__init____mutmut_22, __init____mutmut_50, __init____mutmut_51,
    engine.placement.xǁPlacementǁrefresh_components__mutmut_2, engine.placement.xǁPlacementǁbefore__mutmut_3..5,
    engine.placement.xǁPlacementǁafter__mutmut_3..5"""
    raw = tiny_sdxl()
    latent = 64 // raw.vae_scale_factor  # the call's 64 px, in latent pixels
    raw.vae.enable_tiling()
    raw.vae.tile_latent_min_size, raw.vae.tile_sample_min_size = latent // 2, latent // 2 * raw.vae_scale_factor
    reference = run(raw, "sdxl", **STEP)
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device=sim, cache=False, preflight=False,
                 plan=("offload_encoders", "offload_for_decode", "vae_tiling"))
    seen = []
    first = next(iter(pipe.text_encoder.children()))  # its hooks run after the stage wrapper's
    first.register_forward_pre_hook(lambda m, a: seen.append(("encode", _devices(pipe)["text_encoder"])))
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(("denoise", _devices(pipe)["text_encoder"])))
    pipe.vae.decoder.register_forward_pre_hook(
        lambda m, a: seen.append(("decode", _devices(pipe)["unet"], pipe.vae.tile_latent_min_size)))
    image = run(proxy, "sdxl", **STEP)
    assert seen[0] == ("encode", {str(sim)}) and seen[1] == ("denoise", {"cpu"})
    assert seen[-1] == ("decode", {"cpu"}, max(latent // 2, 4))
    torch.testing.assert_close(image.cpu(), reference, rtol=1e-4, atol=1e-4)


# ---- one-way undo ---------------------------------------------------------------------------------
def test_undoing_fp8_on_a_component_keeps_the_plans_other_rungs():
    """A component fp8 broke is restored; the plan drops fp8 and keeps its other rungs.
    mutants: engine.placement.xǁPlacementǁundo_one_way__mutmut_15"""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, device="cpu", cache=False, preflight=False, plan=("fp8", "vae_tiling"))
    run(proxy, "sdxl", **STEP)
    rung, plan = engine(proxy).placement.undo_one_way("unet")
    assert rung == "fp8" and plan == _plan("device", "vae_tiling")
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert engine(proxy).placement.broken == {"fp8": {"unet"}}


# ---- reshape -------------------------------------------------------------------------------------
def test_a_loader_sees_plain_modules_and_weights_plainly_on_the_device_stay_there(sim):
    """reshape: with everything on the device (placed, or put there by the user before the first
    call) the loader runs with the weights where they are, and the placement stays; under an
    offload plan, or with streamed host copies, it runs on torn-down modules (no hooks, weights on
    the CPU), and the next call places the plan again and makes the same image.
    mutants: engine.placement.xǁPlacementǁreshape__mutmut_1..9, reshape__mutmut_11..13,
    engine.placement.x_holds_hooks__mutmut_5"""

    def devices_during(proxy, pipe):
        seen = []
        engine(proxy).reshape(lambda: seen.append((_devices(pipe), holds_hooks(pipe))))
        return seen[0]

    pipe = tiny_sdxl().to(sim)
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    on_device = {n: {str(sim)} for n in _diffusers.module_components(pipe)}
    assert devices_during(proxy, pipe) == (on_device, False)  # not placed yet, plainly on the device
    run(proxy, "sdxl", **STEP)
    assert devices_during(proxy, pipe) == (on_device, False) and placed_plan(proxy) == Plan()

    on_cpu = {n: {"cpu"} for n in _diffusers.module_components(pipe)}
    for plan in (("group_block",), ("offload_encoders",)):
        pipe = tiny_sdxl()
        proxy = wrap(pipe, device=sim, cache=False, preflight=False, plan=plan)
        before = run(proxy, "sdxl", **STEP)
        assert devices_during(proxy, pipe) == (on_cpu, False) and placed_plan(proxy) is None
        torch.testing.assert_close(run(proxy, "sdxl", **STEP), before)
        assert placed_plan(proxy) == Plan.from_names(plan)


# ---- adopted offloading, int8 adoption ------------------------------------------------------------
def test_offloading_enabled_by_the_user_is_the_plan_in_force_and_already_placed(sim):
    """Offloading enabled before wrapping, or through the proxy after, is adopted: the plan in
    force, placed as it is (the first call does not place it again).
    mutants: engine.placement.xǁPlacementǁ__init____mutmut_3, __init____mutmut_5, __init____mutmut_6,
    engine.placement.xǁPlacementǁadopt__mutmut_1"""
    pipe = tiny_sdxl()
    pipe.enable_model_cpu_offload(device=sim)
    proxy = wrap(pipe, device=sim, cache=False, preflight=False)
    assert proxy.autofit.plan == ("model_offload",) and placed_plan(proxy) == Plan("model_offload")
    proxy = wrap(tiny_sdxl(), device=sim, cache=False, preflight=False)
    proxy.enable_model_cpu_offload(device=sim)
    assert proxy.autofit.plan == ("model_offload",) and placed_plan(proxy) == Plan("model_offload")


def test_a_users_int8_layers_are_adopted_with_an_event():
    """``int8_state_follows_weight`` (INFO, at load) names the component and how many layers.
    mutants: engine.placement.xǁPlacementǁ__init____mutmut_25..29, __init____mutmut_31..34,
    __init____mutmut_36..41"""
    import bitsandbytes as bnb

    from autofit.strategies.quantize import quantize_module

    pipe = tiny_sdxl()
    quantize_module(pipe.unet, "int8", torch.device("cpu"))
    layers = [m for m in pipe.unet.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for m in layers:
        m.__class__ = bnb.nn.Linear8bitLt  # as diffusers' loader makes them
    with structlog.testing.capture_logs() as logs:
        wrap(pipe, device="cpu", cache=False)
    (event,) = _events(logs, "int8_state_follows_weight")
    assert (event["component"], event["layers"], event["action"]) == ("unet", len(layers), "adopt")  # logging.md
    assert event["log_level"] == "info" and event["stage"] == "load"


def test_the_one_way_rungs_honour_the_callers_caps():
    """``max_ram``: with no host RAM to spare, fp8 keeps no undo copy (``fp8_cast`` names nothing
    ``reversible``); ``max_vram``: the ``quantized`` event's ``budget_gib`` honours it (logging.md).
    mutants: engine.placement.xǁPlacementǁ__init____mutmut_13..15"""
    proxy = wrap(tiny_sdxl(), device="cpu", cache=False, preflight=False, max_ram="1MiB")
    with structlog.testing.capture_logs() as logs:
        switch_plan(proxy, _plan("device", "fp8"))
    (event,) = _events(logs, "fp8_cast")
    assert event["components"] == "unet" and "reversible" not in event
    assert one_way_rungs(proxy)["unet"].undo is None
    proxy = wrap(tiny_sdxl(), device="cpu", cache=False, preflight=False, max_vram="1GiB")
    with structlog.testing.capture_logs() as logs:
        switch_plan(proxy, _plan("device", "int8"))
    (event,) = _events(logs, "quantized")
    assert event["components"] == "unet" and event["budget_gib"] == 1.0
