"""Tests that kill the mutants mutmut found alive in relax.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix; ``ǁ`` separates a class from its method). relax.py is pure: these drive a
real :class:`Relaxation` through the calls the runtime makes and read what it decides (which plan
to probe, and when), against the rules in its docstring.
"""

import pytest

from autofit.engine.relax import Relaxation


def _escalated(first_wait=2, max_wait=8, probe_share=1.0):
    r = Relaxation[str](first_wait=first_wait, max_wait=max_wait, probe_share=probe_share)
    r.plan_chosen("planned")
    r.escalated_to("middle")
    r.escalated_to("top")
    return r


def _successes_until_probe(r, elapsed=1e9, limit=100):
    """How many successful calls it takes before ``probe`` offers a step down (and that step)."""
    n = 0
    while (step := r.probe(elapsed)) is None:
        r.call_succeeded()
        n += 1
        assert n <= limit, "never probes"
    return n, step


@pytest.mark.parametrize("first_wait, max_wait", [(0, 16), (-1, 4), (5, 4), (2, 1)])
def test_the_waits_must_be_at_least_one_and_ordered(first_wait, max_wait):
    """``need 1 <= first_wait <= max_wait``: either condition broken alone is refused.
    mutants: relax.xǁRelaxationǁ__post_init____mutmut_1"""
    with pytest.raises(ValueError, match="first_wait"):
        Relaxation(first_wait=first_wait, max_wait=max_wait)


def test_after_a_step_down_held_the_next_probe_waits_first_wait_calls_exactly():
    """"If the probe call completes, that step is undone for good and the wait starts again": the
    count of successes starts from zero, so the next probe comes after ``first_wait`` calls.
    mutants: relax.xǁRelaxationǁcall_succeeded__mutmut_5"""
    r = _escalated(first_wait=3)
    assert _successes_until_probe(r) == (3, "middle")
    r.call_succeeded()  # the probe's own call completed: the step holds
    assert r.path == ["planned", "middle"]
    assert _successes_until_probe(r) == (3, "planned")


def test_after_a_failed_probe_the_next_one_waits_the_doubled_wait_exactly():
    """"If it runs out of memory ... the wait doubles": counted from zero after the failure.
    mutants: relax.xǁRelaxationǁprobe_failed__mutmut_14"""
    r = _escalated(first_wait=2, max_wait=8)
    assert _successes_until_probe(r) == (2, "middle")
    assert r.probe_failed(0.0) == "top"
    assert _successes_until_probe(r) == (4, "middle")


def test_failed_probes_are_counted_and_their_lost_time_adds_up():
    """Failed probes may take at most ``probe_share`` of the run time, all of them together: two
    failures of 1 s each are 2 s lost, over a 3% share of 50 s (1.5 s) but within 3% of 100 s.
    mutants: relax.xǁRelaxationǁprobe_failed__mutmut_15..18"""
    r = _escalated(first_wait=1, max_wait=1, probe_share=0.03)
    for k in (1, 2):
        _successes_until_probe(r, elapsed=1e9)
        r.probe_failed(1.0)
        assert r.failed_probes == k
    assert r.probe_seconds_lost == 2.0
    r.call_succeeded()
    assert r.probe(50.0) is None
    assert r.probe(100.0) == "middle"


def test_a_refused_probe_puts_the_plan_back_and_counts_from_zero_with_the_same_wait():
    """"The plan one step down cannot run here now: no probe; the count of successes starts again,
    the wait unchanged."
    mutants: relax.xǁRelaxationǁprobe_refused__mutmut_1..7"""
    r = _escalated(first_wait=2, max_wait=8)
    assert _successes_until_probe(r) == (2, "middle")
    r.probe_refused()
    assert r.path == ["planned", "middle", "top"] and r.probing is None and r.wait == 2
    assert _successes_until_probe(r) == (2, "middle")
    r.call_succeeded()  # that probe held
    assert r.path == ["planned", "middle"]


def test_refusing_or_failing_a_probe_that_is_not_running_is_a_programming_error():
    """Both refuse alike, saying no probe is running.
    mutants: relax.xǁRelaxationǁprobe_refused__mutmut_1..3, relax.xǁRelaxationǁprobe_failed__mutmut_2..3"""
    messages = []
    for call in (lambda r: r.probe_refused(), lambda r: r.probe_failed(0.0)):
        r = _escalated()
        with pytest.raises(AssertionError) as info:
            call(r)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "no probe" in messages[0]


def test_the_refusal_states_the_rule():
    """mutants: relax.xǁRelaxationǁ__post_init____mutmut_5..7"""
    with pytest.raises(ValueError) as info:
        Relaxation(first_wait=0)
    assert str(info.value) == "need 1 <= first_wait <= max_wait"


def test_the_wait_starts_at_first_wait_before_any_plan_is_chosen():
    """A relaxation fed escalations alone (no ``plan_chosen``) probes after ``first_wait`` calls.
    mutants: relax.xǁRelaxationǁ__post_init____mutmut_8"""
    r = Relaxation[str](first_wait=3, max_wait=8)
    r.escalated_to("planned")
    r.escalated_to("top")
    assert r.wait == 3 and _successes_until_probe(r) == (3, "planned")
