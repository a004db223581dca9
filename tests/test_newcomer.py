"""What a newcomer meets (issue 25): one error boundary in the CLI (one line, a documented exit
code, --debug for the traceback, a closed pipe ends quietly), --json that is one JSON document,
plan= as a string, doctor's own version, batch resume without loading the model, the plan
command's defaults, and log lines that do not break a progress bar."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import autofit.cli as cli_pkg
from autofit.cli import loading, terminal
from autofit.cli import main
from autofit.testing import tiny_sdxl


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


def _run(capsys, argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lines(err):
    # diffusers' loading bar (while a folder is read) is not an error line
    return [line for line in err.strip().splitlines() if "it/s]" not in line and "s/it]" not in line]


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(sdxl_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """A non-OOM error inside `autofit run` (here from the load) is one line that says to rerun
    with --debug, exit 1; with --debug, the traceback."""
    def broken(args):
        raise RuntimeError("expected scalar type Half but found Float\nand more detail")

    monkeypatch.setattr(loading, "load_pipeline", broken)
    argv = ["run", sdxl_dir, "--prompt", "x", "--out", tmp_path / "o.png"]
    code, out, err = _run(capsys, argv)
    assert code == 1 and out == ""
    assert len(_lines(err)) == 1 and "Traceback" not in err, err
    assert "RuntimeError: expected scalar type Half but found Float" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="expected scalar"):
        main([str(a) for a in [*argv, "--debug"]])
    with pytest.raises(RuntimeError, match="expected scalar"):  # before the command too
        main([str(a) for a in ["--debug", *argv]])


def test_a_closed_stdout_ends_quietly_and_quiet_silences_dependencies(sdxl_dir):
    """`autofit plan ... | head`: the reader goes away; no BrokenPipe traceback, exit 141. With
    --quiet nothing else reaches stderr (no dependency warnings or bars)."""
    proc = subprocess.Popen([sys.executable, "-m", "autofit.cli", "plan", str(sdxl_dir), "--vram", "1GiB", "--all",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err


# What dependencies print on a load that a user of the command cannot act on: transformers'
# torchvision fallbacks, bitsandbytes' kernel notices, diffusers' and transformers' loading bars.
_NOISE = ("torchvision", "gemm_4bit", "Loading pipeline components", "Loading weights", "Loading checkpoint")


def test_every_command_silences_dependency_notices_and_debug_shows_them(sdxl_dir, tmp_path):
    """`autofit run` (a real load and call, in a subprocess) without --quiet: stderr holds
    autofit's own log lines and the denoising bar, none of the dependencies' notices or loading
    bars; with --debug they show (so this environment does print them: the check can fail)."""
    env = {"PYTHONPATH": str(Path(cli_pkg.__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "autofit.cli", "run", str(sdxl_dir), "--prompt", "a cat", "--steps", "1",
            "--height", "64", "--width", "64", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    plain = subprocess.run([*argv, "--out", str(tmp_path / "a.png")], capture_output=True, text=True, env=env,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert not [line for line in plain.stderr.splitlines() if any(n in line for n in _NOISE)], plain.stderr
    assert "autofit.wrapped" in plain.stderr  # autofit's own INFO lines still show
    debug = subprocess.run([*argv, "--out", str(tmp_path / "b.png"), "--debug"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert debug.returncode == 0 and "Loading pipeline components" in debug.stderr, debug.stderr


def test_json_everywhere_is_one_document(sdxl_dir, tmp_path, capsys):
    """--json prints exactly one JSON document on stdout: run (it printed a sentence before),
    plan, doctor, cache list and clear, batch."""
    cache = tmp_path / "c"
    code, out, _ = _run(capsys, ["run", sdxl_dir, "--prompt", "a cat", "--out", tmp_path / "i.png", "--steps", "1",
                                 "--height", "64", "--width", "64", "--device", "cpu", "--cache-dir", cache, "--json",
                                 "-q"])
    record = json.loads(out)
    assert code == 0 and record["image"] == str(tmp_path / "i.png") and record["plan"] == []
    assert record["plan_file"].endswith("i.plan.json") and record["seed"] == 0
    for argv in (["plan", sdxl_dir, "--vram", "1GiB", "--height", "64", "--width", "64", "--json"],
                 ["doctor", "--json"], ["cache", "list", "--cache-dir", cache, "--json"],
                 ["cache", "clear", "--cache-dir", tmp_path / "empty", "--json"]):
        code, out, _ = _run(capsys, argv)
        assert code == 0 and isinstance(json.loads(out), dict), argv


def test_batch_resume_reads_the_manifest_before_loading_the_model(sdxl_dir, tmp_path, capsys, monkeypatch):
    """A finished batch, run again, finds nothing to do without loading the model; a batch --out
    that is an existing file is one line, exit 2."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    argv = ["batch", sdxl_dir, "--prompts", prompts, "--out", tmp_path / "o", "--steps", "1", "--height", "64",
            "--width", "64", "--device", "cpu", "--cache-dir", tmp_path / "c", "--json", "-q"]
    code, out, err = _run(capsys, argv)
    assert code == 0 and json.loads(out)["done"] == 1, err

    def no_load(args):
        raise AssertionError("the model was loaded for a finished batch")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    code, out, err = _run(capsys, argv)
    assert code == 0 and json.loads(out) == {"done": 0, "skipped": 1, "failed": {}, "seconds": 0.0,
                                             "out": str(tmp_path / "o")}, err
    (tmp_path / "afile").write_text("x")
    code, out, err = _run(capsys, [*argv[:4], "--out", tmp_path / "afile"])
    assert code == 2 and len(_lines(err)) == 1 and "is a file" in err and "Traceback" not in err


def test_plan_defaults_frames_devices_and_speed(sdxl_dir, capsys):
    """--frames is refused for an image pipeline; size defaults to the pipeline's own; --device
    mps with --vram plans for MPS (no bitsandbytes backend), not CUDA; speeds compare with the
    fastest plan the policy allows (the pick is 1.0)."""
    code, _, err = _run(capsys, ["plan", sdxl_dir, "--frames", "16"])
    assert code == 2 and "makes images, not videos" in err and len(_lines(err)) == 1
    code, out, _ = _run(capsys, ["plan", sdxl_dir, "--vram", "8GiB", "--device", "mps", "--policy", "speed", "--json"])
    report = json.loads(out)
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    vae = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert report["workload"]["height"] == report["workload"]["width"] == side != 1024
    nf4 = next(r for r in report["by_strategy"] if r["strategy"] == "nf4")
    assert "mps" in (nf4["why_not"] or "")
    code, out, _ = _run(capsys, ["plan", sdxl_dir, "--vram", "12MiB", "--json"])
    report = json.loads(out)
    pick = next(r for r in report["by_strategy"] if r["plan"] == report["pick"])
    assert pick["relative_speed"] == 1.0


def test_plan_all_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "list every combination" in " ".join(capsys.readouterr().out.split())


def test_doctor_reads_this_distributions_version(capsys):
    """doctor looks up autofit-diffusers (the PyPI `autofit` is another project), never `autofit -`."""
    from autofit import __version__

    code, out, _ = _run(capsys, ["doctor"])
    assert code == 0 and "autofit -" not in out
    assert f"autofit-diffusers {__version__}" in " ".join(out.split())
    code, out, _ = _run(capsys, ["doctor", "--json"])
    assert json.loads(out)["versions"]["autofit-diffusers"] == __version__


def test_plan_argument_takes_a_string_and_lists_every_name():
    """plan="vae_tiling" is one strategy (not split into characters); a wrong name lists the
    placements, resident_stream:N and the add-ons."""
    from autofit import AutoFitUsageError, autofit
    from autofit.planning.rungs import RUNGS
    from autofit.proxy import Options

    pipe = tiny_sdxl()

    def start(plan):  # the plan the first call starts from
        return Options.parse(pipe, plan=plan, cache=False, device="cpu").start.names

    assert start("vae_tiling") == start(["vae_tiling"]) == ("vae_tiling",)
    assert set(start("offload_encoders+vae_tiling")) == {"offload_encoders", "vae_tiling"}
    assert start("resident_stream:75") == ("resident_stream:75",)
    with pytest.raises(AutoFitUsageError) as info:
        autofit(pipe, plan="model_ofload", cache=False, device="cpu")
    message = str(info.value)
    assert "did you mean 'model_offload'" in message and "resident_stream:N" in message
    assert all(name in message for name in RUNGS)
    with pytest.raises(AutoFitUsageError, match="resident_stream:N"):
        autofit(pipe, plan=42, cache=False, device="cpu")


def test_log_lines_do_not_break_the_progress_bar(capsys):
    """While a tqdm bar is on stderr, a log line is written through tqdm.write: it starts a line
    of its own instead of landing after the bar's text."""
    from tqdm import tqdm

    with terminal.logs_to_stderr():
        bar = tqdm(total=3, desc="autofit batch[0]", file=sys.stderr)
        bar.update(1)
        logging.getLogger("autofit").warning("escalate stage=denoise")
        bar.close()
    err = capsys.readouterr().err
    line = next(chunk for chunk in err.split("\n") if "escalate stage=denoise" in chunk)
    assert "autofit batch[0]" not in line.rsplit("\r", 1)[-1] and "WARNING" in line.rsplit("\r", 1)[-1]
    assert line.rsplit("\r", 1)[-1].split()[1] == "WARNING", repr(line)
