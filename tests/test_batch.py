"""Batch splitting as a rung, and the resumable batch runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autofit import AutoFitUsageError, autofit
from autofit.batch import iter_manifest, load_items, run_batch
from autofit.testing import inject_oom, tiny_sdxl

from conftest import BUILDERS, CallCounter, run

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


def test_batch_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """A job killed after 2 images and rerun skips them and produces the same images."""
    items = load_items(_prompts(tmp_path, fmt="csv"))
    straight = tmp_path / "straight"
    run_batch(autofit(tiny_sdxl(), cache=False), items, straight,
              defaults={"height": 64, "width": 64, "num_inference_steps": 2}, progress=False)
    resumed = tmp_path / "resumed"
    run_batch(autofit(tiny_sdxl(), cache=False), items[:2], resumed,
              defaults={"height": 64, "width": 64, "num_inference_steps": 2}, progress=False)
    # A torn manifest line and a leftover temporary file, as a kill mid-write would leave.
    with open(resumed / "manifest.jsonl", "a") as f:
        f.write('{"id": "img2", "stat')
    (resumed / ".img2.123.tmp.png").write_bytes(b"partial")
    report = run_batch(autofit(tiny_sdxl(), cache=False), items, resumed,
                       defaults={"height": 64, "width": 64, "num_inference_steps": 2}, progress=False)
    assert report.skipped == ["img0", "img1"] and report.done == ["img2", "img3", "img4"]
    # The torn line stays torn; every record after it is whole and readable.
    done = [r["id"] for r in iter_manifest(resumed) if r.get("status") == "ok"]
    assert done == ["img0", "img1", "img2", "img3", "img4"]
    from PIL import Image
    import numpy as np

    for i in range(5):
        a = np.asarray(Image.open(straight / f"img{i}.png"))
        b = np.asarray(Image.open(resumed / f"img{i}.png"))
        assert (a == b).all()


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
from autofit.batch import run_batch
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
