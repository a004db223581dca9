"""Batch splitting as a rung, and the resumable batch runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autofit import AutoFitUsageError, autofit
from autofit.batch.runner import iter_manifest, load_items, run_batch
from autofit.testing import inject_oom, tiny_sdxl

from helpers import BUILDERS, CallCounter, run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_denoise_oom_with_a_batch_splits_it_first(kind):
    """With 2 images per prompt, a denoise OOM splits the batch before moving any weights, and the
    images equal an unsplit run with the same seed."""
    reference = run(autofit(BUILDERS[kind](), cache=False), kind, num_images_per_prompt=2)
    pipe = BUILDERS[kind]()
    proxy = autofit(pipe, cache=False)
    with inject_oom(proxy, stage="denoise", at=2) as fault:
        images = run(proxy, kind, num_images_per_prompt=2)
    assert fault.fired == 1
    assert [r.action for r in proxy.autofit.history] == ["split_batch"]
    assert images.shape[0] == 2
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=1e-4)
    # Each denoiser call now runs its first layer twice, on half the batch each time.
    first_layer = pipe.unet.conv_in if kind == "sdxl" else pipe.transformer.x_embedder
    counter = CallCounter(first_layer)
    run(proxy, kind, num_images_per_prompt=2)
    assert counter.n == 2 * 4


def test_decode_oom_with_a_batch_slices_before_offloading():
    """A decode OOM with a batch slices the VAE batch first (lossless), before moving weights."""
    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="decode"):
        run(proxy, "sdxl", num_images_per_prompt=2)
    assert proxy.autofit.history[0].action == "vae_slicing"


def test_batch_of_one_does_not_split():
    """With one image, the split rungs are skipped with a reason."""
    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="denoise"):
        run(proxy, "sdxl")
    rec = proxy.autofit.history[0]
    assert rec.action == "offload_encoders"
    assert ("split_batch", "batch of 1: nothing to split") in rec.skipped


# ---- the runner ---------------------------------------------------------------------------
def _prompts(tmp_path, n=5, fmt="jsonl"):
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"prompt": f"a photo of a cat {i}", "num_inference_steps": 2})
                                  for i in range(n)))
    else:
        path.write_text("id,prompt,seed\n" + "\n".join(f"img{i},a red painting {i},{100 + i}" for i in range(n)))
    return path


def test_batch_writes_images_and_manifest(tmp_path):
    """Every item gets an image and a manifest record with seed, plan, seconds, escalations."""
    proxy = autofit(tiny_sdxl(), cache=False)
    report = run_batch(proxy, load_items(_prompts(tmp_path)), tmp_path / "out",
                       defaults={"height": 64, "width": 64}, progress=False)
    assert len(report.done) == 5 and not report.failed
    records = list(iter_manifest(tmp_path / "out"))
    assert [r["id"] for r in records] == [f"{i:06d}" for i in range(5)]
    assert all(r["status"] == "ok" and (tmp_path / "out" / r["files"][0]).is_file() for r in records)
    assert records[3]["seed"] == 3 and "plan" in records[3] and "seconds" in records[3]


def _same_images(a_dir, b_dir, names):
    from PIL import Image
    import numpy as np

    for name in names:
        a = np.asarray(Image.open(a_dir / name))
        b = np.asarray(Image.open(b_dir / name))
        assert (a == b).all(), name


_KILL_JOB = """
import sys
from autofit import autofit
from autofit.batch.runner import run_batch
from autofit.testing import tiny_sdxl
pipe = tiny_sdxl()
pipe.set_progress_bar_config(disable=True)
run_batch(autofit(pipe, cache=False), sys.argv[1], sys.argv[2],
          defaults={"height": 64, "width": 64, "num_inference_steps": 2}, progress=False)
"""


def test_batch_resumes_after_a_real_kill_and_matches_an_uninterrupted_run(tmp_path):
    """A batch process SIGKILLed mid-run and rerun skips what it finished, redoes the rest, leaves
    no temporary file, and its images equal an uninterrupted run's."""
    import signal
    import time

    prompts = _prompts(tmp_path, n=12, fmt="csv")
    resumed = tmp_path / "resumed"
    script = tmp_path / "job.py"
    script.write_text(_KILL_JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(prompts), str(resumed)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = resumed / "manifest.jsonl"
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as two items are recorded: the process is then in the middle of the third.
        while not (manifest.is_file() and manifest.read_text().count("\n") >= 2):
            assert child.poll() is None, "the batch process ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_done = [r["id"] for r in iter_manifest(resumed) if r.get("status") == "ok"]
    assert 2 <= len(killed_done) < 12
    defaults = {"height": 64, "width": 64, "num_inference_steps": 2}
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, resumed, defaults=defaults, progress=False)
    assert report.skipped == killed_done and len(report.done) == 12 - len(killed_done) and not report.failed
    assert not list(resumed.glob(".*tmp*"))
    straight = tmp_path / "straight"
    run_batch(autofit(tiny_sdxl(), cache=False), prompts, straight, defaults=defaults, progress=False)
    _same_images(straight, resumed, [f"img{i}.png" for i in range(12)])


def test_batch_cleans_temporaries_of_dead_processes(tmp_path):
    """A temporary image left by a process that no longer runs is removed by the next run."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that ran and ended
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / f".000000.{child.pid}.tmp.png"
    leftover.write_bytes(b"")
    run_batch(autofit(tiny_sdxl(), cache=False), _prompts(tmp_path, n=1), out,
              defaults={"height": 64, "width": 64}, progress=False)
    assert not leftover.exists() and (out / "000000.png").is_file()


def test_batch_item_that_cannot_fit_is_recorded_and_the_job_goes_on(tmp_path):
    """An item exhausted at the last rung is recorded as failed; later items still run."""
    proxy = autofit(tiny_sdxl(), cache=False, max_retries=1)
    items = load_items(_prompts(tmp_path, n=3))
    fault = inject_oom(proxy, stage="decode", when=lambda n: n in (1, 2))  # item 0: fails, then retry fails
    report = run_batch(proxy, items, tmp_path / "out", defaults={"height": 64, "width": 64}, progress=False)
    fault.remove()
    assert list(report.failed) == ["000000"] and report.done == ["000001", "000002"]
    failed = [r for r in iter_manifest(tmp_path / "out") if r["status"] == "failed"]
    assert failed[0]["error"].startswith("autofit could not fit")


@pytest.mark.parametrize(
    "content, match",
    [("not json\n", "not JSON"), ('{"text": "x"}\n', "no 'prompt'"),
     ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "duplicate id"),
     ('{"prompt": "a", "id": "../etc"}\n', "must use letters")],
)
def test_bad_prompt_files_get_clear_errors(tmp_path, content, match):
    """A malformed prompts file is refused with what is wrong and where."""
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(AutoFitUsageError, match=match):
        load_items(path)


def test_cli_batch(tmp_path):
    """`autofit batch` over a saved tiny pipeline, twice: the second run skips everything."""
    from autofit.cli import main

    model = tmp_path / "model"
    tiny_sdxl().save_pretrained(model)
    args = ["batch", str(model), "--prompts", str(_prompts(tmp_path, n=2)), "--out", str(tmp_path / "o"),
            "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--json",
            "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["000000.png", "000001.png"]


def test_distributed_batch_with_accelerate_launch_on_cpu(tmp_path):
    """Two CPU processes under `accelerate launch` split the items, write their own shards."""
    model = tmp_path / "model"
    tiny_sdxl().save_pretrained(model)
    prompts = _prompts(tmp_path, n=4)
    script = tmp_path / "job.py"
    script.write_text(f"""
from diffusers import DiffusionPipeline
from autofit.batch.runner import run_batch
pipe = DiffusionPipeline.from_pretrained({str(model)!r})
pipe.set_progress_bar_config(disable=True)
run_batch(pipe, {str(prompts)!r}, {str(tmp_path / 'out')!r}, defaults={{"height": 64, "width": 64}},
          progress=False, distributed=True, options={{"cache": {str(tmp_path / 'cache')!r}}})
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # accelerate's multi-process launcher (torchrun underneath); without CUDA the processes run on
    # the CPU and PartialState joins them with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29517", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "out").glob("manifest*.jsonl"))
    assert shards == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    ids = sorted(r["id"] for r in iter_manifest(tmp_path / "out") if r["status"] == "ok")
    assert ids == [f"{i:06d}" for i in range(4)]


# ---- hardened edges (issue 16) -------------------------------------------------------------
BAD_VALUES = [
    {"height": 7}, {"height": 60}, {"seed": 2**64}, {"seed": 1e30}, {"negative_prompt": 5},
    {"num_inference_steps": "abc"}, {"steps": 3}, {"guidence_scale": 5.0}, {"width": -64}, {"prompt": ""},
]


def test_ten_bad_items_among_good_ones_in_one_run(tmp_path):
    """Items with bad values or keys among good ones: one run makes every good image and one
    failure record per bad item, with its line. (200 items with 10 bad: benchmarks/batch_200.py,
    kept out of the suite for its minutes of CPU.)"""
    lines, bad_lines = [], {}
    for i in range(20):
        row = {"id": f"p{i:03d}", "prompt": f"a photo of a cat {i}", "num_inference_steps": 1}
        if i % 2:
            row.update(BAD_VALUES[i // 2])
            bad_lines[f"p{i:03d}"] = i + 1
        lines.append(json.dumps(row))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines))
    out = tmp_path / "out"
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, out, defaults={"height": 16, "width": 16},
                       progress=False)
    images = sorted(p.name for p in out.glob("*.png"))
    assert len(images) == 10 and len(report.done) == 10
    failed = {r["id"]: r for r in iter_manifest(out) if r["status"] == "failed"}
    assert set(failed) == set(report.failed) == set(bad_lines)
    for item_id, line in bad_lines.items():
        assert failed[item_id]["line"] == line and f"p.jsonl:{line}:" in failed[item_id]["error"]
    assert "known keys: id, prompt, seed" in failed["p013"]["error"]  # {"steps": 3}
    assert not any(f"{i}.png" in images for i in bad_lines)


def test_an_item_the_pipeline_refuses_is_recorded_and_the_job_goes_on(tmp_path):
    """A non-OOM error raised inside the pipeline (here by its step callback on the second item)
    fails that item only, with its error in the manifest; later items still run."""
    calls = []

    def refuse_second_item(pipe, step, timestep, callback_kwargs):
        calls.append(step)
        if calls.count(0) == 2:  # the first step of the second item
            raise ValueError("this item's latents are not what the UNet takes")
        return callback_kwargs

    report = run_batch(autofit(tiny_sdxl(), cache=False), _prompts(tmp_path, n=3), tmp_path / "out",
                       defaults={"height": 16, "width": 16, "num_inference_steps": 1,
                                 "callback_on_step_end": refuse_second_item}, progress=False)
    assert report.done == ["000000", "000002"] and list(report.failed) == ["000001"]
    failed = [r for r in iter_manifest(tmp_path / "out") if r["status"] == "failed"]
    assert failed[0]["error"] == "ValueError: this item's latents are not what the UNet takes"


def test_output_names_cannot_collide(tmp_path):
    """Item 'a' with two images writes a_0.png and a_1.png; an item with id 'a_0' is refused
    instead of overwriting a_0.png, and the manifest says so."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "x", "num_images_per_prompt": 2}) + "\n"
                       + json.dumps({"id": "a_0", "prompt": "y"}) + "\n")
    out = tmp_path / "out"
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, out,
                       defaults={"height": 16, "width": 16, "num_inference_steps": 1}, progress=False)
    assert report.done == ["a"] and list(report.failed) == ["a_0"]
    assert "a_0.png" in report.failed["a_0"]
    ok = [r for r in iter_manifest(out) if r["status"] == "ok"]
    assert [r["files"] for r in ok] == [["a_0.png", "a_1.png"]]
    # a_0.png is item a's first image (seed 0), not item a_0's: compare with a clean run of a alone
    alone = tmp_path / "alone"
    only_a = tmp_path / "a.jsonl"
    only_a.write_text(prompts.read_text().splitlines()[0])
    run_batch(autofit(tiny_sdxl(), cache=False), only_a, alone,
              defaults={"height": 16, "width": 16, "num_inference_steps": 1}, progress=False)
    _same_images(alone, out, ["a_0.png"])


def test_an_edited_prompts_file_regenerates_exactly_what_changed(tmp_path):
    """Resume is keyed on each item's content: after a prompt is inserted at the top of a file
    without ids, every item whose prompt or seed changed is made again and matches a clean run."""
    defaults = {"height": 16, "width": 16, "num_inference_steps": 1}
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "out"
    run_batch(autofit(tiny_sdxl(), cache=False), prompts, out, defaults=defaults, progress=False)
    prompts.write_text("a green bird\na red cat\na blue dog\n")  # ids and seeds follow the index
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, out, defaults=defaults, progress=False)
    assert report.done == ["000000", "000001", "000002"] and not report.skipped
    clean = tmp_path / "clean"
    run_batch(autofit(tiny_sdxl(), cache=False), prompts, clean, defaults=defaults, progress=False)
    _same_images(clean, out, ["000000.png", "000001.png", "000002.png"])
    # With ids and seeds, only the edited item is made again.
    prompts = tmp_path / "q.jsonl"
    rows = [{"id": f"i{k}", "prompt": f"cat {k}", "seed": k} for k in range(3)]
    prompts.write_text("\n".join(map(json.dumps, rows)))
    run_batch(autofit(tiny_sdxl(), cache=False), prompts, tmp_path / "q", defaults=defaults, progress=False)
    rows[1]["prompt"] = "dog 1"
    prompts.write_text("\n".join(map(json.dumps, [{"id": "new", "prompt": "bird", "seed": 9}, *rows])))
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, tmp_path / "q",
                       defaults={**defaults, "num_inference_steps": 1}, progress=False)
    assert sorted(report.done) == ["i1", "new"] and sorted(report.skipped) == ["i0", "i2"]
    # A changed setting is a change too.
    report = run_batch(autofit(tiny_sdxl(), cache=False), prompts, tmp_path / "q",
                       defaults={**defaults, "num_inference_steps": 2}, progress=False)
    assert sorted(report.done) == ["i0", "i1", "i2", "new"]


def test_excel_csv_with_a_bom_and_plain_text_prompt_files(tmp_path):
    """A CSV saved as Excel's "CSV UTF-8" (with a BOM) and a .txt of one prompt a line are read."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes("\ufeffprompt,seed\nune photo d'un chat,3\n".encode("utf-8"))
    items = load_items(csv_path)
    assert [(i.prompt, i.seed) for i in items] == [("une photo d'un chat", 3)]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [(i.id, i.prompt, i.seed) for i in load_items(txt, base_seed=5)] == [("000000", "a cat", 5),
                                                                                ("000001", "a dog", 6)]
    latin1 = tmp_path / "l.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(AutoFitUsageError, match="not UTF-8"):
        load_items(latin1)


@pytest.mark.parametrize("row, match", [
    ({"prompt": "a", "height": 7}, "out of range"), ({"prompt": "a", "width": 60}, "multiple of 8"), ({"prompt": "a", "seed": 2**64}, "out of range"),
    ({"prompt": "a", "seed": 1e30}, "out of range"), ({"prompt": "a", "negative_prompt": 5}, "must be text"),
    ({"prompt": "a", "num_inference_steps": "abc"}, "not a whole number"),
    ({"prompt": "a", "guidance_scale": float("inf")}, "out of range"),
    ({"prompt": "a", "steps": 3}, "unknown key.*'steps'.*known keys"),
])
def test_bad_values_are_refused_with_their_line(tmp_path, row, match):
    """Each bad value is refused before anything runs, naming the file and line."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(AutoFitUsageError, match=match) as info:
        load_items(path)
    assert str(info.value).startswith("p.jsonl:2:")


def test_full_disk_stops_the_job_with_one_error_and_no_temporary(tmp_path):
    """A save that fails for lack of space stops the job with BatchError (the next items could
    not be saved either), leaves no temporary file, and a rerun finishes the job."""
    import errno

    from PIL import Image

    from autofit.batch.runner import BatchError

    out = tmp_path / "out"
    real_save = Image.Image.save
    calls = []

    def full_disk(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb"):
                pass  # the file is created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)

    Image.Image.save = full_disk
    try:
        with pytest.raises(BatchError, match="No space left"):
            run_batch(autofit(tiny_sdxl(), cache=False), _prompts(tmp_path, n=3), out,
                      defaults={"height": 16, "width": 16}, progress=False)
    finally:
        Image.Image.save = real_save
    assert not list(out.glob(".*tmp*"))
    report = run_batch(autofit(tiny_sdxl(), cache=False), _prompts(tmp_path, n=3), out,
                       defaults={"height": 16, "width": 16}, progress=False)
    assert report.skipped == ["000000"] and report.done == ["000001", "000002"]


def test_manifest_rows_and_the_run_plan_file_record_escalations_one_way(tmp_path):
    """A batch row's escalations are the full records of the steps its call took
    (autofit.records.plan_record: every field of each EscalationRecord), as `autofit run`'s plan
    file writes them."""
    from autofit.records import plan_record

    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="decode", at=1):
        run_batch(proxy, load_items(_prompts(tmp_path, n=2)), tmp_path / "out",
                  defaults={"height": 64, "width": 64}, progress=False)
    first, second = list(iter_manifest(tmp_path / "out"))
    history = proxy.autofit.history
    assert history and first["escalations"] == json.loads(json.dumps([r.as_dict() for r in history]))
    assert first["escalations"][0]["stage"] == "decode" and first["escalations"][0]["oom_kind"] == "device"
    assert second["escalations"] == [] and second["plan"] == list(proxy.autofit.plan)
    whole = plan_record(proxy.autofit.plan, history, proxy.autofit.last_call)
    assert whole["escalations"] == [r.as_dict() for r in history] and whole["last_call"]["plan"] == list(proxy.autofit.plan)
