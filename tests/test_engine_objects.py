"""The engine's objects own their state: recovery's decision is pure (facts and the call's
Retries in, a Step out), and the fields that hold a plan have one writer, by construction."""

import pytest

from autofit import autofit
from autofit.engine.recovery import climb, triage
from autofit.engine.state import LAST_RUNG_BACKOFF, Retries
from autofit.plan import Plan
from autofit.planning.explain import Verdict
from autofit.planning.ladder import LADDERS
from autofit.testing import tiny_sdxl

from helpers import engine, rung_context, run

PLAN = Plan("model_offload")
EXPLAINED, UNEXPLAINED = Verdict("plan", "the plan's own peak"), Verdict("unknown", "no figures")


def test_triage_sends_a_failed_probe_back_then_retries_an_unexplained_oom_once():
    """A probe that ran out goes back to where it came from, whatever the verdict; an OOM the plan
    does not explain is retried on the same plan once per stage (then the ladder: None); an
    explained one goes to the ladder at once. Nothing in the Retries changes: triage decides only."""
    retries = Retries()
    back = triage("denoise", PLAN, EXPLAINED, Plan("group_block"), retries)
    assert (back.kind, back.target, back.action) == ("probe_back", Plan("group_block"), "probe_failed")
    again = triage("denoise", PLAN, UNEXPLAINED, None, retries)
    assert (again.kind, again.target, again.reason) == ("retry", PLAN, "no figures")
    assert triage("denoise", PLAN, EXPLAINED, None, retries) is None
    assert retries.attempts == 0 and retries.same_plan_left("denoise")
    retries.retried_same_plan("denoise")
    assert triage("denoise", PLAN, UNEXPLAINED, None, retries) is None  # the one retry is spent
    assert triage("decode", PLAN, UNEXPLAINED, None, retries).kind == "retry"  # per stage


def test_climb_takes_the_next_rung_and_backs_off_longer_at_the_last_one_then_gives_up():
    ctx = rung_context(autofit(tiny_sdxl(), cache=False, device="cpu"))
    step = climb(Plan(), ("decode",), ctx, host_oom=False, avoid=frozenset(), need=0, measured=None, budget=None,
                 retries=Retries())
    assert step.kind == "escalate" and step.action in LADDERS["decode"] and step.target != Plan()
    top = Plan("group_leaf")  # the CPU's last rung for the denoiser: nothing lowers it further here
    retries, waits = Retries(), []
    while (step := climb(top, ("denoise",), ctx, host_oom=False, avoid=frozenset(), need=0, measured=None,
                         budget=None, retries=retries)).kind == "backoff":
        assert step.target == top and step.action == "retry_same_plan"
        waits.append(step.wait)
        retries.backed_off()
    assert waits == list(LAST_RUNG_BACKOFF) and step.kind == "give_up" and step.target is None


def test_the_plan_fields_have_one_writer():
    """The plan in force, the plan placed, the start plan and the steering plan are read-only from
    outside their owners; a call changes them through the owners' methods only."""
    proxy = autofit(tiny_sdxl(), cache=False, device="cpu")
    rt = engine(proxy)
    for owner, field in [(rt.placement, "plan"), (rt.placement, "applied"), (rt.course, "start"),
                         (rt.course, "steering"), (rt.course, "path"), (rt, "placement")]:
        with pytest.raises(AttributeError):
            setattr(owner, field, Plan())
    run(proxy, "sdxl", num_inference_steps=1)
    assert rt.placement.applied == rt.placement.plan == Plan.from_names(proxy.autofit.plan)
    assert rt.course.path[-1] == rt.placement.plan
