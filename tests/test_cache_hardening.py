"""The plan cache fed real malformed and hostile files: it ignores what it cannot use, never
follows a symlink or opens a FIFO, and never fails the call."""

import json
import math
import os
import stat
import threading
import time

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autofit import autofit
from autofit.facts.cache import MAX_RECORD_BYTES, SCHEMA, PlanCache, record_problem
from autofit.plan import Plan
from autofit.testing import tiny_sdxl

from helpers import run

MALFORMED = {
    "null": "null",
    "list": "[]",
    "string": '"plan"',
    "plan 5": json.dumps({"schema": SCHEMA, "plan": 5}),
    "activations list": json.dumps({"schema": SCHEMA, "plan": [], "activations": [1, 2]}),
    "broken string": json.dumps({"schema": SCHEMA, "plan": [], "broken": "fp8"}),
    "inf activation": '{"schema": 1, "plan": [], "activations": {"denoise": 1e999}}',
    "NaN activation": '{"schema": 1, "plan": [], "activations": {"denoise": NaN}}',
    "negative activation": json.dumps({"schema": SCHEMA, "plan": [], "activations": {"denoise": -5}}),
    "text activation": json.dumps({"schema": SCHEMA, "plan": [], "activations": {"denoise": "abc"}}),
    "nested 100k deep": "[" * 100_000 + "]" * 100_000,
    "not JSON": "{",
}


def _write(cache, key, text):
    cache.plans.mkdir(parents=True, exist_ok=True)
    (cache.plans / f"{key}.json").write_text(text)


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_record_of_the_wrong_shape_is_ignored_with_an_event(tmp_path, name):
    """get() returns None for a record the runtime could not use, and says why in an event."""
    cache = PlanCache(tmp_path)
    _write(cache, "k", MALFORMED[name])
    with structlog.testing.capture_logs() as logs:
        assert cache.get("k") is None
    assert [e["event"] for e in logs] == ["autofit.cache_record_ignored"] and logs[0]["reason"]
    cache.update("k", lambda r: {**(r or {}), "plan": ["model_offload"]})  # replaced, not merged with junk
    assert cache.get("k")["plan"] == ["model_offload"]


def test_a_huge_record_is_not_read(tmp_path):
    """A 1 GB record (sparse: no disk used) is refused by its size before anything is read."""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    with open(cache.plans / "k.json", "wb") as f:
        f.truncate(1 << 30)
    t = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        assert cache.get("k") is None
    assert time.perf_counter() - t < 1.0
    assert str(MAX_RECORD_BYTES) in logs[0]["reason"]


def _in_thread(fn, timeout=10):
    """Run fn in a thread; fail (instead of hanging the suite) when it does not return."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the cache call hung"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_planted_as_lock_or_record_does_not_hang(tmp_path):
    """A FIFO named like a lock makes the update fail with an OSError (the runtime logs and goes
    on); a FIFO named like a record reads as no record. Neither blocks."""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    os.mkfifo(cache.plans / "k.lock")
    box = _in_thread(lambda: cache.update("k", lambda r: {"plan": []}))
    assert isinstance(box.get("error"), OSError) and "regular file" in str(box["error"])
    os.mkfifo(cache.plans / "r.json")
    box = _in_thread(lambda: cache.get("r"))
    assert "error" not in box and box["value"] is None


def test_symlinks_are_not_followed(tmp_path):
    """A symlinked lock does not create its target; a symlinked record is not read; a symlinked
    plans folder receives no writes."""
    cache = PlanCache(tmp_path / "c")
    cache.plans.mkdir(parents=True)
    target = tmp_path / "victim"
    (cache.plans / "k.lock").symlink_to(target)
    with pytest.raises(OSError):
        cache.update("k", lambda r: {"plan": []})
    assert not target.exists()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"schema": SCHEMA, "plan": ["model_offload"]}))
    (cache.plans / "s.json").symlink_to(secret)
    assert cache.get("s") is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = PlanCache(tmp_path / "d")
    other.directory.mkdir()
    other.plans.symlink_to(elsewhere)
    with pytest.raises(OSError, match="plans folder"):
        other.put("k", {"plan": []})
    assert list(elsewhere.iterdir()) == [] and other.get("k") is None


@pytest.mark.parametrize("folder_mode, record_mode", [(0o700, 0o600), (0o750, 0o640), (0o755, 0o644)])
def test_records_are_as_readable_as_their_folder(tmp_path, folder_mode, record_mode):
    """A plans folder the group can enter gets group-readable records (and locks), whatever the umask."""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    cache.plans.chmod(folder_mode)
    old = os.umask(0o077)
    try:
        cache.update("k", lambda r: {"plan": []})
    finally:
        os.umask(old)
    assert stat.S_IMODE((cache.plans / "k.json").stat().st_mode) == record_mode
    assert stat.S_IMODE((cache.plans / "k.lock").stat().st_mode) == record_mode


def test_the_runtime_ignores_a_malformed_record_and_replaces_it(tmp_path):
    """The wrapper's own record overwritten with wrong shapes: every call succeeds, equals a
    call without cache, and leaves a usable record behind."""
    small = dict(num_inference_steps=1, height=16, width=16)
    reference = run(autofit(tiny_sdxl(), cache=False), "sdxl", **small)
    cache_dir = tmp_path / "cache"
    run(autofit(tiny_sdxl(), cache=cache_dir), "sdxl", **small)
    (path,) = (cache_dir / "plans").glob("*.json")
    for name in ("null", "inf activation", "text activation"):
        path.write_text(MALFORMED[name])
        images = run(autofit(tiny_sdxl(), cache=cache_dir), "sdxl", **small)
        assert (images == reference).all(), name
        assert record_problem(json.loads(path.read_text())) is None, name


# ---- fuzz ---------------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_record = st.one_of(
    _json,
    st.fixed_dictionaries({"schema": st.just(SCHEMA)}, optional={
        "plan": _json | st.lists(st.sampled_from(["model_offload", "vae_tiling", "teleport", ""]), max_size=3),
        "activations": _json | st.dictionaries(st.sampled_from(["encode", "denoise", "decode"]), _json, max_size=3),
        "broken": _json | st.dictionaries(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=2)),
        "key": _json, "updated": _json}),
)


def _as_the_runtime_reads_it(record):
    """What runtime._choose_plan and the cache updates do with a record (runtime.py)."""
    for strategy, names in record.get("broken", {}).items():
        set().update(names)
    try:
        Plan.from_names(tuple(record["plan"]))
    except (KeyError, ValueError):
        pass
    {k: int(v) for k, v in record.get("activations", {}).items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=_record)
def test_fuzzed_records_never_fail_a_call(tmp_path, record):
    """Any JSON at all in a record file: get() returns None or a record the runtime's reads
    accept, and an update over it succeeds."""
    cache = PlanCache(tmp_path)
    _write(cache, "fuzz", json.dumps(record, allow_nan=True))
    got = cache.get("fuzz")
    if got is not None:
        _as_the_runtime_reads_it(got)
        assert all(math.isfinite(v) for v in got.get("activations", {}).values())
    cache.update("fuzz", lambda r: {**(r or {}), "activations": {"denoise": 1}})
    assert cache.get("fuzz")["activations"] == {"denoise": 1}


# ---- values that contradict this machine, and what dead writers leave --------------------
def test_a_poisoned_activation_is_dropped_and_the_record_repaired(tmp_path):
    """A stored activation of 2**49 bytes (within the accepted bound, but no run on this machine
    can have measured it) would make every process find no plan that fits: it is ignored with a
    warning, the stored plan is used, the call equals a call without cache, and the record that
    is written back no longer holds it."""
    small = dict(num_inference_steps=1, height=16, width=16)
    reference = run(autofit(tiny_sdxl(), cache=False), "sdxl", **small)
    cache_dir = tmp_path / "cache"
    first = autofit(tiny_sdxl(), cache=cache_dir)
    run(first, "sdxl", **small)
    (path,) = (cache_dir / "plans").glob("*.json")
    record = json.loads(path.read_text())
    record["activations"] = {**record.get("activations", {}), "denoise": 2**49}
    path.write_text(json.dumps(record))
    assert record_problem(record) is None  # the shape is fine: only its value is wrong
    proxy = autofit(tiny_sdxl(), cache=cache_dir)
    with structlog.testing.capture_logs() as logs:
        images = run(proxy, "sdxl", **small)
    assert (images == reference).all()
    (ignored,) = [e for e in logs if e["event"] == "autofit.cache_value_ignored"]
    assert ignored["stage"] == "denoise" and ignored["value"] == 2**49
    (pre,) = [e for e in logs if e["event"] == "autofit.preflight"]
    assert pre["source"] == "cache" and "reason" not in pre  # no "no plan predicted to fit"
    assert json.loads(path.read_text())["activations"].get("denoise") != 2**49


def test_a_stored_activation_the_measurement_contradicts_is_replaced():
    """The merge keeps the larger of two measurements of one workload, unless the stored one is
    at least twice what this process measured: then the measurement replaces it."""
    from autofit.engine.measurements import merge_activations

    gib = 2**30
    assert merge_activations({"denoise": 64 * gib}, {"denoise": gib}, "k") == {"denoise": gib}
    assert merge_activations({"denoise": gib + gib // 2}, {"denoise": gib}, "k") == {"denoise": gib + gib // 2}
    assert merge_activations({"decode": gib}, {"decode": 2 * gib}, "k") == {"decode": 2 * gib}


def test_an_unknown_rung_in_a_stored_plan_is_reported_not_dropped_silently(tmp_path):
    """A record naming a rung this autofit does not know (written by another version) is
    planned again with a warning that names it."""
    small = dict(num_inference_steps=1, height=16, width=16)
    cache_dir = tmp_path / "cache"
    run(autofit(tiny_sdxl(), cache=cache_dir), "sdxl", **small)
    (path,) = (cache_dir / "plans").glob("*.json")
    record = json.loads(path.read_text())
    record["plan"] = ["teleport_weights"]
    path.write_text(json.dumps(record))
    proxy = autofit(tiny_sdxl(), cache=cache_dir)
    with structlog.testing.capture_logs() as logs:
        run(proxy, "sdxl", **small)
    (ignored,) = [e for e in logs if e["event"] == "autofit.cache_record_ignored"]
    assert "teleport_weights" in ignored["reason"]
    (pre,) = [e for e in logs if e["event"] == "autofit.preflight"]
    assert pre["source"] == "planner"


_HANG_IN_PUT = """
import sys, time
from autofit.facts.cache import PlanCache

class Slow:
    def __str__(self):  # json.dump calls it while the temporary file is open
        print("writing", flush=True)
        time.sleep(600)
        return "x"

PlanCache(sys.argv[1]).put("k", {"plan": [], "note": Slow()})
"""


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    """A writer killed (SIGKILL) while its temporary file is open leaves it behind; the next
    write removes it once it is older than any write can take, and leaves a fresh one alone."""
    import signal
    import subprocess
    import sys

    from autofit.facts.cache import STALE_TEMPORARY_SECONDS

    proc = subprocess.Popen([sys.executable, "-c", _HANG_IN_PUT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (left,) = [p for p in (tmp_path / "plans").iterdir() if p.name.endswith(".tmp")]
    cache = PlanCache(tmp_path)
    cache.update("other", lambda r: {"plan": []})
    assert left.exists()  # a write that may still be going on is not touched
    old = time.time() - STALE_TEMPORARY_SECONDS - 1
    os.utime(left, (old, old))
    user_file = tmp_path / "plans" / "notes.tmp"  # not of put's naming: never removed
    user_file.write_text("mine")
    os.utime(user_file, (old, old))
    cache.update("other", lambda r: {"plan": []})
    assert not left.exists() and user_file.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["notes.tmp", "other.json", "other.lock"]
