"""The plan cache (atomic, shared between processes) and preflight planning."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog
import torch

from autofit import autofit
from autofit.cache import PlanCache
from autofit.testing import inject_oom, tiny_sdxl

from conftest import run

REPO = Path(__file__).resolve().parents[1]


def test_put_get_roundtrip(tmp_path):
    """A stored record comes back whole, with the schema stamped."""
    cache = PlanCache(tmp_path)
    cache.put("k", {"plan": ["model_offload"], "activations": {"decode": 5}})
    rec = cache.get("k")
    assert rec["plan"] == ["model_offload"] and rec["schema"] == 1
    assert cache.get("missing") is None


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    """Many writers on one key: every read parses, and no temporary file is left behind."""
    cache = PlanCache(tmp_path)
    errors = []

    def writer(i):
        for j in range(40):
            cache.put("shared", {"plan": ["x"] * (i + 1), "n": j, "pad": "y" * 5000 * (i + 1)})

    def reader():
        for _ in range(200):
            rec = cache.get("shared")
            if rec is not None and len(rec["plan"]) not in range(1, 5):
                errors.append(rec)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((tmp_path / "plans" / "shared.json").read_text())["plan"]
    assert [p.name for p in (tmp_path / "plans").iterdir()] == ["shared.json"]


def test_a_second_process_starts_from_the_stored_plan(tmp_path):
    """What worked in one process is where the next process with the same key starts: no OOM."""
    proxy = autofit(tiny_sdxl(), cache=tmp_path)
    with inject_oom(proxy, stage="denoise", times=2):
        run(proxy, "sdxl")
    assert proxy.autofit.plan == ("model_offload",)
    script = f"""
import json, torch, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from autofit import autofit
from autofit.testing import tiny_sdxl
from conftest import run
proxy = autofit(tiny_sdxl(), cache={str(tmp_path)!r})
run(proxy, "sdxl")
print(json.dumps({{"plan": proxy.autofit.plan, "history": len(proxy.autofit.history)}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"plan": ["model_offload"], "history": 0}


def test_preflight_starts_at_a_plan_that_fits_without_an_oom(tmp_path):
    """Under a small max_vram the first call starts at the planner's pick, logged with predictions."""
    proxy = autofit(tiny_sdxl(), max_vram="9MiB", cache=False)
    with structlog.testing.capture_logs() as logs:
        image = run(proxy, "sdxl")
    assert proxy.autofit.plan != ()
    assert proxy.autofit.history == ()
    pre = [e for e in logs if e["event"] == "autofit.preflight"]
    assert len(pre) == 1 and pre[0]["source"] == "planner"
    assert pre[0]["predicted_vram_gib"] <= 9 / 1024
    assert torch.isfinite(image).all()


def test_a_grown_budget_tries_the_lighter_plan_again(tmp_path):
    """A bigger budget is a different key: the planner picks the lighter plan again."""
    small = autofit(tiny_sdxl(), max_vram="9MiB", cache=tmp_path)
    run(small, "sdxl")
    big = autofit(tiny_sdxl(), max_vram="8GiB", cache=tmp_path)
    run(big, "sdxl")
    assert small.autofit.plan != () and big.autofit.plan == ()
    assert len(list((tmp_path / "plans").glob("*.json"))) == 2


def test_explicit_plan_turns_preflight_off():
    """plan= is honoured as given, whatever the planner would pick."""
    proxy = autofit(tiny_sdxl(), plan=("vae_tiling",), max_vram="9MiB", cache=False)
    run(proxy, "sdxl")
    assert proxy.autofit.plan == ("vae_tiling",)
