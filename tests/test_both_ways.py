"""Plans that go both ways, on real tiny pipelines: a one-off OOM never fails a call, the plan
relaxes when the OOMs stop, and an escalation the OOM does not explain does not steer the cache."""

import json

import torch

from autofit import autofit
from autofit.engine.relax import FIRST_WAIT
from autofit.testing import inject_oom, tiny_sdxl

from helpers import DENOISER, CallCounter, paced, run, wrap


def _clean(**options):
    """The same call on a fresh pipeline under autofit with no OOM: the reference output."""
    return run(autofit(tiny_sdxl(), cache=False, **options), "sdxl")


def test_a_spike_from_another_process_is_retried_on_the_same_plan():
    """The OOM's own figures say this process held 1.2 of 8 GiB: the step is retried on the plan
    in force (no escalation), and the image equals a clean run's."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, cache=False)
    run(proxy, "sdxl")
    planned = proxy.autofit.plan
    steps = CallCounter(getattr(pipe, DENOISER["sdxl"]))
    with inject_oom(proxy, stage="denoise", at=3, kind="cuda_spike") as fault:
        image = run(proxy, "sdxl")
    assert fault.fired == 1
    assert proxy.autofit.plan == planned
    (record,) = proxy.autofit.history
    assert (record.action, record.cause, record.stage, record.plan) == ("retry_same_plan", "others", "denoise", planned)
    assert steps.n == 4  # only the failed step ran again (4 steps, one of them twice, one failed)
    torch.testing.assert_close(image, _clean())


def test_a_one_off_oom_at_the_last_rung_does_not_fail_the_call(backoff_waits):
    """With no rung left (leaf group offload on the CPU), the plan in force is retried after a
    backoff instead of raising AutoFitExhausted."""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("group_leaf",))
    with inject_oom(proxy, stage="denoise", at=2) as fault:
        image = run(proxy, "sdxl")
    assert fault.fired == 1
    assert [r.action for r in proxy.autofit.history] == ["retry_same_plan"]
    assert backoff_waits == [0.5]
    assert proxy.autofit.plan == ("group_leaf",)
    torch.testing.assert_close(image, _clean(plan=("group_leaf",)))


def test_the_plan_relaxes_to_the_planned_plan_after_a_quiet_run():
    """An explained OOM escalates; after FIRST_WAIT successful calls one call probes the plan one
    step down, and when it completes the plan stays there: back at the planned plan."""
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl")
    planned = proxy.autofit.plan
    with inject_oom(proxy, stage="denoise", at=2):
        run(proxy, "sdxl")
    assert proxy.autofit.plan != planned
    calls = 0
    while proxy.autofit.plan != planned:
        image = run(proxy, "sdxl")
        calls += 1
        assert calls <= FIRST_WAIT, "not back at the planned plan"
    # The recovered call and FIRST_WAIT - 2 more completed on the escalated plan; the next probed.
    assert calls == FIRST_WAIT
    assert [r.action for r in proxy.autofit.history][-2:] == ["probe", "relaxed"]
    torch.testing.assert_close(image, _clean())


def test_a_probe_that_runs_out_goes_back_and_waits_longer():
    """The planned plan runs out whenever it is in force: every probe fails, is taken back by the
    stage-local retry (no call fails), and the wait between probes doubles up to its cap."""
    pipe = tiny_sdxl()
    proxy = wrap(pipe, cache=False, probes=paced(first_wait=1, max_wait=4))  # the wait in calls alone, not the machine's load
    run(proxy, "sdxl", num_inference_steps=1)
    planned = proxy.autofit.plan
    probes_at = []
    with inject_oom(proxy, stage="denoise", when=lambda n: proxy.autofit.plan == planned):
        for i in range(18):
            before = len(proxy.autofit.history)
            image = run(proxy, "sdxl", num_inference_steps=1)  # never raises
            assert torch.isfinite(image).all()
            if any(r.action == "probe" for r in proxy.autofit.history[before:]):
                probes_at.append(i)
    actions = [r.action for r in proxy.autofit.history]
    assert actions.count("probe") == actions.count("probe_failed") == len(probes_at) >= 3
    gaps = [b - a for a, b in zip(probes_at, probes_at[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # the wait grows
    assert gaps[-1] == gaps[-2]  # up to the cap
    assert proxy.autofit.plan != planned


def test_an_unexplained_escalation_does_not_steer_the_next_process(tmp_path):
    """Two spikes in a row force an escalation, recorded as unexplained: the cache keeps the
    planned plan for the next process. An escalation the figures explain does steer it."""
    spiked = autofit(tiny_sdxl(), cache=tmp_path)
    run(spiked, "sdxl")
    planned = spiked.autofit.plan
    with inject_oom(spiked, stage="denoise", at=2, times=2, kind="cuda_spike"):
        run(spiked, "sdxl")
    assert [(r.action == "retry_same_plan", r.cause) for r in spiked.autofit.history] == [(True, "others"),
                                                                                         (False, "others")]
    assert spiked.autofit.plan != planned
    (path,) = (tmp_path / "plans").glob("*.json")
    record = json.loads(path.read_text())
    assert tuple(record["plan"]) == planned and tuple(record["running"]) == spiked.autofit.plan
    assert record["explained"] is False
    nxt = autofit(tiny_sdxl(), cache=tmp_path)
    run(nxt, "sdxl")
    assert nxt.autofit.plan == planned and nxt.autofit.history == ()

    explained = autofit(tiny_sdxl(), cache=tmp_path)
    run(explained, "sdxl")
    with inject_oom(explained, stage="denoise", at=2):
        run(explained, "sdxl")
    assert explained.autofit.history[-1].cause == "plan"
    assert tuple(json.loads(path.read_text())["plan"]) == explained.autofit.plan != planned


def test_an_escalation_a_retry_could_not_avoid_steers_the_next_process(tmp_path):
    """An OOM with no figures (cuDNN's) repeats past the same-plan retry and forces an
    escalation: no figure blames another process, so it is remembered, and a second process
    with the same cache starts on that plan with no OOM."""
    first = autofit(tiny_sdxl(), cache=tmp_path)
    run(first, "sdxl")
    planned = first.autofit.plan
    with inject_oom(first, stage="denoise", at=2, times=2, kind="cudnn"):
        run(first, "sdxl")
    assert [(r.action == "retry_same_plan", r.cause) for r in first.autofit.history] == [(True, "unknown"),
                                                                                        (False, "unknown")]
    assert first.autofit.plan != planned
    (path,) = (tmp_path / "plans").glob("*.json")
    assert tuple(json.loads(path.read_text())["plan"]) == first.autofit.plan
    second = autofit(tiny_sdxl(), cache=tmp_path)
    run(second, "sdxl")
    assert second.autofit.plan == first.autofit.plan and second.autofit.history == ()


def test_alternating_stage_ooms_do_not_flip_the_plan(backoff_waits):
    """Encode and denoise OOMs in turn: each escalation goes to a plan not visited before (the old
    ladder flipped between two rungs for ever), and no call fails."""
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl")
    for i in range(8):
        with inject_oom(proxy, stage="encode" if i % 2 else "denoise"):
            run(proxy, "sdxl")
    targets = [r.plan for r in proxy.autofit.history if r.action not in ("retry_same_plan", "probe", "probe_failed",
                                                                           "relaxed")]
    assert targets and len(targets) == len(set(targets))
