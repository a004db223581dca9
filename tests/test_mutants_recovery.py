"""Tests that kill the mutants mutmut found alive in engine/recovery.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix; ``ǁ`` separates a class from its method). They run real tiny pipelines
through real OOMs (autofit.testing.inject_oom) and check what recovery decided against
references outside recovery.py: the OOM message's own figures (parsed here with a regex), the
event table and levels of docs/logging.md, the host-RAM ladder of docs/architecture.md, the
proxy's history and plan, and the count of OOMs the injection raised.

The branch that sizes the next plan from the OOM's figures runs only on a device that counts
bytes: those tests place the pipeline on the simulated capped device (autofit.testing.simdev).
"""

import re
import time
from pathlib import Path

import pytest
import structlog
import torch

from autofit import AutoFitExhausted, autofit
from autofit.engine.state import LAST_RUNG_BACKOFF
from autofit.testing import OOM_MESSAGES, inject_oom, simdev, tiny_sdxl

from autofit.plan import Plan
from autofit.planning import cost, rungs
from autofit.planning.rungs import LADDERS

from helpers import judged_as, measured_activations, paced, rung_context, run, wrap

MiB, GiB = 1 << 20, 1 << 30
FAST = {"num_inference_steps": 2}
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": GiB}
# docs/logging.md: autofit.exhausted's fields, and the memory fields (rss_gib on the CPU).
EXHAUSTED_FIELDS = {"stage", "attempt", "reason", "error", "plan"}
MEMORY_FIELDS = {"allocated_gib", "reserved_gib", "free_gib", "budget_gib", "rss_gib"}
# docs/architecture.md: "host-RAM OOM (any stage): group_leaf_lowmem → group_leaf → group_block → group_disk → fp8*"
HOST_LADDER_DOCS = ("group_leaf_lowmem", "group_leaf", "group_block", "group_disk", "fp8")


pytestmark = pytest.mark.usefixtures("one_thread")


def _head(message: str) -> str:
    """What an OOM's one-line summary is (the history's ``error``): its first two sentences."""
    return ". ".join(message.splitlines()[0].split(". ")[:2])


def _figure(message: str, pattern: str) -> int:
    """A byte count the allocator's message states (``pattern`` around ``SIZE``)."""
    size = r"([0-9.]+) (B|KiB|MiB|GiB)"
    m = re.search(pattern.replace("SIZE", size), message)
    assert m, f"no {pattern!r} in the message"
    return int(float(m.group(1)) * UNITS[m.group(2)])


def _exhausted_event(logs):
    (event,) = [e for e in logs if e["event"] == "autofit.exhausted"]
    return event


def _check_exhausted_event(event, *, stage, attempts, plan, error):
    """The event against docs/logging.md: WARNING, its documented fields (memory included), no other."""
    assert event["log_level"] == "warning"
    fields = set(event) - {"event", "log_level"}
    assert EXHAUSTED_FIELDS <= fields and fields - EXHAUSTED_FIELDS <= MEMORY_FIELDS, fields
    assert fields & MEMORY_FIELDS
    assert (event["stage"], event["attempt"], event["plan"], event["error"]) == (stage, attempts, plan, error)
    assert event["reason"]


# ---- _exhausted: what the user is told, and logged, when nothing is left -------------------------
def test_backoffs_run_out_the_message_counts_the_retries_and_the_event_is_documented(backoff_waits):
    """With no rung left (leaf group offload on the CPU), the plan in force is retried after each
    backoff (docs/logging.md: 0.5, 1, 2 s; each retry_same_plan event's reason says the wait);
    one more OOM gives up. Every climb passed over each lossy rung (policy quality) once, with
    why (docs/logging.md: one rung_skipped per rung passed over), the last climb too. The message names the stage, why, what was tried (the retries, counted
    from the history, not listed one by one), the plan in force, the last error and the advice
    for policy quality (lossy rungs are not allowed); the exception carries the stage, this
    call's history and the allocator's error; the event is as docs/logging.md says.
    mutants: engine.recovery.x_climb__mutmut_43, _46, _47, _50, _51, _58, _64, _66, engine.recovery.xǁRecoveryǁon_oom__mutmut_70,
    engine.recovery.xǁRecoveryǁ_take__mutmut_110..118,
    engine.recovery.xǁRecoveryǁ_exhausted__mutmut_4, _5, _7..10, _12, _14..22, _24, _27, _28, _30, _32..34,
    _37, _40, _42..45, _50..52, _54, _55"""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("group_leaf", "vae_tiling"))
    message = OOM_MESSAGES["cuda"][1]
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", at=2, times=len(LAST_RUNG_BACKOFF) + 1) as fault:
            with pytest.raises(AutoFitExhausted) as info:
                run(proxy, "sdxl", **FAST)
    assert backoff_waits == [0.5, 1, 2]
    plan = proxy.autofit.plan
    assert set(plan) == {"group_leaf", "vae_tiling"}
    history = proxy.autofit.history
    assert [r.action for r in history] == ["retry_same_plan"] * 3
    retried = [e for e in logs if e["event"] == "autofit.retry_same_plan"]
    assert [e["log_level"] for e in retried] == ["warning"] * 3
    for event, wait in zip(retried, backoff_waits, strict=True):
        assert f"{wait:g} s" in event["reason"] and set(event) & MEMORY_FIELDS, event
        assert (event["stage"], event["plan"], event["error"]) == ("denoise", ",".join(plan), _head(message)), event
    lossy = sorted((e["attempt"], e["action"]) for e in logs
                   if e["event"] == "autofit.rung_skipped" and "policy" in e["reason"])
    assert lossy == sorted((k, rung) for k in range(1, fault.fired + 1) for rung in ("fp8", "int8", "nf4")), lossy
    event = _exhausted_event(logs)
    _check_exhausted_event(event, stage="denoise", attempts=fault.fired, plan=",".join(plan), error=_head(message))
    exc = info.value
    assert (exc.stage, exc.history) == ("denoise", history)
    text = str(exc)
    assert text.startswith(f"autofit could not fit the denoise stage ({event['reason']}). "), text
    logging_md = (Path(__file__).parents[1] / "docs" / "logging.md").read_text()
    (documented,) = re.findall(r'with no rung left and the backoffs spent: "([^"]+)"', logging_md)
    assert event["reason"] == documented  # docs/logging.md, exhausted (mutants: x_climb__mutmut_52, _53)
    assert f"Tried: 3 retries of the plan in force; the plan in force was {'+'.join(plan)}." in text, text
    assert f"Last error: {_head(message)}." in text, text
    assert "allow lossy rungs" in text, text
    assert isinstance(exc.__cause__, torch.OutOfMemoryError) and str(exc.__cause__) == message


def test_one_retry_then_max_retries_the_message_says_one_retry(backoff_waits):
    """max_retries=1 (README: escalations allowed within one call): the first OOM is retried
    after a backoff, the second reaches the limit; the message counts 1 retry, in the singular.
    mutants: engine.recovery.xǁRecoveryǁ_exhausted__mutmut_36, _38, _39, _41, engine.recovery.xǁRecoveryǁon_oom__mutmut_10..18"""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("group_leaf",), max_retries=1)
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", at=2, times=2) as fault:
            with pytest.raises(AutoFitExhausted) as info:
                run(proxy, "sdxl", **FAST)
    assert fault.fired == 2 and backoff_waits == [0.5]
    event = _exhausted_event(logs)
    _check_exhausted_event(event, stage="denoise", attempts=2, plan="group_leaf", error=_head(OOM_MESSAGES["cuda"][1]))
    assert "max_retries=1" in event["reason"] and info.value.stage == "denoise"
    text = str(info.value)
    assert text.startswith(f"autofit could not fit the denoise stage ({event['reason']}). "), text
    assert "Tried: 1 retry of the plan in force; the plan in force was group_leaf." in text, text
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_what_was_tried_lists_the_rungs_of_earlier_calls_on_the_way_to_the_plan_in_force():
    """One call escalates once; the next escalates twice and reaches max_retries=2. "Tried:" lists
    every rung the history shows on the way from the planned plan to the plan in force, the
    earlier call's included; the exception's history is this call's records alone.
    mutants: engine.recovery.xǁRecoveryǁ_exhausted__mutmut_25, _29"""
    proxy = autofit(tiny_sdxl(), cache=False, max_retries=2)
    with inject_oom(proxy, stage="denoise", at=2):
        run(proxy, "sdxl", **FAST)
    first = proxy.autofit.history
    assert len(first) == 1
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", at=2, times=3) as fault:
            with pytest.raises(AutoFitExhausted) as info:
                run(proxy, "sdxl", **FAST)
    history = proxy.autofit.history
    rungs = [r.action for r in history]
    assert len(rungs) == 3 and info.value.history == history[1:]
    in_force = "+".join(proxy.autofit.plan)
    assert in_force and tuple(history[-1].plan) == proxy.autofit.plan
    assert f"Tried: {', '.join(rungs)}; the plan in force was {in_force}." in str(info.value), str(info.value)
    assert _exhausted_event(logs)["attempt"] == fault.fired == 3


# ---- _climb on a device that counts bytes: the OOM's figures size the next plan ------------------
# The CUDA caching allocator's wording (autofit.testing.OOM_MESSAGES["cuda"]), with figures where
# what the stage held when it failed, not the request, sets how much the next plan must shed.
HELD_MOST = (
    "CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
    "900.50 KiB is free. Including non-PyTorch memory, this process has 7.10 GiB memory in use. Of the "
    "allocated memory 7.00 GiB is allocated by PyTorch, and 20.00 MiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


@pytest.fixture(scope="module")
def sim():
    device = simdev.require()
    yield device
    simdev.set_cap(None)
    simdev.set_pinned_cap(None)


def _usable(budget: int) -> int:
    """autofit.planning.cost.usable's rule, from its docstring: keep max(0.5 GiB, 6%) of the budget
    free, never more than a quarter of it."""
    return int(budget - min(max(0.5 * GiB, 0.06 * budget), 0.25 * budget))


def test_a_device_oom_sizes_the_jump_from_its_own_figures_and_leaves_the_floor(sim, tmp_path, monkeypatch):
    """A decode OOM on a byte-counting device, the call cached (a plan-cache key). From the
    message: the allocation lacked requested - free (escalate's need_mib); the decode held
    allocated + requested at least, and the process could have had free + held, less the
    allocator's margin: what the decode must shed is the larger of the two, and the reason a
    rung that frees less is skipped states it. VAE tiling cuts decode activations to 0.3 and is
    taken; moving the other components off frees only their weights. The second OOM reaches
    max_retries=1; the floor learned from the figures stays under the workload's key.
    mutants: engine.recovery.xǁRecoveryǁ_climb__mutmut_1, _2, _6, _8, _12, _14..34, _49, _64,
    engine.recovery.x_climb__mutmut_9..11, _17..19, _35, _36, engine.recovery.xǁRecoveryǁon_oom__mutmut_20, _21,
    engine.recovery.xǁRecoveryǁ_take__mutmut_137..145"""
    monkeypatch.setitem(OOM_MESSAGES, "held_most", (torch.OutOfMemoryError, HELD_MOST))
    requested = _figure(HELD_MOST, r"Tried to allocate SIZE\.")
    free = _figure(HELD_MOST, r"of which SIZE is free")
    process = _figure(HELD_MOST, r"this process has SIZE memory in use")
    allocated = _figure(HELD_MOST, r"Of the allocated memory SIZE is allocated by PyTorch")
    lacked = requested - free
    shed = max(lacked, allocated + requested - _usable(free + process))
    assert shed > lacked  # the figures make the budget, not the request, decide
    pipe = tiny_sdxl()
    weights = sum(t.numel() * t.element_size() for m in pipe.components.values()
                  if isinstance(m, torch.nn.Module) for t in (*m.parameters(), *m.buffers()))
    proxy = autofit(pipe, device=sim, cache=tmp_path, max_retries=1)
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="decode", kind="held_most", times=2) as fault:
            with pytest.raises(AutoFitExhausted):
                run(proxy, "sdxl", **FAST)
    assert fault.fired == 2
    (escalate,) = [e for e in logs if e["event"] == "autofit.escalate"]
    assert (escalate["stage"], escalate["action"], escalate["cause"], escalate["explained"]) == (
        "decode", "vae_tiling", "plan", True)
    assert escalate["need_mib"] == round(lacked / MiB, 2) != round(lacked / MiB, 3)  # MiB, to 2 decimals
    (record,) = proxy.autofit.history
    reasons = dict(record.skipped)
    assert f"less than the {shed / MiB:.1f} MiB the failed allocation lacked" in reasons["offload_for_decode"], reasons
    floor = measured_activations(proxy).get("decode")
    assert floor is not None and allocated + requested - weights <= floor <= allocated + requested, floor


def _shed(message: str) -> int:
    """What the stage must shed by the message's figures alone (see the test above)."""
    requested = _figure(message, r"Tried to allocate SIZE\.")
    free = _figure(message, r"of which SIZE is free")
    process = _figure(message, r"this process has SIZE memory in use")
    allocated = _figure(message, r"Of the allocated memory SIZE is allocated by PyTorch")
    return max(requested - free, allocated + requested - _usable(free + process))


def test_without_a_cache_each_workload_keeps_its_own_floor(sim, monkeypatch):
    """No plan cache and no preflight (no cache key): the floor an OOM's figures set is kept per
    workload. A 64 px call's decode runs out with the larger figures (OOM_MESSAGES["cuda"]); then,
    on the same plan, a 32 px call's decode with smaller ones: what it must shed comes from its own figures, not
    from the other workload's floor.
    mutants: engine.recovery.xǁRecoveryǁ_climb__mutmut_3"""
    monkeypatch.setitem(OOM_MESSAGES, "held_most", (torch.OutOfMemoryError, HELD_MOST))
    big = OOM_MESSAGES["cuda"][1]
    def held_and_asked(message):  # the decode's peak, at least, by the figures
        return _figure(message, r"Of the allocated memory SIZE") + _figure(message, r"Tried to allocate SIZE\.")

    assert held_and_asked(big) > held_and_asked(HELD_MOST)
    proxy = autofit(tiny_sdxl(), device=sim, cache=False, preflight=False, max_retries=1)
    for kind, size in (("cuda", 64), ("held_most", 32)):
        proxy.autofit.reset()  # both start on the plan autofit started with (no tiling)
        with inject_oom(proxy, stage="decode", kind=kind, times=2):
            with pytest.raises(AutoFitExhausted):
                run(proxy, "sdxl", height=size, width=size, **FAST)
    record = proxy.autofit.history[-1]
    assert (record.stage, record.action in LADDERS["decode"]) == ("decode", True), record
    expected = f"less than the {_shed(HELD_MOST) / MiB:.1f} MiB the failed allocation lacked"
    assert expected in dict(record.skipped)["offload_for_decode"], record


def test_a_host_oom_on_a_device_climbs_the_host_ladder(sim, tmp_path, monkeypatch):
    """A host-RAM OOM (the CPU allocator's message) in the decode of a pipeline on a device under
    model offload (its weights on the host): retried once on the plan in force (it says nothing
    about the plan; the retry_same_plan event says host RAM), then the next rung comes from the host-RAM ladder of docs/architecture.md,
    not the decode ladder (a device OOM there takes a decode rung).
    mutants: engine.recovery.xǁRecoveryǁ_climb__mutmut_46, engine.recovery.x_climb__mutmut_6,
    engine.recovery.xǁRecoveryǁon_oom__mutmut_19, _22, _26, _28, _29, _31..33, _35"""
    monkeypatch.setenv("AUTOFIT_OFFLOAD_DIR", str(tmp_path / "offload"))
    proxy = autofit(tiny_sdxl(), device=sim, cache=False, plan=("model_offload",))
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="decode", kind="cpu", times=2) as fault:
            run(proxy, "sdxl", **FAST)
    assert fault.fired == 2
    (retried,) = _events(logs, "retry_same_plan")
    # docs/logging.md, retry_same_plan: cause `host`, reason `host RAM` (mutants: on_oom__mutmut_34)
    assert (retried["cause"], retried["oom"], retried["reason"]) == ("host", "host", "host RAM"), retried
    retry, escalation = proxy.autofit.history
    assert (retry.action, retry.oom_kind, retry.cause) == ("retry_same_plan", "host", "host")
    assert (escalation.oom_kind, escalation.cause) == ("host", "host")
    assert escalation.action in HOST_LADDER_DOCS and proxy.autofit.plan == (escalation.action,), escalation


def test_on_the_cpu_a_host_oom_is_the_devices_own_and_climbs_the_stages_ladder():
    """On the CPU the device is the host (docs/logging.md): a host-RAM OOM there is the device's
    OOM, judged like one (no figures: not explained, retried once), then the decode ladder's
    next rung (docs/architecture.md), not the host-RAM ladder.
    mutants: engine.recovery.xǁRecoveryǁon_oom__mutmut_23, _24"""
    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="decode", kind="cpu", times=2) as fault:
        run(proxy, "sdxl", **FAST)
    assert fault.fired == 2
    retry, escalation = proxy.autofit.history
    assert retry.action == "retry_same_plan" and "host" not in (retry.cause, escalation.cause)
    assert escalation.action in LADDERS["decode"] and escalation.action not in HOST_LADDER_DOCS, escalation


def test_a_load_oom_climbs_from_the_plan_being_placed():
    """The first call places the plan the user asked for (VAE tiling); placing it runs out: the
    next rung is added to that plan (autofit.plan's grammar: an offload placement does not
    replace tiling), not to the plan that was in force before it.
    mutants: engine.recovery.xǁRecoveryǁon_oom__mutmut_6"""
    asked = Plan().with_rung("vae_tiling")
    proxy = autofit(tiny_sdxl(), cache=False, plan=asked.names)
    with inject_oom(proxy, stage="load") as fault:
        run(proxy, "sdxl", **FAST)
    assert fault.fired == 1
    (record,) = proxy.autofit.history
    assert record.stage == "load" and record.action in LADDERS["load"]
    assert proxy.autofit.plan == record.plan == asked.with_rung(record.action).names, record


def test_a_load_oom_while_placing_a_rung_records_what_both_ladders_passed_over():
    """A denoise OOM under model offload escalates; placing the new plan runs out (a load OOM).
    The load ladder, tried first, has nothing (that is why the denoise ladder goes on): the
    record of that step lists the rungs passed over on both: every load rung the plan being
    placed lacks, the load peak's reasons among them.
    mutants: engine.recovery.x_climb__mutmut_20, engine.recovery.xǁRecoveryǁon_oom__mutmut_114..117"""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("model_offload",))
    run(proxy, "sdxl", **FAST)
    with inject_oom(proxy, stage="denoise", at=1) as denoise:
        with inject_oom(proxy, stage="load", when=lambda n: denoise.fired == 1 and not load.fired,
                        expect_fire=True) as load:
            run(proxy, "sdxl", **FAST)
    first, second = proxy.autofit.history
    assert (first.stage, second.stage, second.scope) == ("denoise", "load", "load")
    assert second.action in LADDERS["denoise"]
    reasons = [why for _, why in second.skipped]
    assert any("load peak" in why for why in reasons), reasons
    passed = {name for name, _ in second.skipped}
    assert passed >= set(LADDERS["load"]) - set(first.plan), passed  # every rung the placed plan lacks


def test_resident_streaming_jumps_to_the_first_quarter_step_predicted_to_fit_the_budget(tmp_path):
    """A load OOM (no figures are read on the CPU) on a plan judged for CUDA: resident streaming
    steps down by quarters, "jumping to the first step predicted to fit when one is" (rungs.step),
    predicted for the budget preflight read (max_vram). The budget here lets the second quarter
    step fit, not the first: found by the cost model (autofit.planning.cost), as the planner does.
    mutants: engine.recovery.xǁRecoveryǁ_climb__mutmut_10, _37, _39, _40, _42"""
    probe = wrap(tiny_sdxl(), plan=(), cache=tmp_path / "probe")  # a cache: the context has the call's workload
    with judged_as(probe, "cuda"):
        run(probe, "sdxl", num_inference_steps=1)
        ctx = rung_context(probe)
    steps = rungs.steps("resident_stream", Plan())

    def peak(plan):
        return max(cost.stage_peaks(plan, ctx.footprint, ctx.workload).values())

    budget = int(peak(steps[1]) / 0.75) + 64  # a quarter of a small budget is kept free
    assert peak(steps[1]) <= _usable(budget) < peak(steps[0])
    expected = next(s for s in steps if peak(s) <= _usable(budget))
    proxy = wrap(tiny_sdxl(), plan=(), cache=tmp_path / "run", max_vram=budget)
    with judged_as(proxy, "cuda"):
        with inject_oom(proxy, stage="load") as fault:
            run(proxy, "sdxl", num_inference_steps=1)
    assert fault.fired == 1
    assert proxy.autofit.plan == expected.names == steps[1].names, proxy.autofit.history


# ---- _take and on_oom: what is logged about each step (docs/logging.md) --------------------------
ESCALATE_FIELDS = {"stage", "action", "attempt", "component", "scope", "oom", "cause", "explained", "error", "lossless",
                   "plan"}
LOSSY = {"fp8", "int8", "nf4"}  # docs/architecture.md: the lossy rungs (policy balanced and up)


def _events(logs, name):
    return [e for e in logs if e["event"] == f"autofit.{name}"]


def test_an_escalation_logs_its_skips_the_escalation_the_retry_and_the_recovery_as_documented():
    """A denoise OOM on the CPU (the CUDA message: its figures blame the plan). The rungs passed
    over are logged one event each (DEBUG), as the history's record lists them; the escalation
    (WARNING) has its documented fields with the record's values (lossless: not an fp8/int8/nf4
    rung); the retry (DEBUG) says which stage runs again, in which scope; the recovered call's
    lost seconds are part of its seconds, within the time the call took.
    mutants: engine.recovery.xǁRecoveryǁ_take__mutmut_63..74, _120..136, engine.recovery.xǁRecoveryǁon_oom__mutmut_102..112"""
    proxy = autofit(tiny_sdxl(), cache=False)
    message = OOM_MESSAGES["cuda"][1]
    started = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", at=2) as fault:
            run(proxy, "sdxl", **FAST)
    took = time.perf_counter() - started
    assert fault.fired == 1
    (record,) = proxy.autofit.history
    skipped = _events(logs, "rung_skipped")
    assert record.skipped and [(e["action"], e["reason"]) for e in skipped] == list(record.skipped)
    assert all((e["log_level"], e["stage"], e["attempt"]) == ("debug", "denoise", 1) for e in skipped), skipped
    (escalate,) = _events(logs, "escalate")
    assert escalate["log_level"] == "warning"
    assert ESCALATE_FIELDS <= set(escalate) and set(escalate) & MEMORY_FIELDS, escalate
    assert {k: escalate[k] for k in ESCALATE_FIELDS} == {
        "stage": "denoise", "action": record.action, "attempt": 1, "component": "unet", "scope": "stage",
        "oom": "device", "cause": "plan", "explained": True, "error": _head(message),
        "lossless": record.action not in LOSSY, "plan": ",".join(proxy.autofit.plan)}
    assert proxy.autofit.plan == record.plan
    (retry,) = _events(logs, "retry")
    assert (retry["log_level"], retry["stage"], retry["attempt"], retry["scope"]) == ("debug", "denoise", 1, "stage")
    (recovered,) = _events(logs, "recovered")
    assert 0 < recovered["seconds_lost"] <= recovered["seconds"] <= took, recovered


def test_a_lossy_escalation_is_logged_as_not_lossless(backoff_waits):
    """Under policy balanced, leaf group offload on the CPU has only fp8 storage left for the
    denoiser: the escalation to it says lossless=False.
    mutants: engine.recovery.xǁRecoveryǁ_take__mutmut_134..136"""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("group_leaf",), policy="balanced")
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise"):
            run(proxy, "sdxl", num_inference_steps=1)
    (escalate,) = _events(logs, "escalate")
    assert escalate["action"] in LOSSY and escalate["lossless"] is False, escalate


@pytest.mark.parametrize("kind, steers", [("cuda", True), ("cuda_spike", False)])
def test_an_escalation_steers_the_next_process_unless_another_process_held_the_memory(tmp_path, kind, steers):
    """README: "the plan cache remembers an escalation unless the OOM's figures put it on another
    process's memory". An explained OOM (this process held nearly all of it) steers: a new
    wrapper on the same cache starts on the escalated plan. Another process's spike, escalated
    after its same-plan retry, does not: the new wrapper starts on the planned plan.
    mutants: engine.recovery.xǁRecoveryǁ_take__mutmut_147, _150, _152..154, and the retry branch's:
    engine.recovery.xǁRecoveryǁ_take__mutmut_33..61, engine.recovery.x_triage__mutmut_12..26"""
    first = autofit(tiny_sdxl(), cache=tmp_path)
    run(first, "sdxl", num_inference_steps=1)
    planned = first.autofit.plan
    with structlog.testing.capture_logs() as logs:
        with inject_oom(first, stage="denoise", times=2 if kind == "cuda_spike" else 1, kind=kind):
            run(first, "sdxl", num_inference_steps=1)
    escalated = first.autofit.plan
    if not steers:  # the spike was retried on the plan in force first, saying why from its figures
        message = OOM_MESSAGES[kind][1]
        held = re.search(r"this process has ([0-9.]+ GiB) memory in use", message).group(1)
        total = re.search(r"total capacity of ([0-9.]+ GiB)", message).group(1)
        (retried,) = _events(logs, "retry_same_plan")
        assert retried["log_level"] == "warning"
        assert (retried["stage"], retried["component"], retried["scope"], retried["cause"], retried["error"],
                retried.get("plan", "")) == ("denoise", "unet", "stage", "others", _head(message), ",".join(planned))
        assert held in retried["reason"] and total in retried["reason"] and set(retried) & MEMORY_FIELDS, retried
        assert first.autofit.history[-2].action == "retry_same_plan"
    assert escalated != planned
    assert first.autofit.history[-1].cause == ("plan" if steers else "others")
    second = autofit(tiny_sdxl(), cache=tmp_path)
    run(second, "sdxl", num_inference_steps=1)
    assert second.autofit.plan == (escalated if steers else planned)


def test_a_probe_that_runs_out_logs_the_plan_it_goes_back_to_and_the_doubled_wait():
    """A probe (one step back down after a quiet call) runs out: docs/logging.md's probe_failed
    (INFO) with the stage, the plan it came from (back in force), the cause and the wait, which
    doubles (paced: first_wait 1); the history records it as probe_failed, and the next probe comes
    after the doubled wait (the lost time counted is the failed call's).
    mutants: engine.recovery.xǁRecoveryǁ_take__mutmut_1..32 (_7: the lost time; _13, _14: the
    record's component and scope)"""
    proxy = wrap(tiny_sdxl(), cache=False, probes=paced(first_wait=1, max_wait=4))
    run(proxy, "sdxl", num_inference_steps=1)
    planned = proxy.autofit.plan
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", when=lambda n: proxy.autofit.plan == planned):
            for _ in range(4):
                run(proxy, "sdxl", num_inference_steps=1)
                if _events(logs, "probe_failed"):
                    break
    (event,) = _events(logs, "probe_failed")
    escalated = proxy.autofit.plan
    assert escalated != planned
    assert event["log_level"] == "info" and set(event) & MEMORY_FIELDS, event
    assert (event["stage"], event["plan"], event["cause"], event["wait"]) == ("denoise", ",".join(escalated), "plan", 2)
    record = proxy.autofit.history[-1]
    assert (record.action, record.stage, record.plan) == ("probe_failed", "denoise", escalated)
    # The component the OOM came from (the fault is injected in the UNet) and the scope (the
    # stage retried in place), as the event says them (docs/logging.md).
    assert (record.component, record.scope) == (event["component"], event["scope"]) == ("unet", "stage")
    # The failed probe's lost time is its call's, within the run time (probe_share 1.0): after the
    # doubled wait of quiet calls, the next call probes again.
    seen = len(proxy.autofit.history)
    with inject_oom(proxy, stage="denoise", when=lambda n: proxy.autofit.plan == planned):
        for _ in range(event["wait"] + 1):
            run(proxy, "sdxl", num_inference_steps=1)
    assert [r.action for r in proxy.autofit.history[seen:]] == ["probe", "probe_failed"], proxy.autofit.history


def test_an_oom_without_figures_is_judged_by_the_plans_predicted_peak_against_the_budget(tmp_path):
    """docs/architecture.md: "A message without figures (cuDNN, "CUDA error: out of memory") is
    judged by the plan's predicted peak against the budget." With max_vram below any plan's
    prediction, preflight's own event shows the denoise peak predicted over the budget: the
    figureless OOM is the plan's fault and escalates at once (no same-plan retry).
    mutants: engine.recovery.xǁRecoveryǁ_judge__mutmut_1, _2, _4..10, _12..16"""
    proxy = autofit(tiny_sdxl(), cache=tmp_path, max_vram="1MiB")
    with structlog.testing.capture_logs() as logs:
        with inject_oom(proxy, stage="denoise", kind="cuda_runtime") as fault:
            run(proxy, "sdxl", num_inference_steps=1)
    assert fault.fired == 1
    (predicted,) = [e for e in _events(logs, "preflight") if "predicted_denoise_gib" in e]
    assert predicted["predicted_denoise_gib"] > predicted["budget_gib"], predicted
    (record,) = proxy.autofit.history
    assert (record.stage, record.cause, record.action in LADDERS["denoise"]) == ("denoise", "plan", True), record


def test_a_roll_back_is_recorded_and_logged_with_its_documented_fields(tmp_path):
    """fp8 breaks the UNet on its first run (a real dtype error raised inside it): the
    ``rolled_back`` warning carries the fields docs/logging.md lists (stage, action ``undo_fp8``,
    component, error, plan, marked_broken), the history's record says the same (attempt, no OOM
    kind, scope ``stage``), the plan in force drops fp8 and the plan cache marks it broken.
    mutants: engine.recovery.xǁRecoveryǁroll_back__mutmut_*"""
    import json

    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    error = "expected mat1 and mat2 to have the same dtype, but got: c10::Float8_e4m3fn != c10::Float"
    pipe = tiny_sdxl()
    handle = _fp8_breaks_the_unet(pipe, error)
    proxy = autofit(pipe, plan=("fp8", "vae_tiling"), cache=tmp_path, policy="speed")
    with structlog.testing.capture_logs() as logs:
        proxy("a cat", num_inference_steps=1, height=16, width=16, output_type="pt",
              generator=torch.Generator().manual_seed(0))
    handle.remove()
    (event,) = [e for e in logs if e["event"] == "autofit.rolled_back"]
    assert event["log_level"] == "warning"
    assert (event["stage"], event["action"], event["component"]) == ("denoise", "undo_fp8", "unet")
    assert event["error"] == f"RuntimeError: {error}"[:200] or error in event["error"]
    assert proxy.autofit.plan == ("vae_tiling",)  # the plan without the rung that broke
    assert event["plan"] == "vae_tiling" and event["marked_broken"] is True
    (record,) = [r for r in proxy.autofit.history if r.action == "undo_fp8"]
    assert (record.stage, record.component, record.oom_kind, record.scope) == ("denoise", "unet", "none", "stage")
    assert record.plan == proxy.autofit.plan and "fp8" not in record.plan
    assert record.attempt == 0 and "attempt" not in event  # no OOM came before it (emit drops attempt=0)
    assert error[:40] in record.error
    stored = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert [r["broken"] for r in stored] == [{"fp8": ["unet"]}]


def _fp8_breaks_the_unet(pipe, error: str):
    """A real dtype error raised inside the UNet while its weights are fp8 (as a kernel without
    fp8 support raises it)."""
    def check(mod, args):
        if mod.weight.dtype == torch.float8_e4m3fn:
            raise RuntimeError(error)
    return pipe.unet.time_embedding.linear_1.register_forward_pre_hook(check)


# Longer than the 200 characters a record and an event keep of an error.
LONG_ERROR = ("expected mat1 and mat2 to have the same dtype, but got: c10::Float8_e4m3fn != c10::Float; "
              + "while running the time embedding " * 6)


def test_a_roll_back_whose_plan_does_not_fit_climbs_the_load_ladder_from_that_plan(sim, tmp_path):
    """On an 8 MiB device fp8 fits the 10.5 MiB of weights, their original dtype does not: fp8
    breaks the UNet, the roll back puts its weights back, and placing them runs out. That OOM is
    a load OOM, climbed from the plan without fp8 (fp8 never comes back), and the call ends with
    the raw pipeline's images. The roll back's record and event keep the error's first 200
    characters; ``recovered`` names both stages.
    mutants: engine.recovery.xǁRecoveryǁroll_back__mutmut_23, _29, _52, _54, _70 to _86"""
    import structlog

    from autofit import autofit
    from autofit.testing import tiny_sdxl

    assert len(f"RuntimeError: {LONG_ERROR}") > 200
    call = dict(num_inference_steps=1, height=16, width=16, output_type="pt")
    reference = tiny_sdxl()("a cat", generator=torch.Generator().manual_seed(0), **call).images
    simdev.set_cap(8 * MiB)
    try:
        pipe = tiny_sdxl()
        _fp8_breaks_the_unet(pipe, LONG_ERROR)
        proxy = autofit(pipe, device=sim, plan=("fp8", "vae_slicing", "offload_for_decode"), cache=tmp_path,
                        policy="speed")
        with structlog.testing.capture_logs() as logs:
            images = proxy("a cat", generator=torch.Generator().manual_seed(0), **call).images
    finally:
        simdev.set_cap(None)
    torch.testing.assert_close(images.cpu(), reference, rtol=0, atol=1e-5)
    undo, climbed = proxy.autofit.history
    assert (undo.action, undo.stage, undo.oom_kind, undo.plan) == ("undo_fp8", "denoise", "none",
                                                                   ("offload_for_decode", "vae_slicing"))
    assert len(undo.error) == 200 and LONG_ERROR[:100] in undo.error
    (rolled,) = [e for e in logs if e["event"] == "autofit.rolled_back"]
    assert rolled["error"] == undo.error and rolled["plan"].split(",") == list(undo.plan)
    assert (climbed.stage, climbed.scope, climbed.oom_kind) == ("load", "load", "device")
    assert climbed.action in LADDERS["load"] and "fp8" not in climbed.plan and "fp8" not in proxy.autofit.plan
    assert climbed.attempt == 1
    (escalate,) = [e for e in logs if e["event"] == "autofit.escalate"]
    assert (escalate["stage"], escalate["scope"]) == ("load", "load")
    (recovered,) = [e for e in logs if e["event"] == "autofit.recovered"]
    assert recovered["stages"] == "denoise,load" and recovered["attempts"] == 1


def test_a_roll_back_is_remembered_even_when_the_call_then_runs_out(sim, tmp_path):
    """Same roll back with ``max_retries=0``: the load OOM after it ends the call
    (``AutoFitExhausted``), and the plan cache already says fp8 broke the UNet, so the next
    process does not cast it again (its stored plan may still name fp8: preflight refuses it,
    tests/test_mutants_preflight.py); the exhaustion's history starts with the roll back.
    mutants: engine.recovery.xǁRecoveryǁroll_back__mutmut_61"""
    import json

    from autofit import AutoFitExhausted, autofit
    from autofit.testing import tiny_sdxl

    simdev.set_cap(8 * MiB)
    try:
        pipe = tiny_sdxl()
        _fp8_breaks_the_unet(pipe, LONG_ERROR)
        proxy = autofit(pipe, device=sim, plan=("fp8", "vae_slicing"), cache=tmp_path, policy="speed", max_retries=0)
        with pytest.raises(AutoFitExhausted) as caught:
            proxy("a cat", num_inference_steps=1, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    finally:
        simdev.set_cap(None)
    assert [r.action for r in caught.value.history][:1] == ["undo_fp8"]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert record["broken"] == {"fp8": ["unet"]}


def test_a_roll_back_after_an_oom_of_the_same_call_carries_that_attempt():
    """The text encoder runs out first (attempt 1, the encoders offloaded), then fp8 breaks the
    UNet at its first run: the roll back's record and ``rolled_back`` event carry attempt 1, the
    attempt the call is at (docs/logging.md: ``attempt``), and the call ends on the plan without fp8.
    mutants: engine.recovery.xǁRecoveryǁroll_back__mutmut_35, _44"""
    import structlog

    from autofit import autofit

    pipe = tiny_sdxl()
    _fp8_breaks_the_unet(pipe, LONG_ERROR)
    proxy = autofit(pipe, plan=("fp8",), cache=False, policy="speed")
    with structlog.testing.capture_logs() as logs, inject_oom(proxy, stage="encode", times=1) as fault:
        proxy("a cat", num_inference_steps=1, height=16, width=16, output_type="pt",
              generator=torch.Generator().manual_seed(0))
    assert fault.fired == 1
    escalation, undo = proxy.autofit.history
    assert (escalation.stage, undo.action) == ("encode", "undo_fp8")
    (rolled,) = [e for e in logs if e["event"] == "autofit.rolled_back"]
    assert undo.attempt == rolled["attempt"] == 1
    assert "fp8" not in proxy.autofit.plan


def test_a_retry_of_the_plan_in_force_is_recorded_for_the_component_and_scope_that_ran_out():
    """Another process held the memory (the OOM's own figures: 6.70 GiB of 8 GiB is another
    process's): the plan in force is retried once. Its history record and ``retry_same_plan``
    event name the component the OOM came from (where the fault was injected, the UNet) and the
    scope (the stage retried in place), the fields docs/logging.md lists for the event.
    mutants: engine.recovery.xǁRecoveryǁ_take (the retry branch's record)"""
    proxy = autofit(tiny_sdxl(), cache=False)
    with structlog.testing.capture_logs() as logs, inject_oom(proxy, stage="denoise", kind="cuda_spike") as fault:
        run(proxy, "sdxl", **FAST)
    assert fault.fired == 1
    (record,) = proxy.autofit.history
    (event,) = _events(logs, "retry_same_plan")
    assert (record.action, record.cause) == ("retry_same_plan", "others")
    assert (record.component, record.scope) == (event["component"], event["scope"]) == ("unet", "stage")
