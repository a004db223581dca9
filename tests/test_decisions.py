"""Tests that pin the decisions where a wrong one loses a user's call or data (issue 26).

Each test here kills at least one hand-made mutant that the rest of the suite accepted (the
mutant is named in the test's docstring, ``mutant:``); ``benchmarks/mutate.py`` re-applies every
one of them to a scratch copy of the sources and checks that its test still fails on it. The
tests assert what a user can observe: a failed switch leaves the previous plan in force with its
weights where they were, a changed seed remakes exactly that image, an item's unexpected error is
recorded and the job goes on, a crash mid-write never leaves a torn record.

Pure decisions (OOM classification, the relaxation's wait, the rung table's needs, the cache's
loader) are tested on real objects without a pipeline; the rest on autofit.testing's tiny
pipelines, a few calls each.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from autofit import AutoFitExhausted, autofit
from autofit import _diffusers
from autofit.batch.runner import iter_manifest, run_batch
from autofit.batch.items import BatchItem, read_items
from autofit.facts.cache import PlanCache
from autofit.planning.ladder import LADDERS
from autofit.engine.oom import classify
from autofit.plan import Plan
from autofit.engine.state import LAST_RUNG_BACKOFF
from autofit.engine.relax import Relaxation
from autofit.planning.rungs import refusal
from autofit.testing import inject_oom, oom_error, tiny_sdxl

from helpers import placed_plan, run, rung_context, switch_plan

FAST = {"num_inference_steps": 2}
TINY = {"height": 16, "width": 16, "num_inference_steps": 1}  # one batch image: a fraction of a second


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny pipelines run on one intra-op thread here: on a busy machine (the mutation runs
    start two workers on two cores) torch's spinning threads make them a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- placement.py: the transactional switch on its failure path ---------------------------------
class NoOffloadSeqPipeline(StableDiffusionXLPipeline):
    """A real pipeline class without a model offload order: diffusers refuses model offload with
    a ValueError (not an OOM) in the middle of a switch, after the old placement was torn down."""

    model_cpu_offload_seq = None


def test_a_switch_that_fails_leaves_the_previous_plan_placed_and_the_pipeline_usable():
    """mutant: placement.py without the rollback ``_restore(...)``; mutant: ``_restore`` without
    ``self._applied = previous``. The previous plan (block-level group offload, hooks on the
    denoiser) must be in force *and placed* again after diffusers refuses the target, so the next
    call runs without placing anything and makes the same image."""
    proxy = autofit(NoOffloadSeqPipeline(**tiny_sdxl().components), plan=("group_block",), cache=False)
    before = run(proxy, "sdxl", **FAST)
    unet = proxy.unet
    assert _diffusers.group_offload_config(unet) is not None  # the previous plan's hooks
    with pytest.raises(ValueError, match="model_cpu_offload_seq"):
        switch_plan(proxy, Plan("model_offload"))
    assert proxy.autofit.plan == ("group_block",)
    assert placed_plan(proxy) == Plan("group_block"), "the previous plan is not placed: the next call places it again"
    assert _diffusers.group_offload_config(unet) is not None, "the previous plan's hooks were not put back"
    torch.testing.assert_close(run(proxy, "sdxl", **FAST), before)


# ---- oom.py: what counts as an OOM -----------------------------------------------------------
@pytest.mark.parametrize("cls", [ValueError, KeyError, AssertionError, Exception])
def test_an_exception_that_is_not_a_runtime_error_is_never_an_oom_whatever_it_says(cls):
    """mutant: oom.py without the "not a RuntimeError -> not an OOM" guard. A user's error with
    the allocator's exact wording is the user's error: recovery must not swallow it."""
    for kind in ("cuda", "cpu"):
        message = str(oom_error(kind))
        assert classify(oom_error(kind)) is not None  # the real one is an OOM
        assert classify(cls(message)) is None, f"{cls.__name__}({message[:40]!r}...) taken for an OOM"


def test_an_error_raised_while_handling_an_oom_counts_only_if_it_quotes_the_whole_line():
    """mutant: ``_quotes`` weakened to the first 12 characters of the OOM's first line. An error
    raised in an OOM handler that shares a prefix with the OOM's message (``CUDA out of ``) but
    does not quote it is that error, not an OOM; one that quotes the line is the OOM."""
    oom = oom_error("cuda")
    first_line = str(oom).splitlines()[0]

    def raised_while_handling(message):
        try:
            try:
                raise oom
            except torch.OutOfMemoryError:
                raise RuntimeError(message)
        except RuntimeError as exc:
            return exc

    assert classify(raised_while_handling("fallback failed: CUDA out of disk quota on the node")) is None
    quoted = classify(raised_while_handling(f"fallback failed: {first_line}"))
    assert quoted is not None and quoted.kind.value == "device"


def test_an_oom_is_reported_by_its_first_two_sentences_or_its_type():
    """mutmut survivors in ``_head``: the head of an OOM (what the events, the history and
    AutoFitExhausted show) is its message's first two sentences; Python's ``MemoryError()``
    usually has no message at all, and then the head names its type, never ``NoneType``."""
    oom = oom_error("cuda")
    head = classify(oom).head
    assert str(oom).startswith(head) and head.count(". ") == 1 and str(oom).count(". ") > 1
    assert classify(MemoryError()).head == "MemoryError"


def test_a_cycle_in_the_cause_chain_ends_the_search():
    """mutmut survivors in ``classify``: a chain whose causes loop back (a library that sets
    ``__cause__`` by hand) is searched once and found not to be an OOM; the search ends."""
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first
    assert classify(first) is None


# ---- relax.py: the way back down --------------------------------------------------------------
def test_a_step_down_that_held_a_whole_call_resets_the_wait():
    """mutant: relax.py not resetting ``wait`` after a probe held for a whole call. After a
    failed probe doubled the wait, a probe that holds makes the next step down come after
    ``first_wait`` successes again, not after the doubled wait."""
    relax = Relaxation(first_wait=2, max_wait=8)
    relax.plan_chosen("planned")
    relax.escalated_to("middle")
    relax.escalated_to("top")

    def succeed(n):
        for _ in range(n):
            relax.call_succeeded()

    succeed(relax.first_wait)
    assert relax.probe(elapsed_seconds=1e9) == "middle"
    relax.probe_failed(seconds_lost=0.0)  # back on "top", the wait doubled
    waited = 0
    while relax.probe(elapsed_seconds=1e9) is None:
        relax.call_succeeded()
        waited += 1
        assert waited <= relax.max_wait
    assert waited > relax.first_wait  # the failed probe made it wait longer
    relax.call_succeeded()  # the probe on "middle" held for the whole call
    succeed(relax.first_wait)
    assert relax.probe(elapsed_seconds=1e9) == "planned", "the wait was not reset after a step down held"


# ---- recovery.py: back-off, glue blame, the origin stage ----------------------------------------
def test_the_last_rung_backoff_waits_longer_each_time_then_gives_up(backoff_waits):
    """mutant: recovery.py's last-rung back-off always using its first delay. With no rung left
    (leaf group offload on the CPU), each retry of the plan in force waits longer than the one
    before; when the waits run out, the call raises AutoFitExhausted."""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("group_leaf",))
    retries = len(LAST_RUNG_BACKOFF)
    with inject_oom(proxy, stage="denoise", at=2, times=retries):
        run(proxy, "sdxl", **FAST)
    assert len(backoff_waits) == retries
    assert all(a < b for a, b in zip(backoff_waits, backoff_waits[1:])), backoff_waits
    backoff_waits.clear()
    with inject_oom(proxy, stage="denoise", at=2, times=retries + 1):
        with pytest.raises(AutoFitExhausted):
            run(proxy, "sdxl", **FAST)
    assert len(backoff_waits) == retries


def test_an_oom_in_glue_before_the_decode_is_blamed_on_the_decode():
    """mutant: a glue OOM recorded as a denoise OOM (runtime.py passing ``"denoise"`` instead of
    ``wrappers.glue_stage()``). An OOM from the scheduler's last step (glue code whose next
    component call is the VAE's decode) escalates on the decode ladder, not the denoiser's."""
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl", **FAST)  # the call order is known from now on
    with inject_oom(proxy, stage="glue", at=FAST["num_inference_steps"]) as fault:
        run(proxy, "sdxl", **FAST)
    assert fault.fired == 1
    (record,) = proxy.autofit.history
    assert (record.scope, record.stage) == ("call", "decode")
    assert record.action in LADDERS["decode"]


def test_a_load_oom_while_placing_the_next_rung_goes_on_up_the_failing_stages_ladder(backoff_waits):
    """mutant: recovery.py's retried stages losing the origin stage (``(stage,)`` instead of
    ``(stage, origin)``). A denoise OOM under model offload escalates to block-level group
    offload; placing it runs out (a load OOM). The load ladder has nothing left above model
    offload, so the denoise ladder must go on (a real rung), not a wait at the last rung."""
    proxy = autofit(tiny_sdxl(), cache=False, plan=("model_offload",))
    run(proxy, "sdxl", **FAST)
    with inject_oom(proxy, stage="denoise", at=1) as denoise:
        with inject_oom(proxy, stage="load", when=lambda n: denoise.fired == 1 and not load.fired,
                        expect_fire=True) as load:
            image = run(proxy, "sdxl", **FAST)
    assert image.shape[0] == 1
    stages = [(r.stage, r.action) for r in proxy.autofit.history]
    assert stages[0][0] == "denoise" and stages[1][0] == "load", stages
    assert stages[1][1] in LADDERS["denoise"], stages
    assert backoff_waits == [], "waited at the last rung though the denoise ladder had rungs left"


# ---- rungs.py: what a rung needs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx():
    """What the rung table judges against, for a real tiny pipeline on this machine."""
    return rung_context(autofit(tiny_sdxl(), cache=False))


def _workload(ctx, **change):
    return replace(ctx, workload=replace(ctx.workload, **change))


def _machine(ctx, **change):
    return replace(ctx, machine=replace(ctx.machine, **change))


def test_split_batch_is_refused_at_batch_one(ctx):
    """mutant: rungs.py allowing ``split_batch`` at batch 1 (nothing to split: the rung would be
    taken, change nothing, and use up an escalation)."""
    for name in ("split_batch", "split_batch_max"):
        plan = Plan().with_rung(name)
        assert refusal(name, plan, _workload(ctx, batch=2)) is None
        assert refusal(name, plan, _workload(ctx, batch=1)) is not None


def test_group_disk_is_refused_when_free_disk_space_is_unknown(ctx):
    """mutant: rungs.py treating "free disk space unknown" as enough: writing the weights to a
    disk that may be full would fail the call; the rung is passed over instead."""
    plan = Plan("group_disk")
    assert refusal("group_disk", plan, ctx) is None
    assert refusal("group_disk", plan, _machine(ctx, disk_available_bytes=None, disk_unusable=None)) is not None


def test_host_ram_need_is_compared_against_the_share_the_rule_allows(ctx):
    """mutant: rungs.py comparing the host RAM a plan holds against all available RAM instead of
    the share (``cost.HOST_SHARE``) the rule allows. A plan that needs more than that share but
    less than all of it is refused: the rest is the process's and the system's."""
    from autofit.planning import cost

    plan = Plan("model_offload")
    held = cost.host_bytes(plan, ctx.footprint)
    assert held > 0
    available = int(held / (cost.HOST_SHARE + (1 - cost.HOST_SHARE) / 2))  # above the share, below all
    assert cost.HOST_SHARE * available < held < available
    assert refusal("model_offload", plan, _machine(ctx, host_available_bytes=2 * held)) is None
    reason = refusal("model_offload", plan, _machine(ctx, host_available_bytes=available))
    assert reason is not None and "host RAM" in reason


# ---- cache.py: the typed loader and atomic writes ------------------------------------------------
def test_a_record_whose_running_field_is_not_a_list_of_rung_names_is_ignored(tmp_path):
    """mutant: cache.py without the validation of ``running``. A real record (written by a run)
    whose ``running`` a hand edit (or another program) turned into a string is not used."""
    proxy = autofit(tiny_sdxl(), cache=tmp_path)
    run(proxy, "sdxl", **TINY)
    (path,) = (tmp_path / "plans").glob("*.json")
    cache = PlanCache(tmp_path)
    assert cache.get(path.stem) is not None
    record = json.loads(path.read_text())
    record["running"] = "+".join(record["running"]) or "device"
    path.write_text(json.dumps(record))
    assert cache.get(path.stem) is None
    (entry,) = cache.entries()
    assert entry.record is None and "running" in entry.problem


_KILLED_MID_WRITE = """
import json, os, sys
from autofit.facts.cache import PlanCache

def half_then_killed(obj, f, **kwargs):  # the process dies with half of the record written
    text = json.dumps(obj, **kwargs)
    f.write(text[: len(text) // 2])
    f.flush()
    os.fsync(f.fileno())
    os._exit(9)

json.dump = half_then_killed
PlanCache(sys.argv[1]).put(sys.argv[2], {"plan": ["group_leaf"], "running": ["group_leaf"]})
"""


def test_a_process_killed_mid_write_never_leaves_a_torn_record(tmp_path):
    """mutant: cache.py writing the record in place instead of through a temporary file renamed
    into place. A writer killed with half of the new record written leaves the old record whole
    (readers and the next process see it), never half of the new one."""
    key = "k" * 32
    cache = PlanCache(tmp_path)
    cache.put(key, {"plan": ["model_offload"], "running": ["model_offload"]})
    old = cache.get(key)
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path), key], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 9, done.stderr[-2000:]
    assert cache.get(key) == old, "the killed write tore the record"
    cache.put(key, {"plan": ["group_block"]})  # and the next writer still writes
    assert cache.get(key)["plan"] == ["group_block"]


# ---- batch.py / batch_items.py: keys, finished items, ids, item errors, the manifest ------------
@pytest.fixture(scope="module")
def proxy():
    """One tiny pipeline for the batch tests (each test writes its own folder)."""
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return autofit(pipe, cache=False)


def _items(**seeds):
    return [BatchItem(name, f"a photo of {name}", seed, dict(TINY)) for name, seed in seeds.items()]


def _pixels(path):
    return np.asarray(Image.open(path))


def test_a_changed_seed_remakes_exactly_that_image(proxy, tmp_path):
    """mutant: batch.py's resume key without the seed (a rerun with a changed seed would keep
    the old image). The rerun makes that item again, with the new seed, and skips the other."""
    run_batch(proxy, _items(a=1, b=2), tmp_path, progress=False)
    old_a, old_b = _pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png")
    report = run_batch(proxy, _items(a=1, b=3), tmp_path, progress=False)
    assert (report.done, report.skipped) == (["b"], ["a"])
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), old_a)
    new_b = _pixels(tmp_path / "b.png")
    assert not np.array_equal(new_b, old_b)
    fresh = tmp_path / "fresh"
    run_batch(proxy, _items(b=3), fresh, progress=False)  # what seed 3 makes, in a folder of its own
    np.testing.assert_array_equal(new_b, _pixels(fresh / "b.png"))


def test_a_finished_item_whose_image_is_gone_is_made_again(proxy, tmp_path):
    """mutant: batch.py's finished-check not verifying that the item's files exist. The manifest
    says "ok", but the image was deleted (or never reached the disk): the rerun makes it again."""
    run_batch(proxy, _items(a=1, b=2), tmp_path, progress=False)
    (tmp_path / "a.png").unlink()
    report = run_batch(proxy, _items(a=1, b=2), tmp_path, progress=False)
    assert (report.done, report.skipped) == (["a"], ["b"])
    assert (tmp_path / "a.png").is_file()


def test_ids_that_differ_only_in_case_are_one_file_and_collide(proxy, tmp_path):
    """mutant: id collisions compared case-sensitively (read_items, items built in code, and the
    names an item's several images take). On a case-insensitive file system (macOS, Windows)
    ``Cat.png`` and ``cat.png`` are one file: the second item would overwrite the first. Whichever
    comes first, the second is rejected, and its failure never marks the first."""
    for ids in (("cat", "Cat"), ("Cat", "cat")):  # either one first
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("\n".join(json.dumps({"id": i, "prompt": "a cat"}) for i in ids) + "\n")
        good, rejected = read_items(prompts)
        assert [i.id for i in good] == [ids[0]] and len(rejected) == 1 and rejected[0].line == 2

    # Built in code: a case twin, and an exact twin of an id with capitals. The twin's failure is
    # recorded apart, never under the id of the item that owns it (a rerun would make it again).
    items = [*_items(cat=1, Cat=2, Dog=3), *_items(Dog=4)]
    report = run_batch(proxy, items, tmp_path / "in_code", progress=False)
    assert report.done == ["cat", "Dog"] and len(report.failed) == 2
    assert not set(report.failed) & set(report.done), report.failed
    assert sorted(p.name for p in (tmp_path / "in_code").glob("*.png")) == ["Dog.png", "cat.png"]
    again = run_batch(proxy, items, tmp_path / "in_code", progress=False)
    assert (again.done, again.skipped) == ([], ["cat", "Dog"])

    two = [BatchItem("a", "a cat", 1, {**TINY, "num_images_per_prompt": 2}), *_items(A_0=2)]
    report = run_batch(proxy, two, tmp_path / "names", progress=False)
    assert report.done == ["a"] and list(report.failed) == ["A_0"]


def test_an_unexpected_error_of_one_item_is_recorded_and_the_job_goes_on(proxy, tmp_path):
    """mutant: batch.py's per-item catch narrowed to ``(TypeError, ValueError)``. A RuntimeError
    from the VAE on the second item (a CUDA error, a kernel's failure) is recorded in the manifest
    as that item's failure; the third item is made; a rerun tries the failed item again."""
    decodes = []

    def fail_second(module, args):
        decodes.append(1)
        if len(decodes) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    hook = proxy.vae.decoder.register_forward_pre_hook(fail_second)
    try:
        report = run_batch(proxy, _items(a=1, b=2, c=3), tmp_path, progress=False)
    finally:
        hook.remove()
    assert report.done == ["a", "c"] and list(report.failed) == ["b"]
    assert "RuntimeError" in report.failed["b"] and "illegal memory access" in report.failed["b"]
    (failed,) = [r for r in iter_manifest(tmp_path) if r["status"] == "failed"]
    assert failed["id"] == "b" and "illegal memory access" in failed["error"]
    again = run_batch(proxy, _items(a=1, b=2, c=3), tmp_path, progress=False)
    assert (again.done, again.skipped) == (["b"], ["a", "c"])


def test_a_torn_manifest_line_is_repaired_so_the_next_record_is_not_lost(proxy, tmp_path):
    """mutant: batch.py leaving the torn last manifest line unrepaired. A kill mid-append leaves
    the last record without its end; the rerun makes that item again, and its new record must be
    a line of its own: a third run finds everything finished instead of making the item again."""
    items = _items(a=1, b=2)
    run_batch(proxy, items, tmp_path, progress=False)
    manifest = tmp_path / "manifest.jsonl"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 20])  # the kill: b's record cut short, no newline
    second = run_batch(proxy, items, tmp_path, progress=False)
    assert (second.done, second.skipped) == (["b"], ["a"])
    third = run_batch(proxy, items, tmp_path, progress=False)
    assert (third.done, third.skipped) == ([], ["a", "b"]), "the redone item's record was glued to the torn line"
    assert Path(tmp_path / "b.png").is_file()
