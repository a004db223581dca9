"""The benchmarks' CPU smoke paths (tiny pipelines): each script runs end to end and writes the
fields the GPU runs report. No figures are claimed from these runs."""

import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import structlog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch, capsys):
    return lambda script, *args: _run(script, *args, tmp_path=tmp_path, monkeypatch=monkeypatch, capsys=capsys)


def _run(script, *args, tmp_path, monkeypatch, capsys):
    """Runs a benchmark script as ``__main__`` in this process (a subprocess would pay ~4 s of
    imports per script on 2 cores), with its own argv, cache folder and working directory; the
    logging settings a script changes for itself are put back afterwards."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setenv("AUTOFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    diffusers_logger = logging.getLogger("diffusers")
    saved_config, saved_level = structlog.get_config(), diffusers_logger.level
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    finally:
        structlog.configure(**saved_config)
        diffusers_logger.setLevel(saved_level)
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_budget_sweep_tiny(bench, tmp_path):
    out = tmp_path / "sweep.json"
    bench("budget_sweep.py", "--tiny", "--device", "cpu", "--budgets", "4", "--steps", "2",
          "--strategies", ";vae_tiling", "--out", str(out))
    result = json.loads(out.read_text())
    assert [s["plan"] for s in result["strategies"]] == [[], ["vae_tiling"]]
    (row,) = result["budgets"]
    assert row["oracle"] in ([], ["vae_tiling"])
    assert row["first_s"] > 0 and row["steady_s"] > 0 and row["oracle_first_s"] > 0
    assert "first_ratio" not in row  # ratios are for the GPU only


def test_undo_copy_check_tiny(bench):
    pytest.importorskip("bitsandbytes")
    rows = bench("undo_copy_check.py", "--tiny")
    copy, checkpoint, summary = rows
    assert copy["mode"] == "copy in RAM" and copy["held_gib"] > 0
    assert checkpoint["held_gib"] == 0.0
    assert copy["restored_bit_for_bit"] and checkpoint["restored_bit_for_bit"]
    assert summary["level"] == "nf4"


def test_torchao_check_tiny(bench):
    """Runs with or without torchao installed (a missing library is an error row, not a crash);
    LLM.int8 rounds less than nf4 and fp8."""
    pytest.importorskip("bitsandbytes")
    rows = bench("torchao_check.py", "--tiny", "--device", "cpu", "--repeat", "1")
    by = {r["variant"]: r for r in rows if "variant" in r}
    assert list(by) == ["unquantized", "fp8 (layerwise casting)", "bnb nf4", "bnb int8", "torchao int8 weight-only"]
    assert "error" not in by["unquantized"] and "rel_error" not in by["unquantized"]
    assert by["bnb int8"]["rel_error"] < by["bnb nf4"]["rel_error"]
    assert by["bnb int8"]["rel_error"] < by["fp8 (layerwise casting)"]["rel_error"]
    assert by["bnb nf4"]["weight_gib"] <= by["unquantized"]["weight_gib"]


def test_pinned_check_tiny(bench, tmp_path):
    out = tmp_path / "pinned.json"
    bench("pinned_check.py", "--tiny", "--device", "cpu", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["predicted_pinned_gib"] >= result["weights_gib"] > 0
    assert "measured_pinned_gib" not in result  # no pinned allocator on the CPU


def test_residency_sweep_tiny(bench, tmp_path):
    """The partial residency sweep at tiny size: the device and leaf-streaming references, one
    budget row run partly resident whose image equals the everything-resident one."""
    out = tmp_path / "residency.json"
    bench("residency_sweep.py", "--tiny", "--device", "cpu", "--model", "flux", "--budgets", "4",
          "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"]["plan"] == ["device"] and result["device"]["steady_s"] > 0
    assert "error" not in result["leaf_stream"]
    (row,) = result["budgets"]
    assert row["plan"] == ["resident_stream:50"] and row["streamed_gib"] > 0
    assert row["max_abs_diff_vs_device"] == 0.0
    assert "steady_vs_device" not in row  # ratios are for the GPU only


def test_soak_both_ways_tiny(bench):
    """The plans-both-ways soak at smoke size: one-off OOMs, a plan that never fits, alternating
    stages; no call fails in any of them."""
    rows = bench("soak_both_ways.py", "--calls", "6", "--quiet", "6", "--p", "0.5")
    assert [r["run"] for r in rows] == ["one_off", "never_fits", "alternating"]
    assert all(r["failed_calls"] == 0 for r in rows)
    one_off, never, _ = rows
    assert one_off["ooms_injected"] >= 1
    assert never["probes"] >= 1 and never["failed_probes"] == never["probes"]


def test_quant_check_tiny(bench):
    """The storage-rung check runs end to end and undoes each rung exactly."""
    rows = bench("quant_check.py", "--tiny", "--device", "cpu", "--steps", "1", "--budgets", "4",
                 "--strategies", ";fp8")
    plans = [r for r in rows if "restored_exactly" in r]
    assert [r["plan"] for r in plans] == [[], ["fp8"]]
    assert all(r["restored_exactly"] for r in plans)
