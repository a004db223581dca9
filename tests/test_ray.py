"""autofit's Ray adapter (src/autofit/ray.py) on a local Ray cluster: 2 CPU cores, 2 logical GPUs,
one actor per GPU. Skipped without the `ray` extra; `make test` installs it."""

import ast
import functools
import gc
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

# Read by Ray when it is imported: every Ray address on 127.0.0.1 (without it, Ray 2.60 listens on
# every interface and advertises the external one).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from autofit.batch import iter_manifest  # noqa: E402
from autofit.ray import GenerateImages, run_batch_on_ray  # noqa: E402

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
DEFAULTS = {"height": 64, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (ray.init takes ~10 s here), on loopback only. Workers
    import this module (the factories below are pickled by reference) and autofit from src."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")])}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False,
                 object_store_memory=256 * 2**20, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def _pipeline(kill_marker=None, kill_at=3, model_dir=None):
    """Runs in the actors: a tiny SDXL whose decode runs out of memory (a real
    torch.OutOfMemoryError from inside the VAE) on every attempt for images over 64 px, so those
    items exhaust the ladder; with ``kill_marker``, the first actor to start its ``kill_at``-th
    item SIGKILLs itself (once per job: the marker is claimed atomically)."""
    import autofit.engine.recovery
    from autofit.testing import inject_oom, tiny_sdxl

    # Recovery's backoff waits are not slept, as in conftest (this runs in a Ray worker).
    autofit.engine.recovery.sleep = lambda seconds: None
    if model_dir is not None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model_dir)
    else:
        pipe = tiny_sdxl()
    # As in conftest: what is alive now is frozen out of the gc.collect() each recovery runs.
    gc.collect()
    gc.freeze()
    scale, state = pipe.vae_scale_factor, {"big": False, "items": 0}

    def denoise(module, args):
        state["big"] = args[0].shape[-1] * scale > 64

    pipe.unet.conv_in.register_forward_pre_hook(denoise)
    inject_oom(pipe, stage="decode", when=lambda n: state["big"])
    if kill_marker is not None:
        def encode(module, args):  # the text encoder runs once per item
            state["items"] += 1
            if state["items"] == kill_at:
                try:
                    fd = os.open(kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)

        pipe.text_encoder.register_forward_pre_hook(encode)
    return pipe


GOOD = [f"g{i:02d}" for i in range(22)]
BIG = [f"big{i}" for i in range(4)]
BAD = {  # id -> (row, what the recorded error says)
    "bad-h": ({"prompt": "a cat", "height": 60}, "multiple of 8"),
    "bad-key": ({"prompt": "a cat", "guidence_scale": 5}, "unknown key"),
    "bad-empty": ({"prompt": ""}, "no 'prompt'"),
    "bad/id": ({"prompt": "a cat"}, "must use letters"),
}


def _prompts(path):
    rows = [{"id": i, "prompt": f"a photo of a cat {i}", "seed": n} for n, i in enumerate(GOOD)]
    rows[10:10] = [{"id": i, "prompt": f"a huge cat {i}", "seed": 7, "height": 72, "width": 72} for i in BIG]
    for n, (i, (row, _)) in enumerate(BAD.items()):
        rows.insert(9 + 4 * n, {"id": i, **row})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _pngs(out):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}


def test_kill_oom_and_bad_items_then_a_rerun_writes_nothing_new(cluster, tmp_path):
    """30 items (22 good, 4 that exhaust the ladder under injected OOMs, 4 bad) on 2 actors, one
    actor SIGKILLed in the middle of its first batch: every good item is written exactly once
    (files and manifest records counted), every bad one is recorded with its reason, the report
    is exact; a rerun writes nothing new and skips every good item."""
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
    prompts, out, cache = _prompts(tmp_path / "p.jsonl"), tmp_path / "out", tmp_path / "node-cache"
    marker = tmp_path / "killed"
    factory = functools.partial(_pipeline, kill_marker=str(marker))
    kw = dict(defaults=DEFAULTS, cache_dir=cache, actors=2, gpus_per_actor=1, batch_size=4,
              progress=False)
    report = run_batch_on_ray(factory, prompts, out, **kw)

    # The kill happened, in an actor that had written items of its batch, and Ray restarted it.
    killed = int(marker.read_text())
    shards = {p.name: list(map(json.loads, p.read_text().splitlines())) for p in out.glob("manifest*.jsonl")}
    killed_shard = [recs for name, recs in shards.items() if name.endswith(f"-{killed}.jsonl")]
    # It died as its third item started (blocks hold 3-4 items): two records, then nothing.
    assert len(killed_shard) == 1 and len(killed_shard[0]) == 2, shards
    actor_pids = {name.rsplit("-", 1)[1] for name in shards if "-driver-" not in name}
    assert len(actor_pids) >= 3  # two actors and the restarted one

    # Exactly once: one image and one ok record per good item, nothing else.
    assert sorted(_pngs(out)) == sorted(f"{i}.png" for i in GOOD)
    records = list(iter_manifest(out))
    assert Counter(r["id"] for r in records if r["status"] == "ok") == Counter(GOOD)
    failed = {r["id"]: r["error"] for r in records if r["status"] == "failed"}
    assert Counter(r["id"] for r in records if r["status"] == "failed") == Counter([*BIG, *BAD])
    for item_id, (_, reason) in BAD.items():
        assert reason in failed[item_id] and reason in report.failed[item_id]
    for item_id in BIG:
        assert failed[item_id].startswith("autofit could not fit the decode stage")
    assert not list(out.glob(".*tmp*")) and not (out / ".autofit-ray").exists()

    # The report is the single-machine runner's: what was made now, before, and what failed.
    assert sorted(report.done) == GOOD and report.skipped == [] and set(report.failed) == {*BIG, *BAD}
    assert list(cache.rglob("*.json"))  # the node-local plan cache learned the 72 px workload's plan

    before, n_records = _pngs(out), len(records)
    again = run_batch_on_ray(factory, prompts, out, **{**kw, "actors": 1})  # one start less on 2 cores
    assert again.done == [] and sorted(again.skipped) == GOOD and set(again.failed) == {*BIG, *BAD}
    assert _pngs(out) == before  # no image written again, none added
    after = list(iter_manifest(out))
    assert [r for r in after if r["status"] == "ok"] == [r for r in records if r["status"] == "ok"]
    assert len(after) == n_records + len(BIG) + len(BAD)  # failed items are tried again, as run_batch does


def test_cli_batch_on_ray_matches_the_single_machine_runner(cluster, tmp_path, capsys):
    """`autofit batch DIR --prompts F --out O --ray --json` on the cluster: the same summary and
    the same images as without --ray; a rerun is a skip of everything."""
    from PIL import Image
    import numpy as np
    from autofit.cli import main
    from autofit.testing import tiny_sdxl

    model = tmp_path / "model"
    tiny_sdxl().save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog", "seed": 5}, {"id": "c", "prompt": "x", "width": 7},
        {"prompt": "no id, no seed"}]))
    common = ["--prompts", str(prompts), "--steps", "2", "--height", "64", "--width", "64", "--json",
              "--cache-dir", str(tmp_path / "c"), "--seed", "3"]
    summaries = {}
    for name, extra in (("ray", ["--ray"]), ("local", [])):
        assert main(["batch", str(model), "--out", str(tmp_path / name), *common, *extra]) == 4
        summaries[name] = json.loads(capsys.readouterr().out)
    for s in summaries.values():
        s.pop("seconds"), s.pop("out")
    assert summaries["ray"] == summaries["local"] == {"done": 3, "skipped": 0, "failed": {
        "c": summaries["local"]["failed"]["c"]}}
    assert "width=7" in summaries["ray"]["failed"]["c"]
    for name in ("a.png", "b.png", "000003.png"):
        # The same image to float rounding: an actor may run torch with another thread count than
        # this process (a CPU sums in another order), so an 8-bit value may differ by one.
        ray_px = np.asarray(Image.open(tmp_path / "ray" / name)).astype(int)
        local_px = np.asarray(Image.open(tmp_path / "local" / name)).astype(int)
        assert ray_px.shape == local_px.shape and np.abs(ray_px - local_px).max() <= 1
        assert (ray_px != local_px).mean() < 0.01
    assert main(["batch", str(model), "--out", str(tmp_path / "ray"), *common, "--ray"]) == 4
    rerun = json.loads(capsys.readouterr().out)
    assert (rerun["done"], rerun["skipped"], list(rerun["failed"])) == (0, 3, ["c"])


def test_rows_as_ray_gives_them_are_checked_like_a_prompts_file(tmp_path):
    """The actor's own checks, without a cluster: a numpy batch with NaN for missing numbers and
    a pyarrow one with nulls; a bad row fails alone, a row without an id is named by its content."""
    import numpy as np
    import pyarrow as pa
    from autofit.testing import tiny_sdxl

    gen = GenerateImages(tiny_sdxl, tmp_path / "out", defaults=DEFAULTS, cache_dir=tmp_path / "c", seed=11)
    numpy_batch = {"id": np.array(["a", "b", None], dtype=object), "prompt": np.array(["x", "y", "z"], dtype=object),
                   "height": np.array([np.nan, 60.0, 64.0])}
    rows = gen(numpy_batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "height=60 must be a multiple of 8" in rows[1]["error"]
    assert rows[2]["id"] == rows[2]["key"] and (tmp_path / "out" / f"{rows[2]['id']}.png").is_file()
    records = {r["id"]: r for r in iter_manifest(tmp_path / "out")}
    assert records["a"]["seed"] == 11 and records["a"]["settings"] == DEFAULTS
    table = pa.Table.from_pylist([{"id": "a", "prompt": "x", "num_inference_steps": None},
                                  {"id": "d", "prompt": "w", "num_inference_steps": 0}])
    again = gen(table).to_pylist()
    assert [r["status"] for r in again] == ["skipped", "failed"] and "out of range" in again[1]["error"]
    assert Counter(r["status"] for r in iter_manifest(tmp_path / "out")) == {"ok": 2, "failed": 2}


def test_an_item_whose_worker_keeps_dying_fails_once_per_run(tmp_path):
    """Starts noted by workers that died (as Ray leaves them: a note, no record) count against the
    item; at max_attempts it is recorded as failed instead of run again, and a retried batch in
    the same run reports the records it finds instead of making or recording anything twice."""
    import pyarrow as pa
    from autofit.testing import tiny_sdxl

    out = tmp_path / "out"
    (out / ".autofit-ray" / "r1").mkdir(parents=True)
    (out / ".autofit-ray" / "r1" / "dead-1.started").write_text("a\na\n")  # two workers died on `a`
    gen = GenerateImages(tiny_sdxl, out, defaults=DEFAULTS, cache_dir=tmp_path / "c", run="r1", max_attempts=2)
    batch = pa.Table.from_pylist([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    first = gen(batch).to_pylist()
    assert [r["status"] for r in first] == ["failed", "ok"] and "worker died 2 times" in first[0]["error"]
    assert not (out / "a.png").exists()
    again = gen(batch).to_pylist()  # the same batch retried in the same run
    assert [(r["status"], r["error"]) for r in again] == [(r["status"], r["error"]) for r in first]
    assert Counter((r["id"], r["status"]) for r in iter_manifest(out)) == {("a", "failed"): 1, ("b", "ok"): 1}


def test_a_full_disk_in_an_actor_is_one_line_on_the_driver():
    """Ray Data hands the driver a UserCodeException holding only the text of the actor's
    traceback (seen with a save that raised ENOSPC in an actor): the BatchError's message is read
    from it, and nothing else is taken for one."""
    from ray.exceptions import UserCodeException

    from autofit.ray import _batch_error

    text = ("UDF failed to process a data block.\nTraceback (most recent call last):\n  ...\n"
            "autofit.batch.runner.BatchError: cannot write /out/a.png: No space left on device; free space and rerun to resume")
    try:
        try:
            raise UserCodeException(text)
        except UserCodeException as inner:
            raise RuntimeError("the dataset failed") from inner
    except RuntimeError as exc:
        assert _batch_error(exc) == "cannot write /out/a.png: No space left on device; free space and rerun to resume"
    assert _batch_error(UserCodeException("ValueError: something else")) is None


def test_ray_is_imported_only_by_the_adapter():
    """No module of autofit but ray.py imports ray (the core works without the extra)."""
    importers = []
    for path in (SRC / "autofit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(path.name)
    assert set(importers) == {"ray.py"}


def test_without_ray_the_adapter_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "autofit.ray")
    with pytest.raises(ImportError, match=r"\[ray\]"):
        import autofit.ray  # noqa: F401


def test_the_end_of_a_run_removes_only_its_own_start_notes(tmp_path):
    """`.autofit-ray/<run>/` holds the notes of one run's item starts; at the end only that run's
    `*.started` files go. Another run's notes, a user's file in the folder, and a symlink's target
    stay (a link named like a note is removed as a link, its target kept)."""
    from autofit.ray import STARTS_DIR, _remove_starts

    folder = tmp_path / STARTS_DIR
    (folder / "r1").mkdir(parents=True)
    (folder / "r2").mkdir()
    (folder / "r1" / "node-1.started").write_text("a\n")
    keep = {folder / "r1" / "notes.txt": "mine", folder / "r2" / "node-2.started": "b\n",
            tmp_path / "target.txt": "the target"}
    for path, text in keep.items():
        path.write_text(text)
    (folder / "r1" / "link.started").symlink_to(tmp_path / "target.txt")
    _remove_starts(tmp_path, "r1")
    assert {p: p.read_text() for p in keep} == keep
    assert sorted(p.name for p in (folder / "r1").iterdir()) == ["notes.txt"]
    _remove_starts(tmp_path, "r2")  # the last run's notes gone: its folder and the empty root go too
    assert not (folder / "r2").exists() and (folder / "r1" / "notes.txt").exists()
