"""`proxy.autofit.summary()`, its repr and HTML, and `autofit cache list`'s columns."""

import json

import torch

from autofit import autofit
from autofit.cli import main
from autofit.testing import inject_oom, tiny_sdxl

CALL = dict(num_inference_steps=1, height=16, width=16, output_type="pt")


def _call(proxy):
    return proxy("x", generator=torch.Generator().manual_seed(0), **CALL)


def test_summary_names_what_autofit_did(tmp_path):
    """One denoise OOM: the summary's row holds the record's stage, component, action, scope,
    OOM kind and plan after; the repr counts the call, the recovery and the OOM."""
    proxy = autofit(tiny_sdxl(), cache=tmp_path / "c")
    assert "no escalations" in proxy.autofit.summary() and "0 OOM(s)" in repr(proxy.autofit)
    with inject_oom(proxy, stage="denoise") as fault:
        _call(proxy)
    assert fault.fired == 1
    history = proxy.autofit.history
    oom = [r for r in history if r.oom_kind in ("device", "host")]
    assert len(oom) == 1 and oom[0].stage == "denoise"
    text = proxy.autofit.summary()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = [line.split() for line in lines[header + 1:header + 1 + len(history)]]
    for i, (row, record) in enumerate(zip(rows, history), 1):
        assert row[:7] == [str(i), record.stage, record.component or "-", record.action, record.scope,
                           record.oom_kind, record.cause or "-"]
        assert row[7] == ("+".join(record.plan) or "device")
    assert ("+".join(proxy.autofit.plan) or "device") in lines[0]
    last = proxy.autofit.last_call
    assert f"{last['seconds_lost']:.3f} s lost" in text and f"{last['attempts']} failed attempt(s)" in text
    assert "stage peaks:" in text
    shown = repr(proxy.autofit)
    assert str(proxy.autofit.plan) in shown and "1 call(s), 1 recovered, 1 OOM(s)" in shown
    assert str(proxy.autofit) == shown
    html = proxy.autofit._repr_html_()
    assert html.count("<tr>") == 1 + len(history)
    assert f"<td>{oom[0].action}</td>" in html and f"<td>{oom[0].component}</td>" in html


def test_cache_list_shows_model_size_budget_and_age(tmp_path, capsys):
    """The rows name the pipeline class, the call's size, batch, budget, policy, plan and age;
    --json carries the same fields."""
    cache_dir = tmp_path / "c"
    proxy = autofit(tiny_sdxl(), cache=cache_dir)
    with inject_oom(proxy, stage="denoise"):
        _call(proxy)
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache_dir), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["records"]
    assert row["model"] == row["pipeline"] == "StableDiffusionXLPipeline"
    assert row["size"] == [16, 16] and row["batch"] == 1 and row["policy"] == proxy.autofit.policy
    assert row["budget_gib"] is not None and 0 <= row["age_s"] < 600
    assert main(["cache", "list", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["MODEL", "SIZE", "BATCH"]
    cells = out[2].split()
    assert cells[0] == "StableDiffusionXLPipeline" and cells[1] == "16x16" and cells[2] == "1"
    assert " s ago" in out[2] or " min ago" in out[2]
    assert cells[-1] == row["key"] and ("+".join(row["plan"]) or "device") in cells
