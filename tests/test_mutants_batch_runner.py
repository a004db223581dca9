"""Tests that kill the mutants mutmut found alive in batch/runner.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). The references are independent of the runner: the resume key recomputed
with hashlib from the documented fields (prompt, seed, settings, model), manifests read back line
by line with the standard json module, real OSErrors (a folder where an image goes, a folder that
vanishes, /dev/full under the manifest, /proc/self/mem as an unreadable manifest), real processes
for the temporaries' owners, the documented event fields (docs/logging.md) captured with
structlog's ``capture_logs``, and the wall clock around a run. Pure decisions (keys, screening, name
claims, ``pending``, torn lines, shards) need no pipeline; the rest share one tiny SDXL pipeline,
one inference step at 16x16.
"""

import copy
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from structlog.testing import capture_logs

from autofit import autofit
from autofit.batch.items import BatchItem, RejectedItem, id_problem
from autofit.batch.runner import (BatchError, _claim_names, _clean_temporaries, _end_torn_line, _screen, item_key,
                                  iter_manifest, pending, run_batch)
from autofit.testing import inject_oom, tiny_sdxl

TINY = {"height": 16, "width": 16, "num_inference_steps": 1}
SDXL = StableDiffusionXLPipeline.__name__
MODEL = f"{SDXL}:"  # "<pipeline class>:<name_or_path>" (pending's docs); the tiny pipeline has no name


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    """One tiny pipeline, wrapped once, and a pristine copy of its components for the tests that
    need a pipeline of their own (copies: a second tiny_sdxl() would cost seconds)."""
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    pristine = copy.deepcopy(pipe.components)
    return autofit(pipe, cache=False), pristine


@pytest.fixture
def proxy(built):
    return built[0]


def _fresh(built, cls=StableDiffusionXLPipeline):
    pipe = cls(**copy.deepcopy(built[1]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref_key(prompt, seed, settings, model=MODEL):
    """The resume key, from the documented fields: sha256 of their JSON with sorted keys."""
    fields = {"prompt": prompt, "seed": seed, "settings": settings, "model": model}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _lines(out, name="manifest.jsonl"):
    """Every line of a manifest, each parsed by the standard json module (a stray empty line, a
    glued or NUL-padded line fails here)."""
    text = (out / name).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _events(logs, name):
    return [{k: v for k, v in e.items() if k not in ("event", "log_level")} for e in logs
            if e["event"] == f"autofit.{name}"]


def _levels(logs, name):
    return {e["log_level"] for e in logs if e["event"] == f"autofit.{name}"}


def _write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _escalations(proxy, before):
    return json.loads(json.dumps([r.as_dict() for r in proxy.autofit.history[before:]]))


# ---- the resume key ---------------------------------------------------------------------------------
def test_item_key_is_the_sha256_of_the_documented_fields_with_sorted_keys():
    """The key is stable across processes and orderings: the sha256 of {prompt, seed, settings,
    model} as JSON with sorted keys (a value JSON cannot take is written as its str), 24 hex
    digits. Every field counts; the order of the settings does not.
    mutants: batch.runner.x_item_key__mutmut_1..18"""
    item = BatchItem("a", "a red cat", 7, {"height": 16})
    settings = {"width": 16, "height": 16, "out": Path("/tmp/x")}
    expected = ref_key("a red cat", 7, settings, "SDXL:org/model")
    assert item_key(item, settings, "SDXL:org/model") == expected and len(expected) == 24
    reordered = dict(reversed(list(settings.items())))
    assert item_key(item, reordered, "SDXL:org/model") == expected
    others = {item_key(BatchItem("a", "a blue cat", 7), settings, "SDXL:org/model"),
              item_key(BatchItem("a", "a red cat", 8), settings, "SDXL:org/model"),
              item_key(item, {**settings, "width": 24}, "SDXL:org/model"),
              item_key(item, settings, "SDXL:org/other")}
    assert len(others) == 4 and expected not in others


# ---- ids and names ----------------------------------------------------------------------------------
def test_screen_puts_every_twin_aside_under_its_line_or_position():
    """Items built in code: a bad id fails its item (with its line when it has one), a later twin
    (ignoring case) and a rejected item whose id a good item owns are put aside under
    ``<id>@line<N>`` or, without a line, ``<id>@item<index>``, keeping their lines; a rejected
    item whose id nobody owns keeps its id.
    mutants: batch.runner.x__screen__mutmut_1..50"""
    items = [
        BatchItem("bad/id", "p", 1, {}, 3),
        BatchItem("lineless/id", "p", 1),
        BatchItem("ok", "p", 1, {}, 4),
        BatchItem("OK", "q", 2, {}, 7),
        RejectedItem("ok", 9, "line 9: refused"),
        BatchItem("free", "x", 3),
        BatchItem("free", "y", 4),
        RejectedItem("free", 0, "refused too"),
        RejectedItem("lone", 0, "alone"),
    ]
    out = _screen(items)
    assert [(type(i).__name__, i.id, i.line) for i in out] == [
        ("RejectedItem", "bad/id", 3), ("RejectedItem", "lineless/id", 0), ("BatchItem", "ok", 4),
        ("RejectedItem", "OK@line7", 7), ("RejectedItem", "ok@line9", 9), ("BatchItem", "free", 0),
        ("RejectedItem", "free@item6", 0), ("RejectedItem", "free@item7", 0), ("RejectedItem", "lone", 0)]
    assert out[0].error == f"line 3: item 'bad/id' {id_problem('bad/id')}"
    assert out[1].error == f"item 'lineless/id' {id_problem('lineless/id')}"
    assert out[3].error.startswith("line 7: duplicate id 'OK'")
    assert out[6].error.startswith("duplicate id 'free'")
    assert (out[4].error, out[7].error, out[8].error) == ("line 9: refused", "refused too", "alone")
    assert out[2] is items[2] and out[5] is items[5]


def test_an_item_whose_file_name_another_item_writes_is_refused_each_time():
    """``x`` with two images writes ``x_0.png`` and ``x_1.png`` (the documented names): items
    ``x_0`` and ``x_1`` are both refused, naming the file, its owner and their line, also when a
    rejected item comes first; the names of a rejected item are claimed by nobody.
    mutants: batch.runner.x__claim_names__mutmut_1..21"""
    items = [RejectedItem("x_0", 1, "refused"), BatchItem("x", "two", 1, {"num_images_per_prompt": 2}, 2),
             BatchItem("x_0", "one", 2, {}, 3), BatchItem("x_1", "one", 3), BatchItem("y", "one", 4)]
    assert _claim_names(items, {}) == {
        "x_0": "line 3: item 'x_0' would write x_0.png, which item 'x' writes; give it another id",
        "x_1": "item 'x_1' would write x_1.png, which item 'x' writes; give it another id"}
    # The count may come from the defaults: then y writes y_0.png, y_1.png and clashes with nobody.
    assert _claim_names([BatchItem("x", "a", 1), BatchItem("x_1", "b", 2)], {"num_images_per_prompt": 2}) == {}


# ---- pending: the manifest alone ---------------------------------------------------------------------
def _finished_folder(tmp_path, records):
    out = tmp_path / "out"
    out.mkdir()
    for rec in records:
        for name in rec.get("files", []):
            (out / name).write_bytes(b"png")
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_pending_lists_exactly_what_a_run_would_make(tmp_path):
    """From the manifest alone: an item is pending when it was rejected, its names clash, it has
    no record, its last record's key (recomputed here from the documented fields) differs, or
    its image is gone. A folder that does not exist yet: everything is pending.
    mutants: batch.runner.x_pending__mutmut_1..15, x_pending__mutmut_17..34, x__finished__mutmut_20"""
    defaults = {"height": 16}
    x = BatchItem("x", "two birds", 5, {"num_images_per_prompt": 2})
    items = [BatchItem("a", "a cat", 1), BatchItem("b", "a dog", 2), BatchItem("c", "a cow", 3),
             RejectedItem("r", 4, "refused"), x, BatchItem("x_0", "a fish", 6), BatchItem("g", "a goat", 7)]
    out = _finished_folder(tmp_path, [
        {"id": "a", "status": "ok", "files": ["a.png"], "key": ref_key("a cat", 1, defaults)},
        {"id": "b", "status": "ok", "files": ["b.png"], "key": ref_key("a dog", 99, defaults)},  # another seed
        {"id": "x", "status": "ok", "files": ["x_0.png", "x_1.png"],
         "key": ref_key("two birds", 5, {**defaults, "num_images_per_prompt": 2})},
        {"id": "x_0", "status": "ok", "files": ["x_0.png"], "key": ref_key("a fish", 6, defaults)},
        {"id": "g", "status": "ok", "files": ["g.png"], "key": ref_key("a goat", 7, defaults)},
    ])
    (out / "g.png").unlink()  # recorded, but the image is gone
    everything = ["a", "b", "c", "r", "x", "x_0", "g"]
    assert pending(items, out, defaults=defaults, model=MODEL) == ["b", "c", "r", "x_0", "g"]
    assert pending(items, out, defaults={"height": 24}, model=MODEL) == everything
    assert pending(items, out, defaults=defaults, model=f"{SDXL}:org/other") == everything
    assert pending(items, tmp_path / "nowhere", defaults=defaults, model=MODEL) == everything


def test_the_last_record_of_an_id_decides_and_foreign_lines_are_ignored(tmp_path):
    """An item counts as finished when its last record is ``ok`` and its files exist: a later
    failed record (even one listing files that exist) makes it pending, a later ok one finishes
    it; a JSON object without an id (a hand edit, another tool) and non-objects are passed over.
    mutants: batch.runner.x__finished__mutmut_7, x__finished__mutmut_12"""
    key_a, key_b = ref_key("a cat", 1, {}), ref_key("a dog", 2, {})
    out = _finished_folder(tmp_path, [
        {"status": "ok", "files": ["a.png"], "note": "no id"},
        {"id": "a", "status": "ok", "files": ["a.png"], "key": key_a},
        {"id": "a", "status": "failed", "files": ["a.png"], "key": key_a, "error": "x"},
        {"id": "b", "status": "failed", "key": key_b, "error": "x"},
        {"id": "b", "status": "ok", "files": ["b.png"], "key": key_b},
        {"id": 5, "status": "ok", "files": []},
    ])
    with (out / "manifest.jsonl").open("a") as f:
        f.write("[1, 2]\n7\n")
    assert pending([BatchItem("a", "a cat", 1), BatchItem("b", "a dog", 2)], out, model=MODEL) == ["a"]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_a_manifest_that_cannot_be_read_is_one_line(tmp_path):
    """A manifest whose read fails (here a real EIO: a link to /proc/self/mem, whose first page is
    not mapped) stops the job with one line naming the folder and the reason.
    mutants: batch.runner.x__finished__mutmut_5, x__finished__mutmut_6"""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to("/proc/self/mem")
    with pytest.raises(BatchError) as info:
        pending([BatchItem("a", "a cat", 1)], out, model=MODEL)
    assert str(info.value) == f"cannot read the manifest in {out}: {os.strerror(errno.EIO)}"


# ---- the manifest on disk ---------------------------------------------------------------------------
def test_a_torn_last_line_is_ended_and_nothing_else_is_touched(tmp_path):
    """Only a last line without its newline is ended (one byte added); a whole manifest, an empty
    one and a missing one are left as they are.
    mutants: batch.runner.x__end_torn_line__mutmut_1..16, x__end_torn_line__mutmut_19..22"""
    manifest = tmp_path / "manifest.jsonl"
    _end_torn_line(manifest)
    assert not manifest.exists()
    for before, after in [(b"", b""), (b'{"id": "a"}\n', b'{"id": "a"}\n'), (b'{"id": "a"}\n{"id', b'{"id": "a"}\n{"id\n'),
                          (b"{", b"{\n"), (b"\n", b"\n"), (b'{"id": "a"}\n\n', b'{"id": "a"}\n\n')]:
        manifest.write_bytes(before)
        _end_torn_line(manifest)
        assert manifest.read_bytes() == after, before


def test_iter_manifest_reads_every_shard_past_bad_lines_and_folders(tmp_path):
    """Records of every shard, in file order and shard order; a line that is not JSON (a torn
    line in the middle, bytes that are not UTF-8), a JSON value that is not an object, and a
    folder named like a shard are passed over, never the records after them.
    mutants: batch.runner.x_iter_manifest__mutmut_1..13"""
    (tmp_path / "manifest.rank0.jsonl").mkdir()
    (tmp_path / "manifest.jsonl").write_bytes(b'{"id": "a"}\n{"id": "b", "pro\n\xff\xfe{"id"\n[1]\n{"id": "c"}\n')
    (tmp_path / "manifest.rank1.jsonl").write_text('{"id": "d"}\n')
    (tmp_path / "notes.jsonl").write_text('{"id": "z"}\n')
    assert [r["id"] for r in iter_manifest(tmp_path)] == ["a", "c", "d"]
    assert [r["id"] for r in iter_manifest(str(tmp_path))] == ["a", "c", "d"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_manifest_append_that_fails_is_one_line_naming_the_manifest(proxy, tmp_path):
    """The manifest on a full device (a link to /dev/full: every write fails with ENOSPC) stops
    the job with one line: the manifest, the reason, what to do.
    mutants: batch.runner.x__record__mutmut_20..23, x_run_batch__mutmut_65, x__append__mutmut_1..4"""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to("/dev/full")
    with pytest.raises(BatchError) as info:
        run_batch(proxy, [RejectedItem("r", 0, "refused")], out, progress=False)
    assert str(info.value) == (f"cannot append to the manifest {out / 'manifest.jsonl'}: "
                               f"{os.strerror(errno.ENOSPC)}; free space and rerun to resume")


# ---- the output folder and the temporaries ----------------------------------------------------------
def test_the_output_folder_is_made_with_its_parents_or_refused_in_one_line(proxy, tmp_path):
    """A folder several levels deep is made (an empty job writes an empty manifest, and a second
    one reads it); a regular file in its place, or above it, is one line with the reason.
    mutants: batch.runner.x__output_folder__mutmut_1..12, x__output_folder__mutmut_14, x__end_torn_line__mutmut_3, x__end_torn_line__mutmut_4"""
    deep = tmp_path / "a" / "b" / "out"
    for _ in range(2):
        report = run_batch(proxy, [], deep, progress=False)
        assert (report.done, report.skipped, report.failed) == ([], [], {})
    assert (deep / "manifest.jsonl").read_bytes() == b""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BatchError) as info:
        run_batch(proxy, [], tmp_path / "afile", progress=False)
    assert str(info.value) == f"cannot create the output folder {tmp_path / 'afile'}: it is a file"
    with pytest.raises(BatchError) as info:
        run_batch(proxy, [], tmp_path / "afile" / "out", progress=False)
    assert str(info.value) == f"cannot create the output folder {tmp_path / 'afile' / 'out'}: {os.strerror(errno.ENOTDIR)}"


def _temporary(out, item_id, pid):
    return out / f".{item_id}.png.0123abcd.{pid}.tmp.png"  # autofit.files.temporary_name's form


def test_temporaries_of_dead_processes_go_those_of_running_ones_and_users_files_stay(tmp_path):
    """Every temporary whose process is gone is removed, whatever the order the folder lists
    them in; a temporary of a process still running (another rank) is kept, and that process is
    left running (the liveness check sends no signal); a user's files are never touched.
    mutants: batch.runner.x__pid_alive__mutmut_1..6, x__pid_alive__mutmut_8, x__clean_temporaries__mutmut_1, x__clean_temporaries__mutmut_3..11"""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A process that waits for one line and answers it: it answers only if no signal killed it.
    alive = subprocess.Popen([sys.executable, "-c", "import sys; print(sys.stdin.readline().strip()[::-1])"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        mine = {name: str(k) for k in range(4) for name in (f".note{k}.tmp", f".cat{k}.png.tmp.png", f"cat{k}.tmp.png")}
        for name, text in mine.items():
            (out / name).write_text(text)
        stale = [_temporary(out, f"i{k}", dead.pid) for k in range(6)]
        running = _temporary(out, "r", alive.pid)
        for path in [*stale, running]:
            path.write_bytes(b"")
        _clean_temporaries(out)
        assert not [p for p in stale if p.exists()]
        assert running.exists(), "the running process's temporary was removed"
        assert {n: (out / n).read_text() for n in mine} == mine
        answer, _ = alive.communicate("ping\n", timeout=60)
        assert (answer, alive.returncode) == ("gnip\n", 0), "the liveness check signalled the process"
    finally:
        alive.kill()
        alive.wait()


def test_a_temporary_of_another_users_process_is_kept(tmp_path):
    """A process this user may not signal (pid 1) still runs: its temporary stays. As root
    (who may signal every process) the clean-up runs in a child that drops to user ``nobody``,
    in a folder that user may write.
    mutants: batch.runner.x__pid_alive__mutmut_7"""
    folder = tmp_path
    if os.geteuid() == 0:
        folder = Path(tempfile.mkdtemp(dir="/tmp"))
        folder.chmod(0o777)
    tmp = _temporary(folder, "a", 1)
    tmp.write_bytes(b"")
    if os.geteuid() == 0:
        child = os.fork()
        if child == 0:  # the child only drops its rights and cleans up
            try:
                os.setgid(65534)
                os.setuid(65534)
                _clean_temporaries(folder)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    else:
        _clean_temporaries(folder)
    try:
        assert tmp.exists()
    finally:
        if folder != tmp_path:
            shutil.rmtree(folder)


# ---- whole runs -------------------------------------------------------------------------------------
def test_a_run_records_the_documented_fields_events_and_progress_and_resumes_by_content(
        proxy, tmp_path, capsys):
    """One prompts file (two good items, one with two images, a bad value, a clashing name) in a
    folder to be made: the manifest holds one JSON object a line with the documented fields, the
    key recomputed here from them, the line of each item, the settings it ran with; each failure
    and the end are logged with the documented fields; the timings fit the wall clock. A rerun
    skips what is finished, with a progress bar that starts at the skipped count; a changed model
    makes every good item again, the same bytes, and nothing else changes.
    mutants: batch.runner.x__model_of__mutmut_1..3, x__model_of__mutmut_5, x__model_of__mutmut_6, x__model_of__mutmut_8..15, x__model_of__mutmut_17..19, x_run_batch__mutmut_1, x_run_batch__mutmut_35, x_run_batch__mutmut_45, x_run_batch__mutmut_54..62, x_run_batch__mutmut_84..91, x_run_batch__mutmut_94..99, x_run_batch__mutmut_102..116, x__bar__mutmut_1..10, x__share__mutmut_2, x__after__mutmut_1..7, x__after__mutmut_13, x__after__mutmut_14, x__run_one__mutmut_4, x__run_one__mutmut_13, x__run_one__mutmut_14, x__run_one__mutmut_19, x__run_one__mutmut_20, x__run_one__mutmut_25..27, x__run_one__mutmut_32, x__run_one__mutmut_33, x__run_one__mutmut_38..40, x__run_one__mutmut_183, x__failed__mutmut_4, x__failed__mutmut_6, x__failed__mutmut_7, x__failed__mutmut_9, x__failed__mutmut_10, x__failed__mutmut_13, x__failed__mutmut_14, x__failed__mutmut_16..19, x__failed__mutmut_22..24, x__todo__mutmut_7, x__run_one__mutmut_45, x__run_one__mutmut_47, x__end_torn_line__mutmut_15, x__end_torn_line__mutmut_16, x__end_torn_line__mutmut_19, x__end_torn_line__mutmut_20"""
    rows = [{"id": "a", "prompt": "a red cat", "seed": 1},
            {"id": "b", "prompt": "a blue dog", "seed": 2, "guidance_scale": 3.0},
            {"id": "bad", "prompt": "x", "height": 7},
            {"id": "x", "prompt": "two birds", "seed": 3, "num_images_per_prompt": 2},
            {"id": "x_0", "prompt": "a fish", "seed": 4}]
    prompts = _write_prompts(tmp_path / "p.jsonl", rows)
    out = tmp_path / "deep" / "out"
    settings = {r["id"]: {**TINY, **{k: v for k, v in r.items() if k not in ("id", "prompt", "seed")}} for r in rows}
    files = {"a": ["a.png"], "b": ["b.png"], "x": ["x_0.png", "x_1.png"]}

    with capture_logs() as logs:
        t0 = time.perf_counter()
        report = run_batch(proxy, prompts, out, defaults=TINY, progress=False)
        wall = time.perf_counter() - t0
    assert "autofit batch" not in capsys.readouterr().err  # progress=False: no bar
    assert report.done == ["a", "b", "x"] and list(report.failed) == ["bad", "x_0"]
    assert 0 < report.seconds <= wall
    clash = "line 5: item 'x_0' would write x_0.png, which item 'x' writes; give it another id"
    assert report.failed["x_0"] == clash and report.failed["bad"].startswith("p.jsonl:3:")

    records = {r["id"]: r for r in _lines(out)}
    assert list(records) == ["bad", "a", "b", "x", "x_0"]
    plan = list(proxy.autofit.plan)
    for i, (item_id, names) in enumerate(files.items()):
        row, rec = rows[[r["id"] for r in rows].index(item_id)], records[item_id]
        line = [r["id"] for r in rows].index(item_id) + 1
        assert rec == {"id": item_id, "prompt": row["prompt"], "seed": row["seed"], "line": line,
                       "key": ref_key(row["prompt"], row["seed"], settings[item_id]), "status": "ok", "files": names,
                       "seconds": rec["seconds"], "plan": plan, "escalations": [], "settings": settings[item_id]}
        assert all((out / n).is_file() for n in names)
        assert 0 < rec["seconds"] <= report.seconds
    assert sum(records[i]["seconds"] for i in files) <= wall
    assert records["bad"] == {"id": "bad", "line": 3, "status": "failed", "error": report.failed["bad"]}
    assert records["x_0"] == {"id": "x_0", "prompt": "a fish", "seed": 4, "line": 5,
                              "key": ref_key("a fish", 4, settings["x_0"]), "status": "failed", "error": clash,
                              "settings": settings["x_0"]}

    # docs/logging.md: batch_item_failed (WARNING) with stage, action, item, error; batch_done with
    # done, skipped, failed, seconds (stage "batch"). Fields without information are dropped.
    assert _events(logs, "batch_item_failed") == [
        {"stage": "input", "action": "skip", "item": i, "error": report.failed[i]} for i in ("bad", "x_0")]
    assert _levels(logs, "batch_item_failed") == {"warning"}
    (done,) = _events(logs, "batch_done")
    assert done == {"stage": "batch", "done": 3, "skipped": 0, "failed": 2, "seconds": done["seconds"]}
    assert abs(done["seconds"] - report.seconds) <= 0.0005 + 1e-9

    # A rerun (progress on by default): everything good is skipped; the bar starts at 3 of 5.
    inodes = {n: (out / n).stat().st_ino for names in files.values() for n in names}
    pixels = {n: (out / n).read_bytes() for n in inodes}
    again = run_batch(proxy, prompts, out, defaults=TINY)
    err = capsys.readouterr().err
    assert (again.done, again.skipped, list(again.failed)) == ([], ["a", "b", "x"], ["bad", "x_0"])
    counts = re.findall(r"\| (\d+)/(\d+) \[", err)
    assert "autofit batch[0]" in err and "img/s" in err
    assert counts[0] == ("3", "5") and counts[-1] == ("5", "5"), err
    assert {n: (out / n).stat().st_ino for n in inodes} == inodes

    # Another model (the pipeline's name_or_path): every good item is made again, keyed on it.
    inner = proxy.__wrapped__
    inner.register_to_config(_name_or_path="org/tiny-b")
    try:
        other = run_batch(proxy, prompts, out, defaults=TINY, progress=False)
    finally:
        inner.register_to_config(_name_or_path=None)
    assert other.done == ["a", "b", "x"] and not other.skipped
    assert all((out / n).stat().st_ino != ino for n, ino in inodes.items())
    # Same weights, same seeds: the images made again are the same bytes (each item's own generator).
    assert {n: (out / n).read_bytes() for n in inodes} == pixels
    last = {r["id"]: r for r in _lines(out)}
    for item_id in files:
        row = rows[[r["id"] for r in rows].index(item_id)]
        assert last[item_id]["key"] == ref_key(row["prompt"], row["seed"], settings[item_id], f"{SDXL}:org/tiny-b")
    assert len(_lines(out)) == 5 + 2 + 5


def test_each_items_own_error_is_recorded_with_its_stage_and_the_job_goes_on(proxy, tmp_path):
    """After an item that escalated: a folder standing where an image goes (a real EISDIR), an
    output the PNG writer cannot take (latents), and an error raised inside the pipeline each fail
    their item only, with the reason, the stage (docs/logging.md) and the record's timing, plan,
    settings and escalations (each item's own: together they are the proxy's history, once).
    mutants: batch.runner.x__run_one__mutmut_71, x__run_one__mutmut_75, x__run_one__mutmut_76, x__run_one__mutmut_78, x__run_one__mutmut_79, x__run_one__mutmut_82, x__run_one__mutmut_83, x__run_one__mutmut_135, x__run_one__mutmut_139..143, x__run_one__mutmut_146, x__run_one__mutmut_147, x__run_one__mutmut_152..171, x__run_one__mutmut_182, x__failed__mutmut_27, x__failed__mutmut_34"""
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)

    def kernel_fails(pipe, step, timestep, callback_kwargs):
        raise RuntimeError("this item's kernel failed: " + "a long driver message " * 30)

    items = [BatchItem("a", "a cat", 1, dict(TINY)), BatchItem("b", "a dog", 2, dict(TINY)),
             BatchItem("c", "a cow", 3, {**TINY, "output_type": "latent"}),
             BatchItem("d", "a pig", 4, {**TINY, "callback_on_step_end": kernel_fails}),
             BatchItem("e", "a hen", 5, dict(TINY))]
    before = len(proxy.autofit.history)
    with capture_logs() as logs, inject_oom(proxy, stage="decode", at=1) as fault:
        report = run_batch(proxy, items, out, progress=False)
    assert fault.fired == 1 and len(proxy.autofit.history) > before
    try:
        torch.zeros(1).save
    except AttributeError as exc:
        no_save = f"AttributeError: {exc}"
    assert report.done == ["a", "e"]
    assert report.failed == {"b": f"cannot write b.png: {os.strerror(errno.EISDIR)}",
                             "c": f"cannot save c.png: {no_save}",
                             "d": "RuntimeError: this item's kernel failed: " + "a long driver message " * 30}
    # docs/logging.md: a log line carries the error's first 200 characters, the manifest its first 500.
    assert _events(logs, "batch_item_failed") == [
        {"stage": stage, "action": "skip", "item": i, "error": report.failed[i][:200]}
        for i, stage in (("b", "save"), ("c", "save"), ("d", "call"))]
    records = _lines(out)
    assert [r.get("error") for r in records] == [None, *(report.failed[i][:500] for i in "bcd"), None]
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert [e for r in records for e in r["escalations"]] == _escalations(proxy, before)
    assert records[0]["escalations"] != []
    for rec, item in zip(records, items):
        assert rec["plan"] == list(proxy.autofit.plan) and rec["seconds"] > 0
        assert rec["settings"] == json.loads(json.dumps(item.settings, default=str))
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "e.png"] and (out / "b.png").is_dir()


class OneImagePipeline(StableDiffusionXLPipeline):
    """A real pipeline that makes one image whatever ``num_images_per_prompt`` asks for."""

    def __call__(self, *args, num_images_per_prompt=1, **kwargs):
        return super().__call__(*args, **kwargs)


def test_a_pipeline_is_wrapped_with_the_options_and_a_short_output_fails_its_item(built, tmp_path):
    """A pipeline (not a proxy) is wrapped with ``options`` (its start plan is in every record);
    an item the pipeline returns fewer images for than its names were claimed for fails with the
    counts and writes none of them; the next item is made.
    mutants: batch.runner.x__share__mutmut_5..9, x_run_batch__mutmut_16, x__run_one__mutmut_88..106, x__run_one__mutmut_108..112"""
    items = [BatchItem("m", "two cats", 1, {**TINY, "num_images_per_prompt": 2}), BatchItem("n", "a cat", 2, dict(TINY))]
    with capture_logs() as logs:
        report = run_batch(_fresh(built, OneImagePipeline), items, tmp_path, progress=False,
                           options={"cache": False, "plan": ["vae_slicing"]})
    assert report.done == ["n"] and report.failed == {"m": "the pipeline returned 1 images, not 2"}
    assert _events(logs, "batch_item_failed") == [
        {"stage": "call", "action": "skip", "item": "m", "error": report.failed["m"]}]
    m, n = _lines(tmp_path)
    assert m["status"] == "failed" and n["status"] == "ok"
    for rec, item in ((m, items[0]), (n, items[1])):
        assert rec["plan"] == ["vae_slicing"] and rec["escalations"] == [] and rec["seconds"] > 0
        assert rec["settings"] == item.settings
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["n.png"]


def test_an_item_exhausted_at_the_last_rung_records_its_stage_and_its_own_escalations(built, tmp_path):
    """With one escalation allowed per call: an item whose decode runs out of memory twice is
    recorded as failed at the decode stage, with the escalations it tried (not the earlier
    item's), its timing and settings; the items around it are made, and a later item that fails
    for its image count records no escalation of theirs either.
    mutants: batch.runner.x__run_one__mutmut_53, x__run_one__mutmut_57, x__run_one__mutmut_58, x__run_one__mutmut_62, x__run_one__mutmut_63, x__run_one__mutmut_102, x__run_one__mutmut_105..112"""
    proxy = autofit(_fresh(built, OneImagePipeline), cache=False, max_retries=1)
    items = [BatchItem("a", "a cat", 0, dict(TINY)), BatchItem("b", "a dog", 1, dict(TINY)),
             BatchItem("m", "two cows", 2, {**TINY, "num_images_per_prompt": 2}), BatchItem("c", "a pig", 3, dict(TINY))]
    with capture_logs() as logs, inject_oom(proxy, stage="decode", when=lambda n: n in (1, 3, 4)):
        report = run_batch(proxy, items, tmp_path, progress=False)
    assert report.done == ["a", "c"] and list(report.failed) == ["b", "m"]
    event = _events(logs, "batch_item_failed")[0]
    assert event == {"stage": "decode", "action": "skip", "item": "b", "error": report.failed["b"][:200]}
    assert report.failed["b"].startswith("autofit could not fit the decode stage")
    records = _lines(tmp_path)
    assert records[1]["error"] == report.failed["b"][:500]
    assert [e for r in records for e in r["escalations"]] == _escalations(proxy, 0)
    assert [bool(r["escalations"]) for r in records] == [True, True, False, False]
    for rec, item in zip(records, items):
        assert rec["seconds"] > 0 and rec["settings"] == item.settings


def test_a_folder_that_vanishes_while_an_image_is_made_stops_the_job_in_one_line(proxy, tmp_path):
    """The output folder removed while the image is decoded (a real ENOENT at save time: every
    later item would fail too) stops the job: one line with the file, the reason, what to do.
    mutants: batch.runner.x__run_one__mutmut_126..131"""
    out = tmp_path / "out"

    def remove_folder(module, args):
        shutil.rmtree(out, ignore_errors=True)

    hook = proxy.vae.decoder.register_forward_pre_hook(remove_folder)
    try:
        with pytest.raises(BatchError) as info:
            run_batch(proxy, [BatchItem("a", "a cat", 1, dict(TINY))], out, progress=False)
    finally:
        hook.remove()
    assert str(info.value) == (f"cannot write {out / 'a.png'}: {os.strerror(errno.ENOENT)}; "
                               "free space and rerun to resume")


def test_a_distributed_run_in_one_process_writes_its_rank_shard_with_the_options(built, tmp_path):
    """``distributed=True`` in a single process (accelerate's PartialState on the CPU: one rank):
    the pipeline is wrapped with ``options`` on the rank's device, every item is this rank's, and
    the records go to ``manifest.rank0.jsonl`` (docs/batch.md), read back by a resume.
    mutants: batch.runner.x__share__mutmut_10, x__share__mutmut_13..24, x_run_batch__mutmut_49"""
    items = [BatchItem("a", "a cat", 1, dict(TINY)), BatchItem("b", "a dog", 2, dict(TINY))]
    report = run_batch(_fresh(built), items, tmp_path, progress=False, distributed=True,
                       options={"cache": False, "plan": ["vae_slicing"]})
    assert report.done == ["a", "b"]
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.rank0.jsonl"]
    records = _lines(tmp_path, "manifest.rank0.jsonl")
    assert [(r["id"], r["status"], r["plan"]) for r in records] == [("a", "ok", ["vae_slicing"]), ("b", "ok", ["vae_slicing"])]
    assert pending(items, tmp_path, model=MODEL) == []


def test_an_image_the_png_encoder_refuses_fails_its_item_not_the_job(built, tmp_path):
    """Pillow refuses a CMYK image as PNG with an OSError that has no errno: the image's own
    problem, so the item fails (stage ``save``, Pillow's own words) and the job goes on, where a
    full disk would stop it."""
    import io

    import PIL.Image

    with pytest.raises(OSError) as refused:
        PIL.Image.new("CMYK", (1, 1)).save(io.BytesIO(), "PNG")
    assert refused.value.errno is None
    pipe = _fresh(built)
    to_pil = pipe.image_processor.numpy_to_pil
    pipe.image_processor.numpy_to_pil = lambda images: [im.convert("CMYK") for im in to_pil(images)]
    items = [BatchItem("a", "a cat", 0), BatchItem("b", "a dog", 1)]
    with capture_logs() as logs:
        report = run_batch(autofit(pipe, cache=False), items, tmp_path, defaults=dict(TINY), progress=False)
    assert report.done == [] and set(report.failed) == {"a", "b"}
    assert all(str(refused.value) in error for error in report.failed.values())
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in records] == [("a", "failed"), ("b", "failed")]
    failed = [e for e in logs if e["event"] == "autofit.batch_item_failed"]
    assert [(e["item"], e["stage"]) for e in failed] == [("a", "save"), ("b", "save")]
