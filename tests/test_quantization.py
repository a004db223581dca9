"""bitsandbytes nf4 / int8 rungs: sizes, placement rules, validation and rollback, planning.

Runs on the CPU with real tiny pipelines and bitsandbytes' CPU backend (>= 0.48)."""

import json

import pytest
import torch

from autofit import AutoFitUsageError, autofit
from autofit.facts.footprint import Footprint, measure
from dataclasses import replace

from autofit.planning.context import Machine, PipelineFacts, Workload, context
from autofit.planning.ladder import next_plan
from autofit.plan import Plan
from autofit.planning.planner import choose, predict, rank
from autofit.planning.rungs import refusal
from autofit.strategies.quantize import quantized_level
from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

from helpers import BUILDERS, DENOISER, mark_broken, run, rung_context, switch_plan
from footprints import FLUX, GIB, SDXL

pytest.importorskip("bitsandbytes")

TARGETS = {"flux": {"transformer", "text_encoder_2"}, "sdxl": {"unet"}}


def _param_bytes(module):
    """Weight bytes as stored, nf4's per-block scales (kept beside the weight) included."""
    total = 0
    for p in module.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def _levels(pipe):
    return {n: quantized_level(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("level", ["nf4", "int8"])
def test_quantized_components_and_sizes_match_the_footprint(kind, level):
    """The denoiser and T5 (not CLIP or the VAE) are quantized; their stored weight bytes are what
    the footprint predicted (within 5%)."""
    pipe = BUILDERS[kind]()
    fp = measure(pipe)
    proxy = autofit(pipe, plan=(level,), policy="balanced", cache=False)
    run(proxy, kind)
    levels = _levels(pipe)
    assert {n for n, lv in levels.items() if lv} == TARGETS[kind]
    assert all(lv == level for n, lv in levels.items() if n in TARGETS[kind])
    for name in TARGETS[kind]:
        predicted = fp.components[name].stored_bytes(level)
        actual = _param_bytes(getattr(pipe, name))
        assert abs(actual - predicted) <= 0.05 * predicted, (name, actual, predicted)
        assert actual < fp.components[name].bytes
    assert _param_bytes(getattr(pipe, DENOISER[kind])) < 0.7 * fp.components[DENOISER[kind]].bytes
    assert proxy.autofit.plan == (level,)
    assert proxy.autofit.last_call["plan"] == (level,)


def test_quantized_image_is_close_but_not_silently_equal(kind):
    """Lossy and said so: the plan names the rung, the image moves a little, not a lot."""
    reference = run(autofit(BUILDERS[kind](), cache=False), kind)
    image = run(autofit(BUILDERS[kind](), plan=("nf4",), policy="balanced", cache=False), kind)
    diff = abs(image - reference)
    assert diff.max() > 0
    assert diff.mean() < 0.1


def test_switching_storage_back_restores_weights_bit_for_bit():
    """int8 -> nf4 -> original: each switch undoes the last rung from the kept originals first."""
    pipe = tiny_flux()
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    proxy = autofit(pipe, plan=("int8",), policy="balanced", cache=False)
    run(proxy, "flux")
    assert quantized_level(pipe.transformer) == "int8"
    switch_plan(proxy, Plan(extras=frozenset({"nf4"})))
    assert quantized_level(pipe.transformer) == "nf4"
    switch_plan(proxy, Plan())
    assert quantized_level(pipe.transformer) is None and quantized_level(pipe.text_encoder_2) is None
    state = pipe.transformer.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    reference = run(autofit(tiny_flux(), cache=False), "flux")
    torch.testing.assert_close(run(proxy, "flux"), reference)


def test_quantized_components_stay_on_the_device_under_group_offload():
    """Group offloading would move bitsandbytes weights without their scales: quantized components
    are excluded from it and stay on the device; the others are group offloaded."""
    from autofit import _diffusers

    pipe = tiny_flux()
    proxy = autofit(pipe, plan=("nf4", "group_block"), policy="balanced", cache=False, device="cpu")
    image = run(proxy, "flux")
    assert _diffusers.group_offload_config(pipe.transformer) is None
    assert _diffusers.group_offload_config(pipe.text_encoder) is not None
    only_nf4 = run(autofit(tiny_flux(), plan=("nf4",), policy="balanced", cache=False), "flux")
    torch.testing.assert_close(image, only_nf4)


def test_a_component_quantized_on_the_device_is_moved_whole():
    """Quantizing layer by layer leaves the quantized layers on the device and the norms and
    embeddings behind; placement moves a component unless every parameter is already there
    (found on an H100: Flux's first parameter is a quantized Linear)."""
    from autofit.strategies.placement import place

    pipe = tiny_flux()
    meta = torch.device("meta")  # stands in for the accelerator: moving there allocates nothing
    pipe.transformer.x_embedder.to(meta)  # the first parameter is there already, the rest is not
    place(pipe, Plan(), meta)
    assert {p.device for p in pipe.transformer.parameters()} == {meta}


def _break_when_quantized(block):
    """A real RuntimeError from the block while its Linear layers hold bitsandbytes weights (what
    an op without a kernel for the packed dtype raises)."""

    def check(mod, args):
        if quantized_level(mod):
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Byte\'')

    return block.register_forward_pre_hook(check)


def test_a_component_broken_by_quantization_is_restored_and_marked(tmp_path):
    """nf4 breaks the transformer on its first run: it is restored bit for bit, T5 stays nf4, the
    call succeeds, and the next process leaves the transformer alone with the reason cached."""
    pipe = tiny_flux()
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    handle = _break_when_quantized(pipe.transformer.transformer_blocks[0])
    proxy = autofit(pipe, plan=("nf4",), cache=tmp_path, policy="balanced")
    run(proxy, "flux")
    handle.remove()
    rec = proxy.autofit.history[-1]
    assert (rec.action, rec.component, rec.oom_kind) == ("undo_nf4", "transformer", "none")
    assert quantized_level(pipe.transformer) is None and quantized_level(pipe.text_encoder_2) == "nf4"
    assert proxy.autofit.plan == ("nf4",)
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, original[key]), key
    records = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert any(r.get("broken") == {"nf4": ["transformer"]} for r in records)
    again = tiny_flux()
    second = autofit(again, cache=tmp_path, policy="balanced", max_vram="64GiB")
    mark_broken(second, "nf4", records[0]["broken"]["nf4"])
    switch_plan(second, Plan(extras=frozenset({"nf4"})))
    assert quantized_level(again.transformer) is None and quantized_level(again.text_encoder_2) == "nf4"


def test_a_user_quantized_pipeline_is_adopted_and_recovers():
    """A pipeline the user quantized keeps its bitsandbytes layers through an escalation to model
    offload; sequential offload is ruled out for it with the reason."""
    pipe = tiny_sdxl()
    from autofit.strategies.quantize import quantize_module

    quantize_module(pipe.unet, "nf4", torch.device("cpu"))  # as the user would have, before autofit
    proxy = autofit(pipe, cache=False, device="cpu")
    reference = run(autofit(pipe, cache=False, device="cpu", preflight=False), "sdxl")
    with inject_oom(proxy, stage="denoise", times=2):
        image = run(proxy, "sdxl")
    assert quantized_level(pipe.unet) == "nf4"
    assert [r.action for r in proxy.autofit.history][:2] == ["offload_encoders", "model_offload"]
    torch.testing.assert_close(image, reference)
    ctx = rung_context(proxy)
    assert refusal("sequential", Plan("sequential"), ctx) == \
        "bitsandbytes weights are not combined with sequential offload"


# ---- the planner and the ladder (pure) ----------------------------------------------------
MACHINE = dict(host_available_bytes=128 * GIB, device_type="cuda")
FLUX_WL = Workload(height=1024, width=1024, steps=4, cfg=False)


def test_the_planner_weighs_quantization_beside_offloading():
    """Flux-sized at 16 GiB: nf4 with the quantized weights on the device (no per-step transfers)
    is weighed beside offloading and beats leaf streaming; the quality policy picks a lossless plan; without bitsandbytes no
    quantized plan fits and the reason says why."""
    m = Machine(16 * GIB, **MACHINE)
    ranked = rank(context(FLUX, m, FLUX_WL, policy="speed"))
    nf4 = next(c for c in ranked if c.fits and c.plan.storage == "nf4")
    assert nf4.plan.placement == "device"
    assert nf4.seconds < predict(Plan("group_leaf_stream"), context(FLUX, m, FLUX_WL)).seconds
    fast = choose(context(FLUX, m, FLUX_WL, policy="speed"))  # partial residency is faster still
    assert fast is not None and fast.seconds <= nf4.seconds
    safe = choose(context(FLUX, m, FLUX_WL, policy="quality"))
    assert safe is not None and safe.plan.storage is None and safe.quality != "lossy"
    none = Machine(16 * GIB, quant_missing="bitsandbytes is not usable", **MACHINE)
    cand = predict(Plan(extras=frozenset({"nf4"})), context(FLUX, none, FLUX_WL, policy="speed"))
    assert not cand.fits and cand.why_not == "bitsandbytes is not usable"
    best = choose(context(FLUX, none, FLUX_WL, policy="speed"))
    assert best is not None and best.plan.storage in (None, "fp8")


def test_quantized_sizes_drive_the_predicted_peaks():
    """nf4 on the device holds the quantized denoiser and encoders; under group offload the
    quantized components stay resident through every stage; model offload moves them."""
    m = Machine(80 * GIB, **MACHINE)
    nf4 = predict(Plan(extras=frozenset({"nf4"})), context(FLUX, m, FLUX_WL, policy="speed"))
    full = predict(Plan(), context(FLUX, m, FLUX_WL, policy="speed"))
    saved = sum(c.bytes - c.nf4_bytes for c in FLUX.components.values() if c.quant_ok)
    assert full.peaks["denoise"] - nf4.peaks["denoise"] == saved
    int8_grouped = predict(Plan("group_leaf_stream", frozenset({"int8"})), context(FLUX, m, FLUX_WL, policy="speed"))
    resident = FLUX.components["transformer"].int8_bytes + FLUX.components["text_encoder_2"].int8_bytes
    assert int8_grouped.peaks["load"] == resident + FLUX.components["vae"].bytes
    assert int8_grouped.peaks["decode"] >= resident
    nf4_off = predict(Plan("model_offload", frozenset({"nf4"})), context(FLUX, m, FLUX_WL, policy="speed"))
    assert nf4_off.peaks["load"] == 0  # nf4 moves with its component


def test_ladder_reaches_quantization_only_when_it_lowers_the_peak():
    """With whole-component offloading ruled out (no host RAM for it), a denoise OOM lowers the
    UNet's residency as far as host RAM allows, then goes to fp8, which lets residency fall
    again; a broken or locked rung is skipped with why."""
    # Loaded from a checkpoint that serves as the undo copy (no copy kept in RAM), with 5 GiB of
    # host RAM: too little to offload all 6.5 GiB, enough to quantize the 4.8 GiB UNet.
    sdxl = Footprint({n: replace(c, restorable=True) for n, c in SDXL.components.items()})
    shape = Workload(batch=1, height=1024, width=1024)

    def ctx(footprint=sdxl, ram=5, policy="balanced", **pipeline):
        return context(footprint, Machine(0, int(ram * GIB)), shape, policy=policy,
                       pipeline=PipelineFacts(footprint, **pipeline))

    plan, action, skipped = next_plan(Plan(extras=frozenset({"offload_encoders"})), "denoise", host_oom=False, ctx=ctx())
    # Partial residency is lossless and holds only what it streams (2.5 GiB here): it comes first,
    # stepping down, before any lossy rung.
    assert action == "resident_stream"
    while action == "resident_stream":
        plan, action, skipped = next_plan(plan, "denoise", host_oom=False, ctx=ctx())
    assert action == "fp8" and plan.family == "resident_stream"
    assert dict(skipped)["resident_stream"].startswith("needs")  # streaming more needs more host RAM
    assert dict(skipped)["model_offload"].startswith("needs 6.5 GiB of host RAM")
    plan, action, skipped = next_plan(plan, "denoise", host_oom=False, ctx=ctx())
    assert action == "resident_stream"  # fp8 halved what streams: residency can fall again
    nf4 = Plan(extras=frozenset({"nf4"}))
    assert refusal("nf4", nf4, ctx(policy="quality")).startswith("lossy rung")
    broken = frozenset({("nf4", "unet"), ("nf4", "text_encoder_2")})
    assert refusal("nf4", nf4, ctx(ram=64, broken=broken)) == \
        "nf4 broke text_encoder_2, unet before (marked broken in the plan cache)"
    assert refusal("int8", Plan(extras=frozenset({"int8"})), ctx(ram=64, broken=broken)) is None
    assert refusal("nf4", nf4, ctx(ram=4)).startswith("host RAM cannot hold the full-precision")
    # Without the checkpoint as undo copy, the full-precision originals stay in host RAM too.
    assert refusal("nf4", nf4, ctx(footprint=SDXL, ram=6)).startswith("needs 6.1 GiB of host RAM")
    assert "cannot be swapped" in refusal("nf4", nf4, ctx(ram=64, storage_locked="fp8"))


def test_an_explicit_quantized_plan_needs_bitsandbytes_on_the_device():
    with pytest.raises(AutoFitUsageError, match="bitsandbytes"):
        autofit(tiny_sdxl(), plan=("nf4",), device="meta", cache=False)


def test_plans_store_weights_one_way_only():
    with pytest.raises(ValueError, match="stores weights one way"):
        Plan(extras=frozenset({"fp8", "nf4"}))
    assert Plan(extras=frozenset({"fp8"})).with_rung("nf4").extras == frozenset({"nf4"})
    assert Plan("model_offload", frozenset({"int8"})).names == ("int8", "model_offload")
    assert DENOISER["flux"] in TARGETS["flux"]


def test_int8_state_follows_the_weight_when_a_parent_module_moves():
    """A parent's .to() gives every int8 weight new storage through _apply (what model offload
    does each call). bitsandbytes' own layer keeps its quantization state on the old storage (its
    issue #1332: int8 weights never leave the GPU); autofit's layers point it at the moved weight."""
    import bitsandbytes as bnb

    from autofit.strategies.quantize import quantize_module

    def moved(follow):
        unet = tiny_sdxl().unet
        quantize_module(unet, "int8", torch.device("cpu"))
        layer = next(m for m in unet.modules() if isinstance(m, bnb.nn.Linear8bitLt))
        if not follow:
            layer.__class__ = bnb.nn.Linear8bitLt  # bitsandbytes' own class, as a user's loader makes it
        x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0))
        before = layer(x)  # the first forward moves CB/SCB into layer.state
        old = layer.state.CB.data_ptr()
        unet._apply(lambda t: t.clone())  # new storage for every tensor, as a device move gives
        return layer, old, before, x

    stock, old, _, _ = moved(follow=False)
    assert stock.state.CB.data_ptr() == old != stock.weight.data_ptr()  # the bug: old storage kept
    layer, old, before, x = moved(follow=True)
    assert layer.state.CB.data_ptr() == layer.weight.data_ptr() != old
    assert layer.state.SCB is not None and layer.state.idx is None
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_a_users_int8_layers_get_the_same_fix():
    """int8 layers of bitsandbytes' own class (as diffusers' loader makes them) are adopted with the
    fix, and a state an earlier move left behind is pointed at the weight."""
    import bitsandbytes as bnb
    import structlog

    from autofit.strategies.quantize import quantize_module

    pipe = tiny_sdxl()
    quantize_module(pipe.unet, "int8", torch.device("cpu"))
    layers = [m for m in pipe.unet.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for m in layers:
        m.__class__ = bnb.nn.Linear8bitLt
    first = layers[0]
    first(torch.randn(1, first.in_features))
    pipe.unet._apply(lambda t: t.clone())  # the user's earlier move: the state stays behind
    assert first.state.CB.data_ptr() != first.weight.data_ptr()
    with structlog.testing.capture_logs() as logs:
        proxy = autofit(pipe, cache=False, device="cpu")
    (event,) = [e for e in logs if e["event"] == "autofit.int8_state_follows_weight"]
    assert (event["component"], event["layers"]) == ("unet", len(layers))
    assert not any(type(m) is bnb.nn.Linear8bitLt for m in layers)
    assert first.state.CB.data_ptr() == first.weight.data_ptr()
    assert run(proxy, "sdxl").isfinite().all()
