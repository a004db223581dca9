"""Tests that kill the mutants mutmut found alive in engine/preflight.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). The workload autofit plans a call for must be the call the pipeline really
makes, so the reference is the pipeline itself: the images it returns (how many, what size), the
steps its scheduler ran, and whether it ran classifier-free guidance (``do_classifier_free_guidance``).
"""

import numpy as np
import PIL.Image
import pytest
import torch

from autofit.engine.preflight import batch_of, workload

from tiny_pipelines import animatediff, sd15, sd15_img2img


def _run(pipe, **kwargs):
    """The call's images as a (N, C, H, W) tensor (or (N, F, C, H, W) for a video)."""
    kwargs.setdefault("num_inference_steps", 1)
    out = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0))
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module")
def sd():
    return sd15()[0]


@pytest.fixture(scope="module")
def img2img():
    return sd15_img2img()[0]


@pytest.mark.parametrize("args, kwargs", [
    ((), {"prompt": "a cat"}),
    (("a cat",), {}),
    ((["a cat", "a dog"],), {}),
    ((), {"prompt": ["a cat", "a dog", "a bird"]}),
    ((), {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 3}),
    ((), {"prompt": "a cat", "num_images_per_prompt": 2}),
    ((), {"prompt_embeds": "3 prompts"}),
    ((), {"prompt_embeds": "2 prompts", "num_images_per_prompt": 2}),
])
def test_the_batch_is_the_number_of_images_the_pipeline_returns(sd, args, kwargs):
    """mutants: engine.preflight.x_batch_of__mutmut_*"""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("prompt_embeds"), str):
        n = int(kwargs["prompt_embeds"].split()[0])
        kwargs["prompt_embeds"] = torch.randn(n, 77, 32, generator=torch.Generator().manual_seed(1))
        kwargs["negative_prompt_embeds"] = torch.zeros(n, 77, 32)
    planned = batch_of(args, kwargs)
    images = sd(*args, **kwargs, num_inference_steps=1, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert planned == images.shape[0]
    assert workload(sd, args, kwargs).batch == images.shape[0]


def _pil(h, w):
    return PIL.Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8))


@pytest.mark.parametrize("make, n", [
    (lambda: _pil(48, 40), 1),  # PIL: .size is (width, height)
    (lambda: [_pil(40, 48), _pil(40, 48)], 2),
    (lambda: np.full((48, 40, 3), 0.5, dtype=np.float32), 1),  # an array: (H, W, C)
    (lambda: np.full((2, 40, 48, 3), 0.5, dtype=np.float32), 2),
    (lambda: torch.full((2, 3, 48, 40), 0.5), 2),  # a tensor: (N, C, H, W)
    (lambda: torch.full((1, 3, 40, 48), 0.5), 1),
])
def test_an_image_to_image_call_is_planned_at_the_size_and_count_of_what_it_makes(img2img, make, n):
    """No height/width: the size of the input image, which the pipeline keeps; no prompt list:
    the images given.
    mutants: engine.preflight.x__image_hw__mutmut_*, x__count__mutmut_*, x_workload__mutmut_*"""
    image = make()
    prompt = ["a cat"] * n
    wl = workload(img2img, (), {"prompt": prompt, "image": image, "strength": 1.0})
    out = _run(img2img, prompt=prompt, image=image, strength=1.0)
    assert (wl.batch, wl.height, wl.width) == (out.shape[0], *out.shape[-2:])
    assert workload(img2img, (), {"prompt": None, "image": image}).batch == n  # counted from the images


def test_a_video_given_as_frames_is_planned_at_its_frames_size():
    """A video input is a list of frames (PIL images), or a batch of such lists; its size is a
    frame's (PIL's own width and height).
    mutants: engine.preflight.x__image_hw__mutmut_*"""
    from autofit.engine.preflight import _image_hw

    frame = _pil(24, 56)
    assert _image_hw([frame, frame]) == (frame.height, frame.width) == (24, 56)
    assert _image_hw([[frame, frame]]) == (24, 56)
    assert _image_hw([]) is None and _image_hw([[]]) is None and _image_hw(None) is None
    assert _image_hw(torch.zeros(3, 24, 56)) == (24, 56)
    assert _image_hw(np.zeros((24, 56, 3))) == (24, 56)
    assert _image_hw(np.zeros((24, 56))) is None  # no channels: not an image autofit can size


def test_a_call_without_a_size_is_planned_at_the_size_the_pipeline_makes(sd):
    """mutants: engine.preflight.x__config_size__mutmut_*, x_workload__mutmut_*"""
    wl = workload(sd, (), {"prompt": "a cat"})
    out = _run(sd, prompt="a cat")
    assert (wl.height, wl.width) == tuple(out.shape[-2:])
    wl = workload(sd, (), {"prompt": "a cat", "height": 48, "width": 40})
    out = _run(sd, prompt="a cat", height=48, width=40)
    assert (wl.height, wl.width) == tuple(out.shape[-2:])


def test_steps_and_guidance_are_what_the_pipeline_runs(sd):
    """The defaults of ``__call__`` when the call leaves them out or passes None (50 steps for
    SD 1.5, guidance 7.5: classifier-free guidance on); the call's own values otherwise.
    mutants: engine.preflight.x_workload__mutmut_*, x_call_defaults__mutmut_*"""
    for kwargs in ({}, {"num_inference_steps": 3}, {"guidance_scale": 1.0}, {"guidance_scale": 3.0},
                   {"num_inference_steps": None, "guidance_scale": None}):
        wl = workload(sd, (), {"prompt": "a cat", **kwargs})
        sd(prompt="a cat", **{k: v for k, v in kwargs.items() if v is not None}, output_type="latent")
        assert wl.steps == len(sd.scheduler.timesteps), kwargs
        assert wl.cfg == sd.do_classifier_free_guidance, kwargs


def test_a_video_call_is_planned_at_the_frames_it_makes():
    """AnimateDiff makes 16 frames when ``num_frames`` is left out (its ``__call__`` default).
    mutants: engine.preflight.x_workload__mutmut_*"""
    pipe, kwargs = animatediff()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_frames", "num_inference_steps", "output_type")}
    wl = workload(pipe, (), kwargs)
    video = _run(pipe, **kwargs)
    assert (wl.frames, wl.height, wl.width) == (video.shape[1], *video.shape[-2:])
    assert wl.frames == 16


# ---- stored activations a run on this device could have measured ---------------------------------
@pytest.mark.parametrize("stage", ["encode", "denoise", "decode"])
def test_a_stored_activation_is_kept_up_to_what_the_device_can_hold_under_the_lightest_plan(stage):
    """The ceiling: a stored value times the lightest plan's activation factor (smallest tiles,
    every batch split: autofit.planning.cost) must fit in the device's memory; one byte more is a
    value no completed run on this device can have measured, and is dropped.
    mutants: engine.preflight.x_activation_ceiling__mutmut_*, x_plausible_activations__mutmut_*"""
    from autofit.engine.preflight import plausible_activations
    from autofit.plan import LIGHTEST_EXTRAS, Plan
    from autofit.planning.context import Workload
    from autofit.planning.cost import activation_factor

    wl, total = Workload(height=1024, width=1024, batch=4, steps=30, cfg=True), 80 * 2**30
    factor = activation_factor(Plan(extras=LIGHTEST_EXTRAS), stage, wl)
    largest = max(v for v in range(int(total / factor) - 4, int(total / factor) + 4) if v * factor <= total)
    kept, dropped = plausible_activations({stage: largest, "other": 1}, wl, total)
    assert kept == {stage: largest, "other": 1} and dropped == {}
    kept, dropped = plausible_activations({stage: largest + 1}, wl, total)
    assert kept == {} and dropped == {stage: largest + 1}
    # No device size known (the record read before any device was seen): nothing is dropped.
    for unknown in (None, 0):
        assert plausible_activations({stage: 2**60}, wl, unknown) == ({stage: 2**60}, {})


def test_stored_activations_no_run_here_can_have_measured_are_dropped_and_said(tmp_path):
    """A record's activations as the cache file holds them (read back with the json module): the
    plausible ones kept (as ints), each impossible one dropped with a ``cache_value_ignored``
    warning carrying the fields docs/logging.md lists (stage, key, value, reason); a record with
    no activations gives none.
    mutants: engine.preflight.x_stored_activations__mutmut_*"""
    import json

    import structlog

    from autofit.engine.preflight import stored_activations
    from autofit.planning.context import Workload

    path = tmp_path / "record.json"
    path.write_text(json.dumps({"plan": ["model_offload"], "activations": {"denoise": 2**49, "decode": 3.0 * 2**20,
                                                                            "encode": 2**20}}))
    record = json.loads(path.read_text())
    total = 24 * 2**30
    with structlog.testing.capture_logs() as logs:
        kept = stored_activations(record, Workload(), total, "k1")
    assert kept == {"decode": 3 * 2**20, "encode": 2**20} and all(type(v) is int for v in kept.values())
    (event,) = [e for e in logs if e["event"] == "autofit.cache_value_ignored"]
    assert event["log_level"] == "warning"
    assert (event["stage"], event["key"], event["value"]) == ("denoise", "k1", record["activations"]["denoise"])
    import re
    sizes = [float(x) for x in re.findall(r"([\d.]+) GiB", event["reason"])]
    assert sizes == [2**49 / 2**30, total / 2**30]  # the value, then the device
    assert "action" not in event  # not a field of this event (docs/logging.md)
    with structlog.testing.capture_logs() as logs:
        assert stored_activations({"plan": ["model_offload"]}, Workload(), total, "k1") == {}
    assert logs == []


def test_an_image_given_as_a_path_counts_as_one():
    """Only lists and batched arrays or tensors are counted; anything else (a path) is one image,
    unless ``batch_size`` says otherwise.
    mutants: engine.preflight.x__count__mutmut_*, x_batch_of__mutmut_*"""
    assert batch_of((), {"prompt": None, "image": "cat.png"}) == 1
    assert batch_of((), {"prompt": None, "image": "cat.png", "batch_size": 3}) == 3
    assert batch_of((), {"prompt": None, "image": torch.zeros(3, 32, 32)}) == 1  # one image, (C, H, W)
    assert batch_of((), {"prompt": None, "latents": torch.zeros(2, 4, 8, 8)}) == 2


# ---- a cached plan checked against this machine before it is trusted ----------------------------
def _stale_ctx(budget, host=120 * 2**30):
    from autofit.planning.context import Machine, Workload, context

    from footprints import SDXL
    return context(SDXL, Machine(budget_bytes=int(budget), host_available_bytes=int(host)), Workload(steps=30))


def test_a_cached_plan_that_ran_is_held_to_the_whole_budget_and_to_what_was_measured():
    """The stored plan ran within the whole budget (no working reserve asked: a prediction at
    exactly the budget fits), against the measured activations when there are some; one byte of
    budget less, or measured activations that do not fit, and it is refused, said with the plan's
    names (``device`` for the empty plan) in a ``cache_plan_refused`` event whose stage is one
    docs/logging.md names.
    mutants: engine.preflight.x__stale__mutmut_4, _5, _8, _10, _36, _40, _45, _48, _50"""
    import structlog

    from autofit.engine.preflight import _stale
    from autofit.plan import Plan
    from autofit.planning.planner import predict

    plan, measured = Plan("model_offload"), {"encode": 2**28, "denoise": 2**30, "decode": 2**29}
    exact = predict(plan, _stale_ctx(80 * 2**30), measured=measured).vram
    with structlog.testing.capture_logs() as logs:
        assert not _stale(plan, _stale_ctx(exact), measured)
        assert _stale(plan, _stale_ctx(exact - 1), measured)
    (refused,) = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert refused["action"] == "model_offload" and refused["stage"] == "load" and refused["reason"]
    # The measured activations decide, not the estimate: far larger ones refuse a plan the estimate fits.
    estimate = predict(plan, _stale_ctx(80 * 2**30)).vram
    heavy = {"denoise": 4 * estimate}
    assert predict(plan, _stale_ctx(estimate), margin=1.0).fits
    assert _stale(plan, _stale_ctx(estimate), heavy)
    with structlog.testing.capture_logs() as logs:
        assert _stale(Plan(), _stale_ctx(predict(Plan(), _stale_ctx(80 * 2**30), measured=measured).vram - 1),
                      measured)
    (refused,) = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert refused["action"] == "device"
    two = Plan("model_offload", frozenset({"vae_tiling"}))
    with structlog.testing.capture_logs() as logs:
        assert _stale(two, _stale_ctx(2**20), measured)
    (refused,) = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert refused["action"].split(",") == list(two.names)  # a plan: its rungs, comma-joined (logging.md)


def test_without_measurements_only_a_device_memory_misfit_is_set_aside():
    """No activations measured (no peaks on this device): the estimate's word that device memory
    is short does not overrule a plan that ran; host RAM short still refuses it.
    mutants: engine.preflight.x__stale__mutmut_* (the branch without measurements)"""
    from autofit.engine.preflight import _stale
    from autofit.plan import Plan
    from autofit.planning.planner import predict

    plan = Plan("model_offload")
    estimate = predict(plan, _stale_ctx(80 * 2**30)).vram
    assert not _stale(plan, _stale_ctx(estimate // 4), None)
    assert not _stale(plan, _stale_ctx(estimate // 4), {})
    assert _stale(plan, _stale_ctx(estimate // 4, host=2**20), None)  # 1 MiB of host RAM: refused



def test_a_stored_plan_naming_an_unknown_rung_is_reported_under_its_key(tmp_path):
    """The ``cache_record_ignored`` warning names the record it ignores: its key, which is the
    record's file name in the cache (docs/logging.md lists ``key``).
    mutants: engine.preflight.xǁPreflightǁ_pick__mutmut_12, x__stored_plan__mutmut_*"""
    import json

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    small = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    run_once = lambda proxy: proxy("a cat", generator=torch.Generator().manual_seed(0), **small)  # noqa: E731
    run_once(autofit(tiny_sdxl(), cache=tmp_path))
    (path,) = (tmp_path / "plans").glob("*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "plan": ["teleport_weights", "vae_tiling"]}))
    stored = json.loads(path.read_text())["plan"]  # as the record holds it (the run below rewrites it)
    with structlog.testing.capture_logs() as logs:
        run_once(autofit(tiny_sdxl(), cache=tmp_path))
    (ignored,) = [e for e in logs if e["event"] == "autofit.cache_record_ignored"]
    assert ignored["key"] == path.stem and "teleport_weights" in ignored["reason"]
    # docs/logging.md: a WARNING, at the load stage, the plan +-joined as the record holds it, and
    # no placeholder action.
    assert (ignored["log_level"], ignored["stage"]) == ("warning", "load") and "action" not in ignored
    assert repr("+".join(stored)) in ignored["reason"]


def test_a_second_process_starts_from_the_cache_and_drops_a_value_no_run_here_measured(tmp_path):
    """The second process's ``preflight`` says ``source=cache`` (docs/logging.md: planner or
    cache); a stored activation larger than this device can hold is dropped with a
    ``cache_value_ignored`` warning that names the record (its file name) and the value as the
    file holds it (read back with the json module).
    mutants: engine.preflight.xǁPreflightǁ_pick__mutmut_19, _20, _25, _26, _27"""
    import json

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    small = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    run_once = lambda proxy: proxy("a cat", generator=torch.Generator().manual_seed(0), **small)  # noqa: E731
    with structlog.testing.capture_logs() as logs:
        run_once(autofit(tiny_sdxl(), cache=tmp_path))
    assert [e["source"] for e in logs if e["event"] == "autofit.preflight"] == ["planner"]
    (path,) = (tmp_path / "plans").glob("*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "activations": {"denoise": 2**49}}))
    stored = json.loads(path.read_text())["activations"]["denoise"]
    with structlog.testing.capture_logs() as logs:
        run_once(autofit(tiny_sdxl(), cache=tmp_path))
    assert [e["source"] for e in logs if e["event"] == "autofit.preflight"] == ["cache"]
    (ignored,) = [e for e in logs if e["event"] == "autofit.cache_value_ignored"]
    assert (ignored["key"], ignored["stage"], ignored["value"]) == (path.stem, "denoise", stored)


def test_a_stored_plan_whose_rung_broke_its_components_is_not_taken_again(tmp_path):
    """The record says fp8 broke the UNet (its ``broken`` field, as a roll back stores it): the
    stored fp8 plan is refused before the call (``cache_plan_refused`` says why) and not used.
    mutants: engine.preflight.xǁPreflightǁ_pick__mutmut_30, _46, _51, _52, _54"""
    import json

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    small = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    run_once = lambda proxy: proxy("a cat", generator=torch.Generator().manual_seed(0), **small)  # noqa: E731
    # 8 MiB: the planner's own pick is fp8 (checked), so only the record's word keeps it out.
    first = autofit(tiny_sdxl(), cache=tmp_path, policy="speed", max_vram="8MiB")
    run_once(first)
    assert first.autofit.plan == ("fp8",)
    (path,) = (tmp_path / "plans").glob("*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "plan": ["fp8"], "broken": {"fp8": ["unet"]}}))
    proxy = autofit(tiny_sdxl(), cache=tmp_path, policy="speed", max_vram="8MiB")
    with structlog.testing.capture_logs() as logs:
        run_once(proxy)
    (refused,) = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert "fp8 broke unet" in refused["reason"]
    assert "fp8" not in proxy.autofit.plan
    # The plan in force came from the planner (docs/logging.md: source planner or cache).
    assert [e["source"] for e in logs if e["event"] == "autofit.preflight"] == ["planner"]


def test_when_no_plan_is_predicted_to_fit_a_warning_says_so_and_the_call_starts_from_the_plan_in_force():
    """A 1.6 MiB budget for a 128x128 image: no plan fits (the planner returns none). The WARNING
    ``preflight`` line carries the fields docs/logging.md lists for it (the reason as it quotes
    it, the budget the user gave in GiB to 3 digits), and no placeholder ``action``/``attempt``;
    the call starts from the plan in force (the weights on the device) and returns what the raw
    pipeline returns.
    mutants: engine.preflight.xǁPreflightǁ_pick__mutmut_67 to _100 (the warning's fields)"""
    import re
    from pathlib import Path

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    call = dict(num_inference_steps=1, height=128, width=128, output_type="pt")
    reference = tiny_sdxl()("a cat", generator=torch.Generator().manual_seed(0), **call).images
    proxy = autofit(tiny_sdxl(), max_vram="1.6MiB", cache=False)
    with structlog.testing.capture_logs() as logs:
        images = proxy("a cat", generator=torch.Generator().manual_seed(0), **call).images
    warned, chosen = [e for e in logs if e["event"] == "autofit.preflight"]
    row = next(line for line in (Path(__file__).parents[1] / "docs/logging.md").read_text().splitlines()
               if line.startswith("| `autofit.preflight`"))
    (documented,) = re.findall(r'`reason` "([^"]+)"', row)
    assert warned == {"event": "autofit.preflight", "log_level": "warning", "stage": chosen["stage"],
                      "source": "planner", "reason": documented, "budget_gib": round(1.6 * 2**20 / 2**30, 3)}
    assert chosen["log_level"] == "info" and chosen["action"] == "device" and proxy.autofit.plan == ()
    torch.testing.assert_close(images, reference)
    # The INFO line of the plan in force: its fields (docs/logging.md; no placeholder attempt),
    # to 3 decimals, the prediction the planner makes for that plan and this call.
    from autofit.plan import Plan
    from autofit.planning.planner import predict

    from helpers import rung_context

    expected = predict(Plan(), rung_context(proxy))
    figures = {"predicted_seconds": expected.seconds, "predicted_vram_gib": expected.vram / 2**30,
               **{f"predicted_{k}_gib": v / 2**30 for k, v in expected.peaks.items()},
               "budget_gib": 1.6 * 2**20 / 2**30}
    assert set(chosen) == {"event", "log_level", "stage", "action", "source", *figures}
    for name, value in figures.items():
        assert chosen[name] == round(value, 3), name
    assert chosen["budget_gib"] != round(chosen["budget_gib"], 2)  # a figure a coarser rounding would change


@pytest.mark.usefixtures("one_thread")
def test_a_workload_seen_again_starts_on_the_plan_it_completed_on_and_a_smaller_device_is_planned_from_it():
    """No plan cache, a 32 MiB simulated device: one image runs on the device, two images need
    an escalation. One image again: it starts on the plan it completed on in this process
    (``source=process``), not on the planner's pick (whose working reserve would take a slower
    plan): no OOM, the plan of its first call. Then the device shrinks to 26 MiB (another process
    took memory): that plan no longer fits what was measured, and the planner picks from the
    activations measured here, with no OOM (from its estimates alone it picks a plan that runs
    out). Images as the raw pipeline's.
    mutants: engine.preflight.xǁPreflightǁ_pick (the plan of this process; planner_choose without
    ``measured``), xǁPreflightǁchoose"""
    import structlog

    from autofit import autofit
    from autofit.testing import simdev, tiny_sdxl

    device = simdev.require()
    call = dict(height=128, width=128, num_inference_steps=1, output_type="pt")
    reference = tiny_sdxl()("a cat", generator=torch.Generator().manual_seed(0), **call).images
    try:
        simdev.set_cap(32 << 20)
        proxy = autofit(tiny_sdxl(), device=device, cache=False)
        run = lambda n: proxy("a cat", num_images_per_prompt=n, generator=torch.Generator().manual_seed(0), **call)  # noqa: E731
        with structlog.testing.capture_logs() as logs:
            run(1)
            first_plan = proxy.autofit.plan
            run(2)
            assert proxy.autofit.history  # two images ran out on the plan of one
            before = len(proxy.autofit.history)
            run(1)
            assert proxy.autofit.plan == first_plan and len(proxy.autofit.history) == before
            run(2)
            two_images = proxy.autofit.plan
            simdev.set_cap(26 << 20)
            images = run(1).images
        assert len(proxy.autofit.history) == before  # no OOM at 26 MiB either
    finally:
        simdev.set_cap(None)
    preflights = [e for e in logs if e["event"] == "autofit.preflight"]
    assert [e["source"] for e in preflights] == ["planner", "planner", "process", "process", "planner"]
    assert len(two_images) > 1 and preflights[3]["action"].split(",") == list(two_images)  # logging.md: ,-joined
    # The device measures peaks: after the first call, stage_peaks logs each stage's measured
    # peak beside the peak preflight predicted for it (docs/logging.md).
    peaks = next(e for e in logs if e["event"] == "autofit.stage_peaks")
    stages = [k[len("measured_"):-len("_gib")] for k in peaks if k.startswith("measured_")]
    assert stages and all(peaks[f"predicted_{k}_gib"] == preflights[0][f"predicted_{k}_gib"] for k in stages)
    torch.testing.assert_close(images.cpu(), reference, rtol=0, atol=1e-5)


def _tiling(names) -> tuple[str, ...]:
    """The VAE tiling rungs of a plan given by its names (``proxy.autofit.plan``)."""
    from autofit.plan import Plan
    return tuple(Plan.from_names(names).tiling_rungs)


def test_tiling_is_kept_once_the_decode_activation_is_known(tmp_path):
    """The record of an earlier run says the decode needs 60 MiB of activations, so its plan (the
    device) no longer fits 64 MiB and is refused; the planner tiles the VAE, and with the decode
    measured the tiling is kept (no ``tiling_deferred``): the decode would otherwise run out first.
    mutants: engine.preflight.xǁPreflightǁ_pick (the deferral without ``measured``)"""
    import json

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    call = dict(num_inference_steps=1, height=256, width=256, output_type="pt")
    autofit(tiny_sdxl(), max_vram="64MiB", cache=tmp_path)("a cat", generator=torch.Generator().manual_seed(0), **call)
    (path,) = (tmp_path / "plans").glob("*.json")
    record = json.loads(path.read_text())
    assert record["plan"] == []  # the first run decoded untiled (its tiling was deferred)
    path.write_text(json.dumps({**record, "activations": {"decode": 60 << 20}}))
    proxy = autofit(tiny_sdxl(), max_vram="64MiB", cache=tmp_path)
    with structlog.testing.capture_logs() as logs:
        proxy("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert [e["action"] for e in logs if e["event"] == "autofit.cache_plan_refused"] == ["device"]
    assert not [e for e in logs if e["event"] == "autofit.tiling_deferred"]
    assert _tiling(proxy.autofit.plan)
    # The logged prediction is made from the stored activation, not the estimate: the decode
    # peak under the plan in force is at least the 60 MiB activation cut by the tiling's factor.
    from autofit.plan import Plan
    from autofit.planning.context import Workload
    from autofit.planning.cost import activation_factor

    factor = activation_factor(Plan.from_names(proxy.autofit.plan), "decode", Workload(height=256, width=256, steps=1))
    (chosen,) = [e for e in logs if e["event"] == "autofit.preflight"]
    assert chosen["predicted_decode_gib"] >= round((60 << 20) * factor / 2**30, 3)


def test_offloading_enabled_through_the_proxy_is_kept_for_every_later_workload():
    """The user enables model offload through the proxy after a first call: that placement is
    adopted, and preflight leaves it alone for a new workload (two images), where it would
    otherwise put everything on the device (the uncapped simulated device has room for it: the
    first call's plan). The UNet keeps accelerate's offload hook.
    mutants: engine.preflight.xǁPreflightǁturn_off__mutmut_2"""
    from autofit import autofit
    from autofit.testing import simdev, tiny_sdxl

    device = simdev.require()
    call = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    proxy = autofit(tiny_sdxl(), device=device, cache=False)
    proxy("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert proxy.autofit.plan == ()
    proxy.enable_model_cpu_offload(device=device)
    proxy("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **call)
    assert proxy.autofit.plan == ("model_offload",)
    assert hasattr(proxy.unet, "_hf_hook")


@pytest.mark.usefixtures("one_thread")
def test_a_storage_rung_applied_with_no_way_back_stays_in_every_later_plan():
    """fp8 applied with no copy kept (1 MiB of host RAM allowed: nothing to keep the originals
    in) cannot be undone. On a 8 MiB simulated device the planner picks fp8; the device then
    grows (uncapped), where a fresh proxy's planner puts everything on the device in the
    original dtype: the next workload's plan still says fp8, as the weights are, rather than
    pretend they were restored.
    mutants: engine.preflight.xǁPreflightǁ_pick (the locked storage rung)"""
    import structlog

    from autofit import autofit
    from autofit.testing import simdev, tiny_sdxl

    device = simdev.require()
    call = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    options = dict(device=device, cache=False, policy="speed", max_ram="1MiB")
    try:
        simdev.set_cap(8 << 20)
        proxy = autofit(tiny_sdxl(), **options)
        proxy("a cat", generator=torch.Generator().manual_seed(0), **call)
        assert proxy.autofit.plan == ("fp8",)
        simdev.set_cap(None)
        fresh = autofit(tiny_sdxl(), **options)
        fresh("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **call)
        assert fresh.autofit.plan == ()  # what the planner picks for this workload, uncapped
        with structlog.testing.capture_logs() as logs:
            proxy("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **call)
    finally:
        simdev.set_cap(None)
    assert [e["action"] for e in logs if e["event"] == "autofit.preflight"] == ["fp8"]
    assert proxy.autofit.plan == ("fp8",)
    assert any(p.dtype == torch.float8_e4m3fn for p in proxy.unet.parameters())  # as the weights are


def test_tiling_picked_from_estimates_is_deferred_and_said_so():
    """64 MiB for a 256 px image: the planner's pick tiles the VAE from estimates alone, so the
    decode runs untiled first: ``tiling_deferred`` (docs/logging.md: the rungs deferred and why,
    at the decode stage, no placeholder attempt) and the plan in force has no tiling. A pick with no
    tiling (a 16 px image) defers nothing and says nothing.
    mutants: engine.preflight.x__untiled_until_measured__mutmut_*"""
    import structlog

    from autofit import autofit
    from autofit.plan import TILING
    from autofit.testing import tiny_sdxl

    for size, tiles in ((256, True), (16, False)):
        proxy = autofit(tiny_sdxl(), max_vram="64MiB", cache=False)
        with structlog.testing.capture_logs() as logs:
            proxy("a cat", num_inference_steps=1, height=size, width=size, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
        deferred = [e for e in logs if e["event"] == "autofit.tiling_deferred"]
        assert not _tiling(proxy.autofit.plan)
        if not tiles:
            assert deferred == []
            continue
        (event,) = deferred
        assert set(event) == {"event", "log_level", "stage", "action", "reason"} and event["stage"] == "decode"
        assert set(event["action"].split(",")) <= set(TILING) and event["reason"]
