"""The plan cache (atomic, shared between processes) and preflight planning."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog
import torch

from autofit import autofit
from autofit.facts.cache import PlanCache
from autofit.testing import inject_oom, tiny_sdxl

from helpers import run

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
from helpers import run
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


def test_a_stored_plan_that_no_longer_fits_is_planned_again(tmp_path):
    """The key holds the configured budget, not the memory this process has: a stored
    model-offload plan is checked against this process's machine. With 1 MiB of host RAM allowed
    (on the CPU that is the device's memory too) it is predicted not to fit, so the planner
    decides instead, and the refusal is logged with its reason."""
    first = autofit(tiny_sdxl(), cache=tmp_path)
    with inject_oom(first, stage="denoise", times=2):
        run(first, "sdxl")
    assert first.autofit.plan == ("model_offload",)
    # Peaks are measured on CUDA only: without them, a device-memory misfit is an estimate
    # against a plan that ran, and the plan is kept (16 MiB: the estimate is over, the host
    # RAM the plan needs is not).
    kept = autofit(tiny_sdxl(), cache=tmp_path, max_ram="16MiB")
    with structlog.testing.capture_logs() as logs:
        run(kept, "sdxl")
    assert not [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert kept.autofit.plan == ("model_offload",)
    # Any other reason still refuses it: here the offloaded weights do not fit in 8 MiB of RAM.
    short = autofit(tiny_sdxl(), cache=tmp_path, max_ram="8MiB")
    with structlog.testing.capture_logs() as logs:
        run(short, "sdxl")
    (refused,) = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert "host RAM" in refused["reason"]
    # Put the stored plan back for the next check (the short process stored its own).
    (path,) = (tmp_path / "plans").glob("*.json")
    record = json.loads(path.read_text())
    record["plan"] = ["model_offload"]
    path.write_text(json.dumps(record))
    # With measured activations (as a CUDA run stores them) the misfit is believed.
    record = json.loads(path.read_text())
    record["activations"] = {"encode": 0, "denoise": 0, "decode": 0}
    path.write_text(json.dumps(record))
    second = autofit(tiny_sdxl(), cache=tmp_path, max_ram="1MiB")
    with structlog.testing.capture_logs() as logs:
        run(second, "sdxl")
    refused = [e for e in logs if e["event"] == "autofit.cache_plan_refused"]
    assert len(refused) == 1 and "0.00 GiB budget" in refused[0]["reason"]
    assert second.autofit.plan != ("model_offload",) and second.autofit.history == ()


def test_guidance_is_part_of_the_key(tmp_path):
    """Classifier-free guidance doubles the denoiser's batch: runs with and without it are
    planned and stored apart."""
    proxy = autofit(tiny_sdxl(), cache=tmp_path)
    run(proxy, "sdxl", guidance_scale=5.0)
    run(proxy, "sdxl", guidance_scale=1.0)
    records = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert sorted(r["key"]["cfg"] for r in records) == [False, True]


def test_measured_activations_are_stored_without_the_plan_factor():
    """A decode peak measured under tiling is stored as the untiled activation (divided by the
    tiling factor), so predicting the tiled plan again gives the measured peak back, not a
    peak shrunk twice."""
    from autofit.facts.footprint import measure
    from autofit.planning.context import Machine, Workload, context
    from autofit.planning.cost import activation_factor, resident_bytes
    from autofit.engine.measurements import learned_activations
    from autofit.plan import Plan
    from autofit.planning.planner import predict

    footprint = measure(tiny_sdxl())
    plan = Plan(extras=frozenset({"vae_tiling"}))
    resident = resident_bytes(plan, "decode", footprint)
    measured_peak = resident + 300 * 2**20
    learned = learned_activations({"decode": measured_peak}, {}, plan, Workload(), footprint)
    factor = activation_factor(plan, "decode", Workload())
    assert 0 < factor < 1
    assert learned["decode"] == int(300 * 2**20 / factor)
    machine = Machine(8 * 2**30, 64 * 2**30)
    again = predict(plan, context(footprint, machine, Workload(height=1024, width=1024)), measured=learned)
    assert again.peaks["decode"] == pytest.approx(measured_peak, rel=0.001)


def test_updates_from_many_writers_are_merged_not_lost(tmp_path):
    """update() reads, changes and writes under the key's lock: 4 writers x 50 increments
    leave exactly 200."""
    cache = PlanCache(tmp_path)

    def writer():
        for _ in range(50):
            cache.update("k", lambda r: {"n": (r or {}).get("n", 0) + 1})

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.get("k")["n"] == 200


def test_a_success_keeps_what_another_process_found_broken(tmp_path):
    """Process B stores the plan that worked for it; the rung process A marked broken
    meanwhile stays marked, so the next process does not repeat A's failure."""
    proxy = autofit(tiny_sdxl(), cache=tmp_path)
    run(proxy, "sdxl")
    (path,) = (tmp_path / "plans").glob("*.json")
    record = json.loads(path.read_text())
    record["broken"] = {"fp8": ["unet"]}  # what another process learned
    record["activations"] = {"decode": 1}
    path.write_text(json.dumps(record))
    with inject_oom(proxy, stage="denoise", times=1):
        run(proxy, "sdxl")
    stored = json.loads(path.read_text())
    assert stored["broken"]["fp8"] == ["unet"]
    assert stored["plan"] == list(proxy.autofit.plan) and proxy.autofit.plan != ()


def test_update_still_writes_where_the_filesystem_has_no_flock(tmp_path, monkeypatch):
    """Lustre mounted noflock (and some NFS/FUSE setups) refuse flock: the record is written
    anyway, last writer wins, instead of the cache silently learning nothing."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    cache = PlanCache(tmp_path)
    cache.update("k", lambda r: {"plan": ["model_offload"]})
    assert cache.get("k")["plan"] == ["model_offload"]


def test_tiling_picked_from_estimates_alone_is_deferred():
    """With no decode activation measured, the planner's VAE tiling (it changes the image) is not
    applied up front: the plan starts as the planner's pick less the tiling, and says so."""
    from autofit.planning.planner import choose as planner_choose
    from helpers import rung_context

    proxy = autofit(tiny_sdxl(), max_vram="9MiB", cache=False)
    with structlog.testing.capture_logs() as logs:
        run(proxy, "sdxl", num_inference_steps=1)
    ctx = rung_context(proxy)
    from dataclasses import replace
    from autofit.planning.context import Workload
    wl = Workload(height=64, width=64, steps=1)
    planned = planner_choose(replace(ctx, workload=wl)).plan  # the planner's own pick, independently
    assert planned.tiling is not None  # the estimate alone asks for tiling here
    (deferred,) = [e for e in logs if e["event"] == "autofit.tiling_deferred"]
    assert deferred["action"] in ("vae_tiling", "vae_tiling_small")
    assert proxy.autofit.plan == planned.without(deferred["action"]).names
    assert not {"vae_tiling", "vae_tiling_small"} & set(proxy.autofit.plan)
