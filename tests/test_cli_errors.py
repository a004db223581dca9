"""The command line answers a user's mistake in one line on stderr with exit code 2, before any
model is loaded; --help and --version are fast; results alone go to stdout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autofit.cli import main
from autofit.testing import tiny_sdxl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


def _one_line_error(capsys, argv, match):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's way out, as the shell sees it
        code = exc.code
    err = capsys.readouterr().err
    # diffusers' loading progress bar (shown while a folder is read) is not an error line
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


CASES = {
    "plan: no folder": (["plan", "{missing}"], "no such folder"),
    "run: no folder": (["run", "{missing}", "--prompt", "x", "--out", "{tmp}/o.png"], "no such folder"),
    "batch: no folder": (["batch", "{missing}", "--prompts", "{prompts}", "--out", "{tmp}/o"], "no such folder"),
    "run: not a pipeline": (["run", "{tmp}", "--prompt", "x", "--out", "{tmp}/o.png"], "model_index.json"),
    "batch: not a pipeline": (["batch", "{tmp}", "--prompts", "{prompts}", "--out", "{tmp}/o"], "model_index.json"),
    "run: a hub id offline": (["run", "stabilityai/no-such-model", "--prompt", "x", "--out", "{tmp}/o.png"],
                              "download it first"),
    "run: broken pipeline folder": (["run", "{broken}", "--prompt", "x", "--out", "{tmp}/o.png"],
                                    "cannot load the pipeline"),
    "run --steps 0": (["run", "{model}", "--prompt", "x", "--out", "{tmp}/o.png", "--steps", "0"], "at least 1"),
    "run --device banana": (["run", "{model}", "--prompt", "x", "--out", "{tmp}/o.png", "--device", "banana"],
                            "not a device"),
    "run --out o.txt": (["run", "{model}", "--prompt", "x", "--out", "{tmp}/o.txt"], "not an image format"),
    "run --height 0": (["run", "{model}", "--prompt", "x", "--out", "{tmp}/o.png", "--height", "0"], "multiple of 8"),
    "batch: non-UTF-8 prompts": (["batch", "{model}", "--prompts", "{latin1}", "--out", "{tmp}/o"], "not UTF-8"),
    "batch: .doc prompts": (["batch", "{model}", "--prompts", "{tmp}/p.doc", "--out", "{tmp}/o"], ".txt"),
    "plan --height 7": (["plan", "{model}", "--height", "7"], "multiple of 8"),
    "plan --height -64": (["plan", "{model}", "--height", "-64"], "multiple of 8"),
    "plan --height 1e9": (["plan", "{model}", "--height", "1e9"], "not a whole number"),
    "plan --height 10**9": (["plan", "{model}", "--height", "1000000000"], "multiple of 8"),
    "plan --batch 0": (["plan", "{model}", "--batch", "0"], "at least 1"),
    "plan --frames -5": (["plan", "{model}", "--frames", "-5"], "at least 1"),
    "plan --vram lots": (["plan", "{model}", "--vram", "lots"], "not a size"),
    # issue 27: a broken index, a partial download, an --out that cannot be written
    "plan: model_index.json not JSON": (["plan", "{notjson}"], "not valid JSON"),
    "plan: model_index.json a list": (["plan", "{listindex}"], "not a JSON object"),
    "plan: components missing": (["plan", "{broken}"], "unet (no unet/ folder)"),
    "cache clear --model: index not JSON": (["cache", "clear", "--model", "{notjson}", "--cache-dir", "{tmp}/c"],
                                            "not valid JSON"),
    "run --out under a file": (["run", "{model}", "--prompt", "x", "--out", "{afile}/o.png"], "is a file"),
    "run --out a folder": (["run", "{model}", "--prompt", "x", "--out", "{tmp}/d.png"], "is a folder"),
    "batch --out under a file": (["batch", "{model}", "--prompts", "{prompts}", "--out", "{afile}/o"], "is a file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_and_exit_2(case, sdxl_dir, tmp_path, capsys):
    """Each mistake: exit 2, one line on stderr that says what to do, nothing written."""
    argv, match = CASES[case]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    (tmp_path / "p.doc").write_text("a cat\n")
    (tmp_path / "l.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    notjson = tmp_path / "notjson"
    notjson.mkdir()
    (notjson / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline", "unet": [')
    listindex = tmp_path / "listindex"
    listindex.mkdir()
    (listindex / "model_index.json").write_text('["StableDiffusionXLPipeline"]')
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "d.png").mkdir()
    fill = {"missing": tmp_path / "nope", "tmp": tmp_path, "prompts": prompts, "model": sdxl_dir,
            "latin1": tmp_path / "l.txt", "broken": broken, "notjson": notjson, "listindex": listindex,
            "afile": tmp_path / "afile"}
    _one_line_error(capsys, [a.format(**fill) for a in argv], match)
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_device_cuda_on_a_cpu_only_torch(sdxl_dir, tmp_path, capsys):
    """--device cuda without CUDA is refused before the model is loaded."""
    for command in (["run", sdxl_dir, "--prompt", "x", "--out", tmp_path / "o.png"], ["plan", sdxl_dir], ["doctor"]):
        _one_line_error(capsys, [*command, "--device", "cuda"], "no cuda device")


def test_a_bare_size_is_gib_with_a_warning(sdxl_dir, capsys):
    """--vram 8 plans for 8 GiB (not 8 bytes) and warns that the unit was assumed."""
    assert main(["plan", str(sdxl_dir), "--vram", "8", "--height", "64", "--width", "64", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["vram_budget_gib"] == 8.0
    assert "read as 8GiB" in captured.err


def test_version_and_a_fast_help_without_torch():
    """--version prints the version; --help and the parser do not import torch or diffusers."""
    env_code = ("import sys; from autofit.cli import build_parser; build_parser(); "
                "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "-m", "autofit.cli", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src")}, timeout=120)
    from autofit import __version__

    assert out.returncode == 0 and out.stdout.strip() == f"autofit {__version__}"


def test_batch_json_is_one_document_and_bad_items_are_skipped(sdxl_dir, tmp_path, capsys):
    """`batch --json`: stdout is exactly one JSON document (events go to stderr); a bad item is
    reported on stderr with its line, recorded, and makes the exit code 4 while the rest run."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "steps": 2}\n')
    code = main(["batch", str(sdxl_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--steps", "1",
                 "--height", "16", "--width", "16", "--device", "cpu", "--json", "--cache-dir", str(tmp_path / "c")])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 4 and summary["done"] == 1 and list(summary["failed"]) == ["000001"]
    assert "p.jsonl:2:" in captured.err and "autofit.batch_done" in captured.err


def test_cache_command_lists_shows_and_clears(sdxl_dir, tmp_path, capsys):
    """`autofit cache list/show/clear --model`: what the runtime stored, seen and forgotten;
    a record of another pipeline survives a --model clear."""
    from autofit import autofit
    from autofit.facts.cache import PlanCache
    from diffusers import DiffusionPipeline

    cache_dir = tmp_path / "c"
    proxy = autofit(DiffusionPipeline.from_pretrained(sdxl_dir), cache=cache_dir)
    proxy("x", num_inference_steps=1, height=16, width=16)
    PlanCache(cache_dir).put("other", {"plan": [], "key": {"pipeline": "FluxPipeline", "components": []}})
    (cache_dir / "plans" / "junk.json").write_text("null")
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache_dir), "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["records"]}
    assert len(rows) == 3 and rows["junk"]["problem"] and rows["other"]["pipeline"] == "FluxPipeline"
    (mine,) = [k for k, r in rows.items() if r["pipeline"] == "StableDiffusionXLPipeline"]
    assert main(["cache", "show", mine, "--cache-dir", str(cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == list(proxy.autofit.plan)
    assert main(["cache", "clear", "--model", str(sdxl_dir), "--cache-dir", str(cache_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": 2}  # its record and the unreadable one
    assert [e.key for e in PlanCache(cache_dir).entries()] == ["other"]
    _one_line_error(capsys, ["cache", "show", mine, "--cache-dir", str(cache_dir)], "no usable record")
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert PlanCache(cache_dir).entries() == []
