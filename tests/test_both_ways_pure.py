"""The pure parts of plans that go both ways: why an OOM happened, and the way back down."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autofit.planning.explain import OOMFigures, judge
from autofit.engine.relax import Relaxation
from autofit.testing import OOM_MESSAGES

GIB = 2**30

# torch's allocator message, as printed on a shared 80 GiB card where another process held 60 GiB.
SHARED = ("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
          "2.50 GiB is free. Process 4242 has 60.00 GiB memory in use. Including non-PyTorch memory, this "
          "process has 16.60 GiB memory in use. Of the allocated memory 15.90 GiB is allocated by PyTorch, and "
          "200.00 MiB is reserved by PyTorch but unallocated.")
FRAGMENTED = ("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 23.57 GiB of which "
              "300.00 MiB is free. Including non-PyTorch memory, this process has 23.20 GiB memory in use. Of the "
              "allocated memory 19.10 GiB is allocated by PyTorch, and 3.70 GiB is reserved by PyTorch but "
              "unallocated. If reserved but unallocated memory is large try setting "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
CAPPED = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
          "120.00 GiB is free. Including non-PyTorch memory, this process has 19.00 GiB memory in use. 20.00 GiB "
          "allowed; Of the allocated memory 18.20 GiB is allocated by PyTorch, and 300.00 MiB is reserved by "
          "PyTorch but unallocated.")  # CUDA's text under set_per_process_memory_fraction (torch 2.1+)


def test_the_figures_of_torchs_message_are_read():
    f = OOMFigures.parse(SHARED)
    assert (f.requested, f.process, f.reserved_unallocated) == (4 * GIB, int(16.6 * GIB), 200 * 2**20)
    assert f.others == pytest.approx(60.09 * GIB, rel=1e-3)
    assert OOMFigures.parse(CAPPED).allowed == 20 * GIB


@pytest.mark.parametrize("message, cause", [
    (OOM_MESSAGES["cuda"][1], "plan"),  # this process held 7.5 of 8 GiB: its own plan filled it
    (SHARED, "others"),  # 16.6 of 79 GiB: another process took the rest
    (FRAGMENTED, "fragmentation"),  # 3.7 GiB reserved but unallocated, 1.5 asked for
    (CAPPED, "plan"),  # the per-process cap (20 GiB) is the capacity that counts
    (OOM_MESSAGES["cudnn"][1], "unknown"),  # no figures, no prediction
])
def test_an_oom_is_explained_by_the_plan_only_when_its_figures_say_so(message, cause):
    verdict = judge(message)
    assert verdict.cause == cause and verdict.explained == (cause == "plan")


def test_without_figures_the_prediction_against_the_budget_decides():
    no_figures = OOM_MESSAGES["cuda_runtime"][1]
    assert judge(no_figures, predicted_peak=9 * GIB, budget=8 * GIB).cause == "plan"
    assert judge(no_figures, predicted_peak=5 * GIB, budget=8 * GIB).cause == "unknown"


def test_a_probe_steps_back_down_after_a_quiet_run():
    r = Relaxation[str](first_wait=2, max_wait=8)
    r.plan_chosen("device")
    r.escalated_to("offload")
    r.escalated_to("group")
    assert r.path == ["device", "offload", "group"]
    assert r.probe(100.0) is None
    r.call_succeeded()
    r.call_succeeded()
    assert r.probe(100.0) == "offload"  # one step down, not straight to the bottom
    r.call_succeeded()  # the probe call completed: the step holds
    assert r.path == ["device", "offload"] and r.probing is None
    r.call_succeeded()
    r.call_succeeded()
    assert r.probe(100.0) == "device"
    r.call_succeeded()
    assert not r.escalated and r.path == ["device"]


def test_a_failed_probe_goes_back_and_doubles_the_wait_up_to_the_cap():
    r = Relaxation[str](first_wait=2, max_wait=8)
    r.plan_chosen("device")
    r.escalated_to("offload")
    waits = []
    for _ in range(5):
        while (probe := r.probe(1e9)) is None:
            r.call_succeeded()
        assert probe == "device"
        assert r.probe_failed(0.1) == "offload"
        waits.append(r.wait)
    assert waits == [4, 8, 8, 8, 8] and r.path == ["device", "offload"]


def test_failed_probes_are_held_to_their_share_of_the_time():
    r = Relaxation[str](first_wait=1, max_wait=1, probe_share=0.05)
    r.plan_chosen("a")
    r.escalated_to("b")
    r.call_succeeded()
    assert r.probe(10.0) == "a"
    r.probe_failed(1.0)  # 1 s lost in 10 s of running: over 5%
    r.call_succeeded()
    assert r.probe(10.0) is None
    assert r.probe(20.0) == "a"  # 1 s in 20 s is within 5%


def test_escalating_to_a_plan_on_the_path_cuts_the_path():
    r = Relaxation[str]()
    r.plan_chosen("a")
    for p in ("b", "c", "b"):
        r.escalated_to(p)
    assert r.path == ["a", "b"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ok", "oom_escalate", "oom_probe"]), max_size=300))
def test_the_path_never_loses_the_planned_plan_nor_repeats_one(events):
    """Whatever happens, the planned plan stays first, no plan appears twice, and a probe is only
    ever one step below the plan in force."""
    r = Relaxation[int](first_wait=1, max_wait=4, probe_share=1.0)
    r.plan_chosen(0)
    top = 0
    for e in events:
        probe = r.probe(1e9)
        if probe is not None:
            assert probe == r.path[-1] and r.probing is not None
        if e == "ok":
            r.call_succeeded()
        elif e == "oom_probe" and r.probing is not None:
            r.probe_failed(0.0)
        elif e == "oom_escalate":
            if r.probing is not None:
                r.probe_failed(0.0)
            top += 1
            r.escalated_to(top)
        assert r.path[0] == 0 and len(set(r.path)) == len(r.path)
