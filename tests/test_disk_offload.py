"""Streaming from disk (the ``group_disk`` placement): block-level group offload whose offloaded
blocks live in files, for when host RAM is short as well as device memory."""

import os
import signal
import subprocess
import sys

import torch

from autofit import autofit, disk
from autofit.plan import Plan
from autofit.testing import inject_oom, switch_plan, tiny_flux, tiny_sdxl

from helpers import BUILDERS, DENOISER, run

STEPS = dict(num_inference_steps=2)


def _state(pipe):
    return {(n, k): v.clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def _runs(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_group_disk_runs_from_files_and_gives_every_weight_back(kind, tmp_path, monkeypatch):
    """The image equals the raw pipeline's; the offloaded components sit in files (one folder
    each, the VAE stays on the device); switching away reads every weight back bit for bit and
    removes the folder. Without the read-back the weights would be diffusers' placeholders."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    reference = run(BUILDERS[kind](), kind, **STEPS)
    pipe = BUILDERS[kind]()
    before = _state(pipe)
    proxy = autofit(pipe, plan=("group_disk",), cache=False)
    assert torch.equal(run(proxy, kind, **STEPS), reference)
    (folder,) = [tmp_path / "offload" / r for r in _runs(tmp_path / "offload")]
    written = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert DENOISER[kind] in written and "vae" not in written
    assert all(any(f.suffix == ".safetensors" for f in (folder / w).iterdir()) for w in written)
    switch_plan(proxy, Plan())
    after = _state(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert _runs(tmp_path / "offload") == []
    assert torch.equal(run(proxy, kind, **STEPS), reference)


def test_a_denoise_oom_with_host_ram_short_goes_to_disk(tmp_path, monkeypatch):
    """Under model offload with host RAM capped below what the RAM-backed group offloads hold, a
    denoise OOM is recovered in place on group_disk; the image is the raw pipeline's."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    reference = run(tiny_flux(), "flux", **STEPS)
    pipe = tiny_flux()
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values()
                  if isinstance(m, torch.nn.Module) for p in m.parameters())
    proxy = autofit(pipe, plan=("model_offload",), cache=False, max_ram=weights // 2)
    with inject_oom(proxy, stage="denoise", at=2) as fault:
        image = run(proxy, "flux", **STEPS)
    assert fault.fired == 1
    record = proxy.autofit.history[-1]
    assert (record.stage, record.action, record.scope) == ("denoise", "group_disk", "stage")
    skipped = dict(record.skipped)
    assert "host RAM" in skipped["group_block"] and "host RAM" in skipped["group_leaf"]
    assert torch.equal(image, reference)


def test_disk_offload_the_user_enabled_is_adopted_and_its_folder_kept(tmp_path):
    """The user's own disk offloading becomes the plan; a switch away reads the weights back and
    leaves the user's folder alone."""
    pipe = tiny_sdxl()
    before = _state(pipe)
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                              num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "mine"),
                              exclude_modules=["vae"])
    proxy = autofit(pipe, cache=False)
    assert proxy.autofit.plan == ("group_disk",)
    files = sorted(os.listdir(tmp_path / "mine"))
    switch_plan(proxy, Plan())
    after = _state(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(os.listdir(tmp_path / "mine")) == files and files


def test_a_killed_process_folder_is_removed_by_the_next_placement(tmp_path, monkeypatch):
    """A process killed while its weights are on disk leaves its folder; the next placement (here:
    another process's) removes it, and never a folder whose owner is alive."""
    root = tmp_path / "offload"
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(root))
    child = subprocess.Popen(
        [sys.executable, "-c", "from autofit import disk; f = disk.new_folder(); (f / 'unet').mkdir(); "
                               "print(f.name, flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        name = child.stdout.readline().strip()
        mine = disk.new_folder()  # the child is alive: its folder stays
        assert name in _runs(root) and mine.name in _runs(root)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    again = disk.new_folder()
    assert name not in _runs(root) and {mine.name, again.name} <= set(_runs(root))
    disk.remove([mine / "x", again / "x"])
    assert _runs(root) == []


def test_group_disk_is_refused_without_room_on_disk():
    """Less free disk than the weights it writes: the rung table says so."""
    from autofit.context import Machine, context
    from autofit.rungs import refusal
    from footprints import SDXL

    weights = sum(c.bytes for c in SDXL.components.values())
    ctx = context(SDXL, Machine(0, 10**12, disk_available_bytes=weights // 10))
    assert "free at the offload folder" in refusal("group_disk", Plan("group_disk"), ctx)
    ok = context(SDXL, Machine(0, 10**12, disk_available_bytes=10 * weights))
    assert refusal("group_disk", Plan("group_disk"), ok) is None


def test_no_probe_back_to_a_plan_the_host_ram_cannot_hold(tmp_path, monkeypatch):
    """After escalating to group_disk because host RAM is short, quiet calls do not probe back to
    model offload (it would read every weight back into RAM: on Linux the OOM killer, not an
    exception); with host RAM back, they do."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    pipe = tiny_flux()
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values()
                  if isinstance(m, torch.nn.Module) for p in m.parameters())
    proxy = autofit(pipe, plan=("model_offload",), cache=False, max_ram=weights // 2)
    with inject_oom(proxy, stage="denoise", at=2):
        run(proxy, "flux", **STEPS)
    assert proxy.autofit.plan == ("group_disk",)
    for _ in range(12):  # three times the first wait before a probe
        run(proxy, "flux", **STEPS)
    assert proxy.autofit.plan == ("group_disk",)
    assert not [r for r in proxy.autofit.history if r.action == "probe"]
    proxy._self_runtime.max_ram = None  # the host RAM came back
    for _ in range(5):
        run(proxy, "flux", **STEPS)
    assert [r.plan for r in proxy.autofit.history if r.action == "probe"] == [("model_offload",)]
    assert proxy.autofit.plan == ("model_offload",)


def test_a_pipeline_dropped_while_on_disk_takes_its_files_with_it(tmp_path, monkeypatch):
    """A server that wraps pipelines and drops them must not fill its disk: when the modules
    (and the hooks reading the files) are garbage collected, the placement's folder goes too."""
    import gc

    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    proxy = autofit(tiny_sdxl(), plan=("group_disk",), cache=False)
    run(proxy, "sdxl", **STEPS)
    assert len(_runs(tmp_path / "offload")) == 1
    del proxy
    gc.collect()
    assert _runs(tmp_path / "offload") == []
