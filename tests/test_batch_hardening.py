"""A batch item can never stop a job; the CLI's output and input edges (issue 27, items 3 and 7).

Every fault here is real: a 250-character id the file system refuses, a folder standing where an
image goes, duplicate ids in a prompts file, a file-size limit (RLIMIT_FSIZE) that fills the
"disk" while the manifest is appended, an output path under a regular file (mkdir: not a
directory; root cannot chmod its way out of that), a read-only tmpfs mount where the machine
allows one, a folder replaced by a file while the image is being generated, a model_index.json
that is not JSON, a directory standing where a plan-cache record should be.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autofit import autofit
from autofit.batch.runner import BatchError, iter_manifest, run_batch
from autofit.batch.items import MAX_ID_LENGTH, BatchItem, read_items
from autofit.cli import main
from autofit.testing import tiny_sdxl

REPO = Path(__file__).resolve().parents[1]
FAST = {"height": 16, "width": 16, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def proxy():
    """One tiny pipeline for the in-process batch tests (each test writes its own folder)."""
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return autofit(pipe, cache=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


@pytest.fixture
def load_spy(monkeypatch):
    """Records each pipeline load of the CLI (the real one still runs)."""
    from autofit.cli import loading

    calls = []
    real = loading.load_pipeline

    def spy(args):
        calls.append(args.model_dir)
        return real(args)

    monkeypatch.setattr(loading, "load_pipeline", spy)
    return calls


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro), where this machine lets the tests mount one."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs Linux, root and mount(8)")
    path = tmp_path / "ro"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _write_prompts(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _autofit_lines(err, command):
    return [line for line in err.splitlines() if line.startswith(f"autofit {command}:")]


# ---- ids --------------------------------------------------------------------------------------
def test_a_250_character_id_fails_that_item_and_the_job_goes_on(proxy, tmp_path):
    """A 250-character id ("File name too long" once the image is saved) is a per-item failure
    with a clear message, found before anything runs; the other items run, reruns too. An id of
    the longest allowed length with several images per prompt is written: the limit leaves room
    for the suffixes and the temporary name."""
    longest = "L" * MAX_ID_LENGTH
    prompts = _write_prompts(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "a red cat"},
        {"id": "x" * 250, "prompt": "a blue dog"},
        {"id": longest, "prompt": "a green bird", "num_images_per_prompt": 2},
    ])
    out = tmp_path / "out"
    for _ in range(2):  # before: BatchError ("free space and rerun") on every run
        report = run_batch(proxy, prompts, out, defaults=FAST, progress=False)
        assert list(report.failed) == ["x" * 250]
        assert sorted(report.done + report.skipped) == sorted(["a", longest])
    error = report.failed["x" * 250]
    assert "p.jsonl:2:" in error and "250 characters" in error and f"at most {MAX_ID_LENGTH}" in error
    assert len(error) < 300  # the id is shortened in the message
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["a.png", f"{longest}_0.png", f"{longest}_1.png"])
    assert [r["status"] for r in iter_manifest(out) if r["id"] == "x" * 250] == ["failed", "failed"]


def test_ids_of_items_built_in_code_are_checked_too(proxy, tmp_path):
    """BatchItems made in code skip the prompts-file checks: run_batch checks their ids, so an id
    with a path in it writes nothing outside the output folder and a long one stops nothing."""
    out = tmp_path / "out"
    items = [BatchItem("../escaped", "a cat", 1), BatchItem("y" * 250, "a dog", 2), BatchItem("ok", "a bird", 3),
             BatchItem("ok", "a second bird", 4)]
    report = run_batch(proxy, items, out, defaults=FAST, progress=False)
    assert report.done == ["ok"]
    assert set(report.failed) == {"../escaped", "y" * 250, "ok@item3"}
    assert "must use letters" in report.failed["../escaped"] and "duplicate id 'ok'" in report.failed["ok@item3"]
    assert not (tmp_path / "escaped.png").exists() and sorted(p.name for p in out.glob("*.png")) == ["ok.png"]


def test_a_save_error_of_one_item_does_not_stop_the_job(proxy, tmp_path):
    """A folder standing where one item's image goes (a real EISDIR from the rename) fails that
    item with the reason; the items after it run. Before, it stopped the job as a full disk."""
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": k, "prompt": f"cat {k}"} for k in "abc"])
    report = run_batch(proxy, prompts, out, defaults=FAST, progress=False)
    assert report.done == ["a", "c"] and list(report.failed) == ["b"]
    assert "b.png" in report.failed["b"] and "Is a directory" in report.failed["b"]
    assert not list(out.glob(".*tmp*"))
    (failed,) = [r for r in iter_manifest(out) if r["status"] == "failed"]
    assert failed["id"] == "b" and "Is a directory" in failed["error"]


@pytest.mark.parametrize("rows, owner, aside", [
    ([{"id": "a", "prompt": "first"}, {"id": "a", "prompt": "second"}], "a", "a@line2"),
    ([{"id": "a", "prompt": "first"}, {"id": "A", "prompt": "second"}], "a", "A@line2"),  # one file on macOS
    ([{"id": "a", "prompt": "bad", "height": 7}, {"id": "a", "prompt": "good"}], "a", "a@line1"),
    (["not json", {"id": "000000", "prompt": "good"}], "000000", "000000@line1"),  # the default id of line 1
], ids=["duplicate", "case", "bad-then-good", "not-json-default-id"])
def test_a_duplicate_id_never_marks_the_item_that_owns_it(proxy, tmp_path, rows, owner, aside):
    """The failure record of a duplicate (or of a rejected line whose id a good item uses) is kept
    under ``<id>@line<N>``, which no valid id can be: the good item is made once and skipped by
    every rerun. Before, the duplicate's record carried the good item's id, so every second
    rerun made the good item again."""
    prompts = _write_prompts(tmp_path / "p.jsonl", [*rows, {"id": "z", "prompt": "another"}])
    out = tmp_path / "out"
    first = run_batch(proxy, prompts, out, defaults=FAST, progress=False)
    assert first.done == [owner, "z"] and list(first.failed) == [aside]
    for _ in range(2):
        again = run_batch(proxy, prompts, out, defaults=FAST, progress=False)
        assert again.skipped == [owner, "z"] and not again.done and list(again.failed) == [aside]
    records = list(iter_manifest(out))
    assert {r["id"] for r in records if r["status"] == "failed"} == {aside}
    assert [r["id"] for r in records if r["status"] == "ok"] == [owner, "z"]


def test_read_items_names_the_duplicate_apart():
    """read_items gives a duplicate its ``@line`` id and says which line owns the id."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = _write_prompts(Path(d) / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
        good, rejected = read_items(path)
    assert [i.id for i in good] == ["a"]
    assert [(r.id, r.line) for r in rejected] == [("a@line2", 2)]
    assert "duplicate id 'a'" in rejected[0].error and "line 1" in rejected[0].error


# ---- the output folder and the manifest ---------------------------------------------------------
_UNDER_A_FILE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from autofit.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_a_full_disk_while_appending_to_the_manifest_is_one_line(sdxl_dir, tmp_path):
    """`autofit batch` under a real file-size limit (RLIMIT_FSIZE, the way a full disk looks to
    one file): the manifest append fails with EFBIG after a short write. One line, exit 1, no
    traceback (closing a buffered file used to flush again and raise over the one-line error); a
    rerun without the limit finishes the job past the torn line."""
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no RLIMIT_FSIZE on this platform")
    limit = 1 << 20
    out = tmp_path / "out"
    out.mkdir()
    head = json.dumps({"id": "earlier", "status": "failed", "error": "", "pad": ""})
    filler = json.dumps({"id": "earlier", "status": "failed", "error": "", "pad": "p" * (limit - 40 - len(head))})
    (out / "manifest.jsonl").write_text(filler + "\n")  # 40 bytes below the limit: the image fits, the record not
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}])
    argv = ["batch", str(sdxl_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "1", "--height", "16",
            "--width", "16", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", _UNDER_A_FILE_LIMIT, str(limit), *argv], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = _autofit_lines(done.stderr, "batch")
    assert "manifest.jsonl" in line and "File too large" in line and "free space and rerun" in line
    assert (out / "manifest.jsonl").stat().st_size == limit  # the short write went in, torn
    assert main(argv) == 0  # no limit now: the torn line is ended, a is made again, b made
    ok = sorted(r["id"] for r in iter_manifest(out) if r["status"] == "ok")
    assert ok == ["a", "b"] and (out / "a.png").is_file() and (out / "b.png").is_file()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "read-only"])
def test_batch_out_that_cannot_be_written_is_refused_before_the_model_loads(
        where, sdxl_dir, tmp_path, load_spy, capsys, request):
    """An --out under a regular file, a regular file, or on a read-only mount: one line, exit 2,
    before the model is loaded. Before, the folder was made after the load and failed with a
    traceback."""
    (tmp_path / "afile").write_text("a regular file")
    out = {"under-a-file": tmp_path / "afile" / "out", "is-a-file": tmp_path / "afile"}.get(where)
    if where == "read-only":
        out = request.getfixturevalue("read_only_dir") / "out"
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "a cat"}])
    code = main(["batch", str(sdxl_dir), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    (line,) = _autofit_lines(err, "batch")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not load_spy, err
    assert str(out) in line
    expected = {"under-a-file": "is a file", "is-a-file": "not a folder", "read-only": "Read-only file system"}
    assert expected[where] in line


def test_run_batch_on_an_output_folder_under_a_file_raises_batch_error(proxy, tmp_path):
    """The library refuses the same --out with BatchError (one line), not a raw NotADirectoryError."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BatchError, match="cannot create the output folder"):
        run_batch(proxy, [BatchItem("a", "x", 0)], tmp_path / "afile" / "out", defaults=FAST, progress=False)


def test_a_folder_where_the_manifest_goes_is_refused_before_the_model_loads(sdxl_dir, tmp_path, load_spy, capsys):
    """A directory named manifest.jsonl in --out: one line, exit 2, nothing loaded."""
    out = tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "a cat"}])
    code = main(["batch", str(sdxl_dir), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    (line,) = _autofit_lines(err, "batch")
    assert code == 2 and not load_spy and "manifest.jsonl" in line and "not a file" in line


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_run_out_that_cannot_be_written_is_refused_before_the_model_loads(
        where, sdxl_dir, tmp_path, load_spy, capsys, request):
    """`autofit run --out` under a regular file or on a read-only mount: one line, exit 2, before
    the model is loaded. Before, the model was loaded and the image generated, then lost in a
    traceback."""
    (tmp_path / "afile").write_text("a regular file")
    folder = tmp_path / "afile" if where == "under-a-file" else request.getfixturevalue("read_only_dir")
    out = folder / "cat.png"
    code = main(["run", str(sdxl_dir), "--prompt", "x", "--out", str(out), "--steps", "1", "--height", "16",
                 "--width", "16", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    (line,) = _autofit_lines(err, "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not load_spy, err
    assert str(out) in line
    assert ("is a file" if where == "under-a-file" else "Read-only file system") in line


def test_run_keeps_the_image_when_saving_fails_after_generation(sdxl_dir, tmp_path, monkeypatch, capsys):
    """The output folder passes the check, then is replaced by a regular file while the image is
    decoded (a real NotADirectoryError at save time): the image is saved in the current folder
    under a fresh name, with its plan, and one line says where; exit 1. Before, the image was lost
    in a traceback."""
    from PIL import Image

    from autofit.cli import loading

    folder, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cat.png").write_text("the user's own file")  # never overwritten by the fallback
    monkeypatch.chdir(cwd)
    real = loading.load_pipeline

    def load_then_take_the_folder_away(args):
        pipe = real(args)

        def replace_folder(*_):
            if folder.is_dir():
                shutil.rmtree(folder)
                folder.write_text("a file now")

        pipe.vae.decoder.register_forward_pre_hook(replace_folder)
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", load_then_take_the_folder_away)
    code = main(["run", str(sdxl_dir), "--prompt", "x", "--out", str(folder / "cat.png"), "--steps", "1",
                 "--height", "16", "--width", "16", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    (line,) = _autofit_lines(err, "run")
    assert code == 1 and "Traceback" not in err
    (saved,) = [p for p in cwd.glob("cat*.png") if p.name != "cat.png"]
    assert str(saved) in line and str(folder / "cat.png") in line and "Not a directory" in line
    assert Image.open(saved).size == (16, 16)
    assert json.loads(saved.with_suffix(".plan.json").read_text())["seed"] == 0
    assert (cwd / "cat.png").read_text() == "the user's own file"


# ---- plan and cache ------------------------------------------------------------------------------
def test_plan_names_the_components_a_folder_lacks(sdxl_dir, tmp_path, capsys):
    """A folder whose index lists components that are not there (a partial download): exit 2 and
    one line naming them, not "0.0 GiB of weights" and exit 0."""
    root = tmp_path / "partial"
    shutil.copytree(sdxl_dir, root)
    shutil.rmtree(root / "unet")
    for f in (root / "vae").glob("*.safetensors"):
        f.unlink()  # the config was downloaded, the weights not
    assert main(["plan", str(root), "--vram", "1GiB"]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert "unet (no unet/ folder)" in line and "vae (" in line and "no weights" in line
    assert "text_encoder" not in line


def test_cache_clear_with_a_folder_where_a_record_should_be(tmp_path, capsys):
    """A directory named like a record in the plans folder: `cache clear` removes the real records,
    warns about the directory in one line, and exits 0. Before: a traceback (unlink: EISDIR)."""
    from autofit.facts.cache import PlanCache

    cache_dir = tmp_path / "c"
    PlanCache(cache_dir).put("other", {"plan": [], "key": {"pipeline": "FluxPipeline", "components": []}})
    (cache_dir / "plans" / "deadbeef.json").mkdir()
    code = main(["cache", "clear", "--cache-dir", str(cache_dir)])
    captured = capsys.readouterr()
    assert code == 0 and "removed 1 record(s)" in captured.out
    (line,) = [x for x in captured.err.splitlines() if "deadbeef.json" in x]
    assert "WARNING" in line and "Is a directory" in line and "Traceback" not in captured.err
    assert [e.key for e in PlanCache(cache_dir).entries()] == ["deadbeef"]


def test_the_writability_probes_never_touch_a_users_files(tmp_path):
    """The checks that a folder can be written (--out before the model loads, the offload folder
    before group_disk) make a file of a new name and remove only that: a user's files beside
    them, whatever their names, are left as they were."""
    from autofit import disk
    from autofit.cli.args import check_out_dir

    mine = {".autofit-probe.123.tmp": "a", ".autofit-probe-x": "b", ".cat.png.tmp.png": "c", "cat.png": "d"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    check_out_dir(tmp_path, "--out", str(tmp_path))
    assert disk.unusable(tmp_path) is None
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == mine


def test_a_failed_atomic_write_leaves_nothing_and_the_old_file_whole(tmp_path):
    """autofit.files.write_atomically, which saves batch's and run's images: a writer that fails
    half-way leaves the previous file as it was and no temporary behind; one that succeeds
    replaces the file whole."""
    from autofit.files import write_atomically

    target = tmp_path / "cat.png"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half_then_fail, fsync=True)
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"] and target.read_bytes() == b"old"
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"] and target.read_bytes() == b"new"


def test_batch_cleanup_removes_dead_temporaries_but_never_a_users_files(proxy, tmp_path):
    """Before generating, a batch removes what a killed save of its own left (a temporary of a
    process that is gone), and leaves a user's files whose names merely look temporary."""
    from autofit.files import temporary_name

    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = out / temporary_name(out / "000000.png").name.replace(f".{os.getpid()}.", f".{child.pid}.")
    mine = {".cat.png.tmp.png": "a", ".notes.tmp": "b", "cat.tmp.png": "c"}
    for name, text in {**mine, dead.name: ""}.items():
        (out / name).write_text(text)
    run_batch(proxy, [BatchItem("000000", "a cat", 0)], out, defaults={"height": 64, "width": 64}, progress=False)
    assert not dead.exists()
    assert {n: (out / n).read_text() for n in mine} == mine
