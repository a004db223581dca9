"""Partial residency (resident_stream:N): the plan and its name, the cost model, the ladder's
steps, and the mechanism on real tiny pipelines on the CPU (the same hooks run there, without a
stream; pinning and copy overlap need a GPU and are checked by benchmarks/residency_sweep.py)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autofit import autofit
from autofit.facts.cache import PlanCache
from autofit.planning.context import Machine, Workload, context
from autofit.planning.cost import host_bytes, pinned_bytes, resident_split
from autofit.errors import AutoFitUsageError
from autofit.planning.ladder import next_plan
from autofit.plan import Plan
from autofit.planning.planner import choose, predict
from autofit.strategies import tear_down
from autofit.strategies import partial
from autofit.strategies.placement import place
from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

from helpers import CALL_KWARGS, DENOISER, PROMPT, judged_as, run, switch_plan, wrap
from footprints import FLUX, GIB, SDXL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # header_folder, sized

FLUX_28 = Workload(steps=28, cfg=False)
SDXL_30 = Workload(steps=30, cfg=True)


def cuda(gib, ram=120):
    return Machine(int(gib * GIB), int(ram * GIB))


_RAW: dict[str, torch.Tensor] = {}


def raw(kind):
    """A clean run of the raw pipeline (no autofit), everything where it was built (the CPU)."""
    if kind not in _RAW:
        pipe = (tiny_sdxl if kind == "sdxl" else tiny_flux)()
        _RAW[kind] = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL_KWARGS[kind]).images
    return _RAW[kind]


def hooks_left(pipe):
    return [n for m in pipe.components.values() if isinstance(m, torch.nn.Module) for n, sub in m.named_modules()
            if getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook.get_hook(partial.HOOK)]


# ---- the plan and its name ------------------------------------------------------------------
def test_the_resident_amount_round_trips_through_names():
    """resident_stream:N is one hashable placement whose names rebuild the same plan."""
    plan = Plan.from_names(["resident_stream:40", "vae_tiling"])
    assert plan.family == "resident_stream" and plan.resident == 40
    assert plan.names == ("resident_stream:40", "vae_tiling")
    assert Plan.from_names(list(plan.names)) == plan and hash(Plan.from_names(plan.names)) == hash(plan)
    assert Plan("resident_stream:40") != Plan("resident_stream:41")
    assert Plan.from_names(["resident_stream"]).resident == 50  # the bare rung: its default
    assert plan.without("resident_stream") == Plan(extras=frozenset({"vae_tiling"}))


@pytest.mark.parametrize("name", ["resident_stream:0", "resident_stream:100", "resident_stream:x",
                                  "resident_stream:-5", "vae_tiling:3"])
def test_a_bad_resident_amount_is_refused_with_what_is_allowed(name):
    """Out of range, not a number, or a quantity on a rung that takes none: a ValueError saying why."""
    with pytest.raises(ValueError, match="percent|take a quantity"):
        Plan.from_names([name])


def test_autofit_refuses_a_bad_starting_amount():
    """The user's plan= gets the same clear error, as a usage error."""
    with pytest.raises(AutoFitUsageError, match="whole number from 5 to 99"):
        autofit(tiny_sdxl(), device="cpu", plan=("resident_stream:150",))


def test_the_plan_cache_keeps_the_amount(tmp_path):
    """The cache stores names; the plan read back has the same resident amount."""
    plan = Plan("resident_stream:37", frozenset({"vae_tiling", "split_batch"}))
    cache = PlanCache(tmp_path)
    cache.put("k", {"plan": list(plan.names)})
    assert Plan.from_names(tuple(cache.get("k")["plan"])) == plan


# ---- the cost model -------------------------------------------------------------------------
def test_pinned_ram_is_the_streamed_bytes_and_resident_weights_keep_no_host_copy():
    """Pinned = streamed (not 1.3-1.6x of every tensor, as leaf streaming pins), host = pinned."""
    plan = Plan("resident_stream:60")
    split = resident_split(plan, FLUX)
    streamed = sum(s for _, s in split.values())
    assert pinned_bytes(plan, FLUX) == streamed
    assert host_bytes(plan, FLUX) == streamed
    assert split["transformer"][0] == pytest.approx(0.6 * FLUX.components["transformer"].bytes, rel=0.01)
    assert split["text_encoder_2"][1] > 0.95 * FLUX.components["text_encoder_2"].bytes  # T5 streams whole
    assert split["text_encoder"][1] == 0 and split["vae"][1] == 0  # small ones stay resident
    assert streamed < pinned_bytes(Plan("group_leaf_stream"), FLUX) / 1.5


def test_more_memory_is_faster_and_close_to_the_device_at_24_gib():
    """Flux-sized: predicted seconds fall strictly from 8 to 12 to 16 to 24 GiB and come within
    1.35x of everything on the device at 24; SDXL-sized at 6 GiB within 1.35x."""
    device = predict(Plan(), context(FLUX, cuda(200), FLUX_28)).seconds
    secs = []
    for gib in (8, 12, 16, 24):
        pick = choose(context(FLUX, cuda(gib), FLUX_28))
        assert pick is not None and pick.plan.family == "resident_stream"
        secs.append(pick.seconds)
    assert secs == sorted(secs, reverse=True) and len(set(secs)) == 4
    assert secs[-1] <= 1.35 * device
    sdxl = choose(context(SDXL, cuda(6), SDXL_30))
    assert sdxl.seconds <= 1.35 * predict(Plan(), context(SDXL, cuda(200), SDXL_30)).seconds


def test_the_planner_keeps_as_much_resident_as_fits():
    """The chosen amount fits and one percent more would not."""
    ctx = context(FLUX, cuda(16), FLUX_28)
    pick = choose(ctx)
    more = replace(pick.plan, placement=f"resident_stream:{pick.plan.resident + 1}")
    assert pick.fits and not predict(more, ctx).fits


def test_an_oom_lowers_residency_by_quarters_before_the_family_changes():
    """Each denoise OOM keeps at most 3/4 of the resident amount; below the floor, another family."""
    ctx = context(FLUX, cuda(0.001), FLUX_28)  # nothing is predicted to fit: plain steps down
    plan, seen = Plan("resident_stream:88"), [88]
    while plan.family == "resident_stream":
        plan, rung, _ = next_plan(plan, "denoise", host_oom=False, ctx=ctx)
        assert plan is not None
        if plan.family == "resident_stream":
            assert rung == "resident_stream" and plan.resident <= 0.75 * seen[-1]
            seen.append(plan.resident)
    assert len(seen) > 2 and seen[-1] >= 5 and plan.placement == "group_leaf_stream"


def test_an_oom_jumps_to_the_first_quarter_step_predicted_to_fit():
    """From the whole device, the ladder lands on the most resident step the budget holds."""
    ctx = context(FLUX, cuda(16), FLUX_28)
    plan, rung, _ = next_plan(Plan(extras=frozenset({"offload_encoders"})), "denoise", host_oom=False, ctx=ctx)
    assert rung == "resident_stream" and predict(plan, ctx).fits
    assert not predict(replace(plan, placement=f"resident_stream:{int(plan.resident / 0.75) + 1}"), ctx).fits


def test_the_cpu_device_gets_no_residency_rung():
    """On the CPU the device's memory is the host's: the rung is refused, with why."""
    ctx = context(SDXL, Machine(8 * GIB, 16 * GIB, device_type="cpu"), SDXL_30)
    _, _, skipped = next_plan(Plan(extras=frozenset({"offload_encoders"})), "denoise", host_oom=False, ctx=ctx)
    assert "host's" in dict(skipped)["resident_stream"]


# ---- chunks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[3 << 20] * 700, [1 << 30, 5 << 20, 7, 1 << 29], [123457] * 9 + [64 << 20]])
def test_chunks_under_a_power_of_two_allocator_waste_little(sizes):
    """Chunks sized so torch's pinned allocator (which rounds each block up to a power of two)
    holds at most 1.1x the streamed bytes, in few blocks; no two tensors overlap."""
    used, where = partial.pack(sizes)
    rounded = sum(1 << (n - 1).bit_length() for n in used)
    assert rounded <= 1.1 * sum(sizes) + 512 * len(sizes)
    assert len(used) <= 24
    spans = sorted((c, off, off + n) for (c, off), n in zip(where, sizes))
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))
    assert all(off + n <= used[c] for (c, off), n in zip(where, sizes))


# ---- the mechanism, on tiny pipelines on the CPU ----------------------------------------------
def test_a_partly_resident_pipeline_gives_the_raw_pipelines_output(kind):
    """resident_stream:40 (denoiser 40% resident, T5 streamed whole) equals a clean raw run."""
    pipe = (tiny_sdxl if kind == "sdxl" else tiny_flux)()
    proxy = autofit(pipe, device="cpu", plan=("resident_stream:40",), cache=False)
    image = run(proxy, kind)
    torch.testing.assert_close(image, raw(kind))
    s = partial.streamer_of(getattr(pipe, DENOISER[kind]))
    assert s is not None and s.units and s.streamed_bytes > 0
    total = s.resident_bytes + s.streamed_bytes
    assert s.resident_bytes <= 0.45 * total  # 40% asked; units are whole
    if kind == "flux":  # the T5 encoder streams whole: only what lies outside its blocks stays
        t5 = partial.streamer_of(pipe.text_encoder_2)
        assert t5 is not None and t5.streamed_bytes > 0.3 * (t5.streamed_bytes + t5.resident_bytes)
    # Between calls the streamed weights sit in the chunks, off the device's tensors.
    first = s.units[0].slots[0]
    chunk_ptrs = [(c.data_ptr(), c.data_ptr() + c.numel()) for c in s.chunks]
    ptr = first[0][first[1]].data_ptr()
    assert any(lo <= ptr < hi for lo, hi in chunk_ptrs)


def test_prefetch_follows_the_execution_order_learned_on_the_first_pass():
    """Units are prefetched in the order they ran (a UNet runs resnets and attentions interleaved,
    not in registration order), and every prefetched copy is the one the unit then uses."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, device="cpu", plan=("resident_stream:20",), cache=False)
    run(proxy, "sdxl")  # placed at the first call
    s = partial.streamer_of(pipe.unet)
    ran = []
    hooks = [u.module.register_forward_pre_hook(lambda m, a, u=u: ran.append(u)) for u in s.units]
    used_prefetched = []
    onload = s._onload
    s._onload = lambda u: (used_prefetched.append(u.pending is not None), onload(u))[1]
    run(proxy, "sdxl")
    for h in hooks:
        h.remove()
    first_pass = ran[: len(s.units)]
    assert s._order == first_pass
    assert first_pass != s.units  # registration order differs: the learned one matters
    assert sum(used_prefetched[len(s.units):]) >= 0.9 * len(used_prefetched[len(s.units):])


def test_the_injected_allocator_gets_few_chunks_holding_only_the_streamed_weights():
    """The pinned path, with the allocator injected (pinning needs CUDA): chunks sum to the
    streamed bytes (plus alignment), and resident weights are not in them."""
    asked = []

    def alloc(n):
        asked.append(n)
        return torch.empty(n, dtype=torch.uint8)

    pipe = tiny_flux()
    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    streamers = partial.apply(comps, torch.device("cpu"), 30, allocator=alloc, pinned=False)
    streamed = sum(s.streamed_bytes for s in streamers.values())
    assert streamed > 0 and sum(asked) <= streamed + 512 * sum(len(u.slots) for s in streamers.values()
                                                              for u in s.units)
    assert len(asked) <= 3 * len(streamers) + 8
    for s in streamers.values():
        spans = [(c.data_ptr(), c.data_ptr() + c.numel()) for c in s.chunks]
        tensors = {id(t): t for t in (*s.module.parameters(), *s.module.buffers())}.values()
        in_chunks = sum(t.numel() * t.element_size() for t in tensors
                        if any(lo <= t.data_ptr() < hi for lo, hi in spans))
        assert in_chunks == s.streamed_bytes  # and nothing resident in them
    partial.remove(comps)


def test_teardown_restores_the_original_placement_exactly():
    """Place partly resident, run, tear down: the same tensors' values, on the CPU, in ordinary
    memory (no chunk views), every hook gone, nothing left on the modules."""
    pipe = tiny_flux()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()}
              for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    place(pipe, Plan("resident_stream:30"), torch.device("cpu"))
    run(pipe, "flux")
    chunks = [c for m in pipe.components.values() if isinstance(m, torch.nn.Module) and partial.streamer_of(m)
              for c in partial.streamer_of(m).chunks]
    spans = [(c.data_ptr(), c.data_ptr() + c.numel()) for c in chunks]
    tear_down(pipe)
    assert not hooks_left(pipe)
    for n, m in pipe.components.items():
        if not isinstance(m, torch.nn.Module):
            continue
        assert partial.streamer_of(m) is None
        for k, v in m.state_dict().items():
            assert v.device.type == "cpu"
            assert not any(lo <= v.data_ptr() < hi for lo, hi in spans), f"{n}.{k} still a chunk view"
            torch.testing.assert_close(v, before[n][k])


def test_an_oom_lowers_residency_and_the_output_is_unchanged(kind, monkeypatch):
    """inject_oom at denoise under resident_stream:60: the ladder (judging a CUDA machine; the
    mechanism runs on the CPU) lowers residency, the step is retried, the image equals a clean
    raw run; reset() then switches back to 60% and the next image is the same again."""
    pipe = (tiny_sdxl if kind == "sdxl" else tiny_flux)()
    proxy = wrap(pipe, device="cpu", plan=("resident_stream:60",), cache=False)
    with judged_as(proxy, "cuda"), inject_oom(proxy, stage="denoise", at=2):
        image = run(proxy, kind)
    (record,) = proxy.autofit.history
    assert record.action == "resident_stream" and record.stage == "denoise"
    (lowered,) = proxy.autofit.plan
    assert Plan.from_names([lowered]).resident <= 45
    denoiser = getattr(pipe, DENOISER[kind])
    assert partial.streamer_of(denoiser).resident_bytes <= 0.5 * sum(
        t.numel() * t.element_size() for t in denoiser.state_dict().values())
    reference = raw(kind)
    torch.testing.assert_close(image, reference)
    proxy.autofit.reset()
    again = run(proxy, kind)
    assert proxy.autofit.plan == ("resident_stream:60",)
    assert len(hooks_left(pipe)) == len(partial.streamer_of(denoiser).units) + (
        len(partial.streamer_of(pipe.text_encoder_2).units) if kind == "flux" else 0)
    torch.testing.assert_close(again, reference)


def test_a_switch_to_another_placement_and_back():
    """resident_stream -> device (a switch that comes without a tear-down) -> resident_stream: no
    hook is left behind, and every output equals the raw pipeline's."""
    kind = "flux"
    pipe = tiny_flux()
    proxy = autofit(pipe, device="cpu", plan=("resident_stream:50",), cache=False)
    reference = raw(kind)
    torch.testing.assert_close(run(proxy, kind), reference)
    for target in (Plan(), Plan("resident_stream:50")):
        switch_plan(proxy, target)
        streaming = target.family == "resident_stream"
        assert bool(hooks_left(pipe)) == streaming
        assert (partial.streamer_of(getattr(pipe, DENOISER[kind])) is not None) == streaming
        torch.testing.assert_close(run(proxy, kind), reference)


def test_composes_with_vae_rungs_and_batch_splitting():
    """resident_stream + vae_tiling + split_batch on a batch of 2 equals the same rungs with
    everything resident."""
    kind, extra = "flux", dict(num_images_per_prompt=2)
    streamed = autofit(tiny_flux(), device="cpu", plan=("resident_stream:35", "vae_tiling", "split_batch"), cache=False)
    resident = autofit(tiny_flux(), device="cpu", plan=("vae_tiling", "split_batch"), cache=False)
    image = run(streamed, kind, **extra)
    assert image.shape[0] == 2 and streamed.autofit.plan == ("resident_stream:35", "split_batch", "vae_tiling")
    torch.testing.assert_close(image, run(resident, kind, **extra))


# ---- `autofit plan` on header-only folders of the published sizes ------------------------------
def _plan_json(folder, gib, steps, capsys):
    from autofit.cli import main

    capsys.readouterr()
    main(["plan", str(folder), "--vram", f"{gib}GiB", "--ram", "128GiB", "--device", "cuda",
          "--steps", str(steps), "--json"])
    out = json.loads(capsys.readouterr().out)
    pick = next(r for r in out["strategies"] if r["plan"] == out["pick"])
    device = next(r for r in out["by_strategy"] if r["strategy"] == "device")
    return pick, device


@pytest.fixture(scope="module")
def sized_folders(tmp_path_factory):
    import header_folder

    root = tmp_path_factory.mktemp("sized")
    return {kind: header_folder.write_folder(kind, root / kind) for kind in ("flux", "sdxl")}


def test_autofit_plan_gets_faster_with_more_memory_on_published_sizes(sized_folders, capsys):
    """Header-only Flux-sized folder, 28 steps: the pick's predicted seconds fall strictly from
    --vram 8 to 12 to 16 to 24 GiB, within 1.35x of everything on the device at 24, and the rows
    show resident and streamed GiB; SDXL-sized at 6 GiB within 1.35x of the device."""
    secs = []
    for gib in (8, 12, 16, 24):
        pick, device = _plan_json(sized_folders["flux"], gib, 28, capsys)
        assert pick["plan"][0].startswith("resident_stream:")
        assert pick["resident_gib"] + pick["streamed_gib"] == pytest.approx(31.4, abs=0.2)
        assert pick["pinned_gib"] <= 1.1 * pick["streamed_gib"]
        secs.append(pick["seconds"])
    assert secs == sorted(secs, reverse=True) and len(set(secs)) == 4
    assert secs[-1] <= 1.35 * device["seconds"]
    pick, device = _plan_json(sized_folders["sdxl"], 6, 30, capsys)
    assert pick["seconds"] <= 1.35 * device["seconds"]
