"""`autofit plan`, `doctor` and `run` on a tiny pipeline saved to disk."""

import json
import logging

import pytest

from autofit.cli import main
from autofit.facts.footprint import measure, measure_folder
from autofit.testing import tiny_sdxl


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


def test_footprint_from_headers_matches_loaded_modules(sdxl_dir):
    """Sizes read from safetensors headers match the loaded modules' sizes (non-persistent
    buffers such as CLIP's position_ids are not in the files), without loading weights."""
    cls, from_disk = measure_folder(sdxl_dir)
    loaded = measure(tiny_sdxl())
    assert cls == "StableDiffusionXLPipeline"
    for name, c in loaded.components.items():
        assert from_disk.components[name].bytes == pytest.approx(c.bytes, rel=0.01)
        assert from_disk.components[name].leaf_bytes == c.leaf_bytes
    # Loaded from that folder, the components' files are the undo copy: the planner's host RAM
    # for one-way rungs agrees between `autofit plan MODEL_DIR` and the loaded pipeline.
    from diffusers import DiffusionPipeline

    reloaded = measure(DiffusionPipeline.from_pretrained(sdxl_dir))
    assert all(from_disk.components[n].restorable and c.restorable for n, c in reloaded.components.items())
    assert not any(c.restorable for c in loaded.components.values())


def test_footprint_from_pickled_checkpoints_matches_safetensors(sdxl_dir, tmp_path):
    """A pipeline saved as PyTorch .bin files is measured too (shapes and dtypes on the meta
    device, no weights read); before, its components were silently left out of the plan."""
    tiny_sdxl().save_pretrained(tmp_path, safe_serialization=False)
    # diffusers writes .bin for the UNet and VAE (transformers 5 writes safetensors regardless).
    assert not list(tmp_path.glob("unet/*.safetensors")) and list(tmp_path.glob("unet/*.bin"))
    _, from_bin = measure_folder(tmp_path)
    _, from_st = measure_folder(sdxl_dir)
    assert set(from_bin.components) == set(from_st.components)
    for name, c in from_st.components.items():
        assert from_bin.components[name].bytes == c.bytes
        assert from_bin.components[name].cast_bytes == c.cast_bytes
        if name in ("unet", "vae"):
            assert not from_bin.components[name].restorable  # autofit's undo reads safetensors only


def test_plan_json_lists_strategies_and_a_pick(sdxl_dir, capsys):
    """The table has every fitting strategy with VRAM, RAM, speed and quality, and a pick."""
    code = main(["plan", str(sdxl_dir), "--vram", "12MiB", "--ram", "8GiB", "--height", "64", "--width", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["pick"]
    names = {"+".join(r["plan"]) for r in out["strategies"]}
    assert any("model_offload" in n for n in names) and any("group_leaf" in n for n in names)
    assert any(r["quality"] == "lossy" for r in out["strategies"])
    assert all(r["fits"] for r in out["strategies"])
    assert all({"vram_gib", "ram_gib", "relative_speed", "quality"} <= set(r) for r in out["strategies"])
    assert not out["pick"][0].startswith(("nf4", "int8"))


def test_plan_has_one_row_per_strategy_fitting_or_not(sdxl_dir, capsys):
    """The guide's Step 3 table: every strategy, offloading, casting and quantization alike, with
    the fastest plan using it, whether it fits under the policy and why not; the pick is a row.
    The footprint figures of the guide's calculator come with it."""
    from autofit.planning.rungs import RUNGS

    main(["plan", str(sdxl_dir), "--vram", "12MiB", "--height", "64", "--width", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in out["by_strategy"]}
    # Batch splits and VAE slicing have nothing to split in a batch of one.
    assert set(rows) == {"device", *RUNGS} - {"split_batch", "split_batch_max", "vae_slicing"}
    for name, r in rows.items():
        assert name == "device" and r["plan"] == ["device"] or name in [n.split(":")[0] for n in r["plan"]]
        assert r["fits"] == (r["why_not"] is None)
    assert not rows["device"]["fits"] and "budget" in rows["device"]["why_not"]
    # Under the default policy (quality) lossy rungs are listed and say why they are not taken.
    assert all("policy" in rows[n]["why_not"] for n in ("fp8", "int8", "nf4"))
    assert out["pick"] in [r["plan"] for r in rows.values() if r["fits"]]
    assert min((r for r in rows.values() if r["fits"]), key=lambda r: r["seconds"])["plan"] == out["pick"]
    assert {"S_total_gib", "S_max_gib", "S_block_gib", "S_leaf_gib", "S_total_lc_gib", "S_max_lc_gib"} <= set(out)
    assert out["S_total_lc_gib"] <= out["S_total_gib"] and out["S_leaf_gib"] <= out["S_block_gib"] <= out["S_max_gib"]


def test_plan_shows_quantization_beside_offloading(sdxl_dir, capsys):
    """nf4 and int8 plans are ranked with the others (measured sizes: the UNet's Linear weights
    at ~0.56 / 1 byte a weight), lossy, and smaller on the device than the full-precision plan."""
    main(["plan", str(sdxl_dir), "--vram", "1GiB", "--height", "64", "--width", "64", "--json", "--all"])
    out = json.loads(capsys.readouterr().out)
    quant = {tuple(r["plan"]): r for r in out["strategies"] if r["plan"][0] in ("nf4", "int8")}
    assert ("nf4",) in quant and ("int8",) in quant and ("int8", "model_offload") in quant
    assert all(r["quality"] == "lossy" for r in quant.values())
    device = next(r for r in out["strategies"] if r["plan"] == ["device"])
    # (GiB rounded to 0.01 at tiny size: exact sizes are checked in test_quantization.py)
    assert quant[("nf4",)]["vram_gib"] <= quant[("int8",)]["vram_gib"] <= device["vram_gib"]
    # Quantized weights are not split into offload groups: they stay on the device, so the
    # denoise peak of nf4 + group offload is the quantized UNet's, above plain group offload.
    grouped = next(r for r in out["strategies"] if r["plan"] == ["group_leaf_stream"])
    nf4_grouped = quant[("nf4", "group_leaf_stream")]
    assert nf4_grouped["peaks_gib"]["denoise"] >= grouped["peaks_gib"]["denoise"]


def test_plan_text_marks_the_pick(sdxl_dir, capsys):
    """The human table marks the chosen row and says what autofit would pick."""
    assert main(["plan", str(sdxl_dir), "--vram", "1GiB", "--height", "64", "--width", "64"]) == 0
    text = capsys.readouterr().out
    assert "autofit would pick: device" in text


def test_plan_on_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    """A folder without model_index.json gets exit code 2 and a message saying what to pass."""
    assert main(["plan", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_plan_rejects_a_bad_size(sdxl_dir, capsys):
    """--vram must be a size."""
    with pytest.raises(SystemExit):
        main(["plan", str(sdxl_dir), "--vram", "lots"])
    assert "not a size" in capsys.readouterr().err


def test_doctor_reports_versions_device_and_missing(capsys):
    """doctor lists library versions, the device and memory, and what strategies lack."""
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    assert report["device"]["host_total_bytes"] > 0
    assert "missing" in report


def test_main_in_process_leaves_the_autofit_logger_as_it_found_it(capsys):
    """The CLI sends logs to stderr while it runs; a program (or test) calling main() keeps its own
    logging configuration afterwards."""
    log = logging.getLogger("autofit")
    handlers, level = list(log.handlers), log.level
    assert main(["doctor", "--json"]) == 0
    assert main(["plan", "/nonexistent/folder"]) == 2
    assert log.handlers == handlers and log.level == level


def test_run_writes_image_and_plan(sdxl_dir, tmp_path):
    """run generates with recovery and writes the plan beside the image."""
    out = tmp_path / "img.png"
    code = main(["run", str(sdxl_dir), "--prompt", "a photo of a cat", "--out", str(out), "--steps", "2",
                 "--height", "64", "--width", "64", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    assert code == 0 and out.is_file()
    record = json.loads(out.with_suffix(".plan.json").read_text())
    assert record["plan"] == [] and record["seed"] == 0


class _Opaque:
    """Any object a weights_only load refuses."""


def test_legacy_and_unreadable_pickled_checkpoints(sdxl_dir, tmp_path):
    """A .bin in the legacy (pre-zip) format is read without a memory map; one that is not a
    plain state dict leaves its component out with a warning that says what to do."""
    import shutil

    import torch

    root = tmp_path / "pipe"
    shutil.copytree(sdxl_dir, root)
    unet = root / "unet"
    from safetensors.torch import load_file

    (st,) = unet.glob("*.safetensors")
    state = load_file(st)
    st.unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    _, fp = measure_folder(root)
    _, ref = measure_folder(sdxl_dir)
    assert fp.components["unet"].bytes == ref.components["unet"].bytes
    torch.save({"step": _Opaque()}, unet / "diffusion_pytorch_model.bin")  # weights_only refuses it
    with pytest.warns(UserWarning, match="safe_serialization"):
        _, fp = measure_folder(root)
    assert "unet" not in fp.components and "vae" in fp.components
