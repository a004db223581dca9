"""The pure planner against the H200 measurements, and its invariants (property tests)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autofit.facts.footprint import ComponentFootprint, Footprint
from autofit.planning.context import Machine, PipelineFacts, Workload, context
from autofit.planning.cost import stage_peak, usable
from autofit.planning.ladder import next_plan
from autofit.plan import Plan
from autofit.planning.planner import choose, predict, rank
from autofit.planning.rungs import RUNGS
from autofit.facts.components import role_of

from footprints import FLUX, GIB, SDXL

SDXL_30 = Workload(steps=30, cfg=True)
FLUX_4 = Workload(steps=4, cfg=False)


def machine(gib, ram_gib=120):
    return Machine(budget_bytes=int(gib * GIB), host_available_bytes=int(ram_gib * GIB))


@pytest.mark.parametrize(
    "fp, wl, measured",
    [
        (SDXL, SDXL_30, {"encode": 6.61, "denoise": 6.92, "decode": 8.98}),
        (FLUX, FLUX_4, {"encode": 31.5, "denoise": 31.9, "decode": 33.9}),
    ],
)
def test_predicted_peaks_of_everything_on_device_match_the_h200(fp, wl, measured):
    """Stage peaks predicted for the no-offload plan are within 5% of those measured on an H200."""
    cand = predict(Plan(), context(fp, machine(140), wl))
    for stage, gib in measured.items():
        assert cand.peaks[stage] / GIB == pytest.approx(gib, rel=0.05)


def test_sdxl_prefers_model_offload_over_group_offload_when_the_unet_fits():
    """SDXL at 6 GiB: model offload (3.29 s measured) beats leaf group offload (7.12 s); partial
    residency beats both and is the pick."""
    best = choose(context(SDXL, machine(6), SDXL_30))
    assert best.plan.family == "resident_stream"
    mo = predict(Plan("model_offload"), context(SDXL, machine(6), SDXL_30))
    gl = predict(Plan("group_leaf_stream"), context(SDXL, machine(6), SDXL_30))
    assert mo.seconds < gl.seconds
    # Model offload's per-call transfer cost: 1.55 s (gpu-facts) and 2.7 s (our run 2) on H200s.
    overhead = mo.seconds - predict(Plan(), context(SDXL, machine(140), SDXL_30)).seconds
    assert 1.4 <= overhead <= 3.0


def test_flux_prefers_streamed_group_offload_over_model_offload():
    """Flux at 24 GiB: leaf group offload with streams (2.33 s) beats model offload (18.9 s)."""
    ctx = context(FLUX, machine(24), FLUX_4)
    best = choose(ctx)
    assert best.plan.family == "resident_stream"  # faster than either (test_residency.py)
    streamed = predict(Plan("group_leaf_stream"), ctx)
    assert predict(Plan("model_offload"), ctx).seconds > 3 * streamed.seconds


def test_sdxl_at_8gib_picks_tiling_that_really_tiles():
    """SDXL at 8 GiB: the decode is the only stage over; VAE tiling (7.22 GiB measured) is the oracle."""
    best = choose(context(SDXL, machine(8), Workload(steps=10)))
    assert best.names == ("vae_tiling",)
    assert best.peaks["decode"] / GIB == pytest.approx(7.222, rel=0.05)


def test_streams_need_host_ram():
    """With host RAM for one copy only, streamed group offload is not chosen."""
    best = choose(context(FLUX, machine(24, ram_gib=40), FLUX_4))
    assert best is not None and best.plan.placement not in ("group_leaf_stream",)


def test_quality_policy_never_picks_lossy_and_speed_may():
    """fp8 appears only under a lossy-allowing policy."""
    assert "fp8" not in choose(context(SDXL, machine(4), SDXL_30, policy="quality")).names
    fast = choose(context(SDXL, machine(4), SDXL_30, policy="speed"))
    assert fast.seconds <= choose(context(SDXL, machine(4), SDXL_30, policy="quality")).seconds


def test_nothing_fits_returns_none():
    """A budget below any plan's peak gives no pick rather than a wrong one."""
    assert choose(context(SDXL, machine(0.5), SDXL_30)) is None


def test_measured_activations_replace_estimates():
    """A measured decode activation replaces the estimate in the predicted peak."""
    est = predict(Plan(), context(SDXL, machine(140), SDXL_30)).peaks["decode"]
    meas = predict(Plan(), context(SDXL, machine(140), SDXL_30), measured={"decode": 1 * GIB}).peaks["decode"]
    assert est - meas == pytest.approx(est - SDXL.total - 1 * GIB, abs=GIB * 0.01)


sizes = st.floats(min_value=0.01, max_value=30)


@st.composite
def footprints(draw):
    comps = {}
    for name in ("unet", "text_encoder", "vae"):
        gib = draw(sizes)
        b = int(gib * GIB)
        leaf = max(1, int(b * draw(st.floats(0.001, 0.5))))
        block = max(leaf, int(b * draw(st.floats(0.01, 1.0))))
        comps[name] = ComponentFootprint(name, role_of(name), "X", b, leaf, block, int(b * 0.55), True,
                                         draw(st.integers(1, 3000)), "float16")
    return Footprint(comps)


@settings(max_examples=150, deadline=None)
@given(footprints(), st.floats(0.5, 80), st.floats(0.5, 80), st.sampled_from(["quality", "speed", "memory", "balanced"]))
def test_choice_fits_and_more_budget_is_never_slower(fp, small, extra, policy):
    """The pick fits the budget with its margin, and a larger budget never picks a slower plan."""
    wl = Workload(height=1024, width=1024, steps=20)
    a = choose(context(fp, machine(small), wl, policy=policy))
    b = choose(context(fp, machine(small + extra), wl, policy=policy))
    if a is not None:
        assert a.vram <= usable(int(small * GIB))
        if policy == "quality":
            assert a.quality != "lossy"
        assert b is not None
        if policy in ("quality", "speed"):
            assert b.seconds <= a.seconds + 1e-9
        if policy == "memory":
            fitting = [c for c in rank(context(fp, machine(small), wl, policy=policy)) if c.fits]
            lossless = [c.vram for c in fitting if c.quality != "lossy"]
            assert a.vram == min(lossless or [c.vram for c in fitting])
            assert (a.quality == "lossy") == (not lossless)  # lossy only when nothing lossless fits


@settings(max_examples=200, deadline=None)
@given(
    footprints(),
    st.sampled_from(["device", "model_offload", "group_block", "group_leaf", "group_leaf_stream"]),
    st.sets(st.sampled_from(["offload_encoders", "offload_for_decode", "vae_tiling", "vae_cpu", "vae_slicing"])),
    st.sampled_from(["load", "encode", "denoise", "decode"]),
    st.integers(1, 4),
)
def test_every_escalation_lowers_the_failing_stage_peak(fp, placement, extras, stage, batch):
    """Whatever the plan, the ladder's next plan strictly lowers the failing stage's peak."""
    plan = Plan(placement, frozenset())
    for e in sorted(extras):
        plan = plan.with_rung(e) if (placement == "device" or not e.startswith("offload")) else plan
    shape = Workload(batch=batch)
    ctx = context(fp, Machine(0, 10**15), shape, policy="balanced")
    new, action, skipped = next_plan(plan, stage, host_oom=False, ctx=ctx)
    if new is None:
        return
    old_r, old_a = stage_peak(plan, stage, fp, shape)
    new_r, new_a = stage_peak(new, stage, fp, shape)
    assert new_r <= old_r and new_a <= old_a and (new_r, new_a) != (old_r, old_a)
    assert action in RUNGS


def test_video_activations_follow_latent_frames_not_frames():
    """A 5 s 960x544 clip at 24 fps (121 frames) is 31 latent frames for the denoiser: its
    activations come to the guide's "~7-8 GB", not 121 images' worth (31.6 GiB before). The VAE
    decodes a latent frame or two at a time, so the decode estimate stops growing with length."""
    from autofit.planning.cost import activation_bytes

    clip = Workload(height=544, width=960, frames=121, cfg=False)
    assert clip.latent_frames == 31
    assert 7e9 <= activation_bytes("denoise", FLUX, clip) <= 9e9
    longer = Workload(height=544, width=960, frames=241, cfg=False)
    assert activation_bytes("decode", FLUX, longer) == activation_bytes("decode", FLUX, clip)
    image = Workload(height=544, width=960, cfg=False)
    assert activation_bytes("decode", FLUX, clip) == pytest.approx(8 * activation_bytes("decode", FLUX, image), abs=8)
    # A VAE that packs 8 frames a latent frame (LTX) halves the latent frames again.
    assert Workload(height=544, width=960, frames=121, temporal_factor=8).latent_frames == 16


def test_calls_that_leave_arguments_out_are_planned_with_the_pipeline_defaults():
    """Wan makes 81 frames at 832x480 when the call does not say: that is the workload planned."""
    from diffusers import WanPipeline

    from autofit.engine.preflight import call_defaults

    defaults = call_defaults(WanPipeline)
    assert (defaults["num_frames"], defaults["height"], defaults["width"]) == (81, 480, 832)


# ---- one rulebook: the planner and the ladder read the same rung table --------------------
@st.composite
def contexts(draw):
    """Random pipelines, machines and workloads (the pipeline facts and the machine included)."""
    fp = draw(footprints())
    facts = PipelineFacts(
        fp,
        has_offload_seq=draw(st.booleans()),
        vae_can_tile=draw(st.booleans()),
        vae_can_slice=draw(st.booleans()),
        fp8_supported=draw(st.booleans()),
        broken=frozenset(draw(st.sets(st.tuples(st.sampled_from(["fp8", "int8", "nf4"]),
                                                st.sampled_from(sorted(fp.components)))))),
        storage_locked=draw(st.sampled_from([None, "fp8", "nf4"])),
        has_bnb=draw(st.booleans()),
    )
    machine = Machine(
        budget_bytes=int(draw(st.floats(0.001, 100)) * GIB),
        host_available_bytes=int(draw(st.floats(0.001, 200)) * GIB),
        device_type=draw(st.sampled_from(["cuda", "cpu", "mps", "xpu"])),
        quant_missing=draw(st.sampled_from([None, "bitsandbytes is not installed"])),
        pinned_available_bytes=draw(st.one_of(st.none(), st.integers(0, 200 * GIB))),
    )
    wl = Workload(batch=draw(st.integers(1, 4)), steps=draw(st.integers(1, 50)))
    return context(fp, machine, wl, policy=draw(st.sampled_from(sorted(["quality", "speed", "memory", "balanced"]))),
                   pipeline=facts)


@settings(max_examples=150, deadline=None)
@given(contexts())
def test_a_plan_the_planner_calls_fitting_is_one_the_ladder_accepts(ctx):
    """For every candidate: if the planner says it fits, the ladder accepts each of its rungs from
    the plan without it; if the planner refuses it for a rung's reason, the ladder gives the same."""
    from autofit.planning.planner import candidate_plans
    from autofit.planning.rungs import refusal

    for plan in candidate_plans(ctx.footprint):
        cand = predict(plan, ctx)
        ladder = {n: refusal(n, plan.without(n).with_rung(n), ctx) for n in plan.names}
        if cand.fits:
            assert all(reason is None for reason in ladder.values()), (plan, ladder)
        elif not cand.why_not.startswith("predicted peak"):
            assert cand.why_not == next(r for r in ladder.values() if r), (plan, cand.why_not, ladder)


@pytest.mark.parametrize("mib", [4, 64, 512, 2048, 6144, 16384, 65536])
def test_a_pipeline_without_an_offload_sequence_never_gets_model_offload(mib):
    """diffusers refuses enable_model_cpu_offload() without model_cpu_offload_seq (a ValueError on
    every call): at any budget, neither the planner nor the ladder goes there."""
    for fp in (SDXL, FLUX):
        ctx = context(fp, Machine(mib * 2**20, 512 * GIB), SDXL_30, policy="speed",
                      pipeline=PipelineFacts(fp, has_offload_seq=False))
        assert all(c.plan.placement != "model_offload" for c in rank(ctx) if c.fits)
        pick = choose(ctx)
        assert pick is None or pick.plan.placement != "model_offload"
        for stage in ("load", "encode", "denoise"):
            plan = Plan()
            while plan is not None:
                assert plan.placement != "model_offload"
                plan, _, skipped = next_plan(plan, stage, host_oom=False, ctx=ctx)
            assert ("model_offload", "pipeline class has no model_cpu_offload_seq") in skipped or stage == "load"


# ---- escalations sized from the failed allocation -----------------------------------------
def _saving(old, new, stage, ctx):
    from autofit.planning.cost import activation_bytes

    def peak(p):
        r, f = stage_peak(p, stage, ctx.footprint, ctx.workload)
        return r + int(activation_bytes(stage, ctx.footprint, ctx.workload) * f)
    return peak(old) - peak(new)


def test_a_sized_escalation_jumps_to_the_first_rung_that_frees_enough():
    """Flux on a 24 GiB card, a denoise OOM short of 12 GiB: without a figure the ladder creeps
    (the first rung that lowers the peak at all); with it, it jumps to the first rung, in ladder
    order, predicted to free 12 GiB, passing over those that cannot, each with why."""
    ctx = context(FLUX, Machine(24 * GIB, 10**15), Workload(height=1024, width=1024), policy="quality")
    plan = Plan()
    creep, creep_rung, _ = next_plan(plan, "denoise", host_oom=False, ctx=ctx)
    need = 12 * GIB
    jump, rung, skipped = next_plan(plan, "denoise", host_oom=False, ctx=ctx, need=need)
    assert _saving(plan, jump, "denoise", ctx) >= need
    assert _saving(plan, creep, "denoise", ctx) < need  # creeping would have taken a rung too small
    small = [name for name, why in skipped if "less than the" in why]
    assert creep_rung in small
    # Nothing earlier in the ladder frees enough: the jump is the cheapest that does.
    from autofit.planning.ladder import LADDERS
    from autofit.planning.rungs import refusal, steps
    order = LADDERS["denoise"]
    for name in order[:order.index(rung)]:
        for cand in steps(name, plan):
            if refusal(name, cand, ctx) is None:
                assert _saving(plan, cand, "denoise", ctx) < need, name


def test_a_need_no_rung_meets_takes_the_lossless_rung_that_frees_most():
    """When no rung is predicted to free what was lacking, the lossless one that frees the most."""
    ctx = context(SDXL, Machine(8 * GIB, 10**15), Workload(height=1024, width=1024), policy="balanced")
    plan = Plan()
    new, rung, _ = next_plan(plan, "denoise", host_oom=False, ctx=ctx, need=1000 * GIB)
    assert RUNGS[rung].quality == "lossless"
    from autofit.planning.ladder import LADDERS
    from autofit.planning.rungs import refusal, steps
    for name in LADDERS["denoise"]:
        for cand in steps(name, plan):
            if refusal(name, cand, ctx) is None and RUNGS[name].quality == "lossless":
                assert _saving(plan, cand, "denoise", ctx) <= _saving(plan, new, "denoise", ctx), name


def test_shortfall_reads_the_figures_of_the_failed_allocation():
    """What the allocation lacked: asked less free (or less the per-process cap's room); 0 without figures."""
    from autofit.planning.explain import shortfall
    from autofit.testing import OOM_MESSAGES

    assert shortfall(OOM_MESSAGES["cuda"][1]) == int(1.5 * GIB)  # 2.00 GiB asked, 512 MiB free
    assert shortfall("cuDNN error: CUDNN_STATUS_ALLOC_FAILED") == 0
    capped = ("CUDA out of memory. Tried to allocate 100.00 MiB. GPU 0 has a total capacity of 80.00 GiB of which "
              "60.00 GiB is free. Including non-PyTorch memory, this process has 9.95 GiB memory in use. 10.00 GiB "
              "allowed; Of the allocated memory 9.90 GiB is allocated by PyTorch, and 0 bytes is reserved by "
              "PyTorch but unallocated.")
    assert abs(shortfall(capped) - (100 * 2**20 - 0.05 * GIB)) < 2**20


def test_room_at_failure_is_what_the_process_could_have_had():
    """The cap stated in the message, else free plus held; None without figures."""
    from autofit.planning.explain import room_at_failure
    from autofit.testing import OOM_MESSAGES

    spike = OOM_MESSAGES["cuda_spike"][1]  # 40 MiB free, this process 1.20 GiB
    assert abs(room_at_failure(spike) - (40 * 2**20 + 1.2 * GIB)) < 2**20
    assert room_at_failure("cuDNN error: CUDNN_STATUS_ALLOC_FAILED") is None
