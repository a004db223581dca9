"""Streaming from disk (the ``group_disk`` placement): block-level group offload whose offloaded
blocks live in files, for when host RAM is short as well as device memory."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from autofit import autofit
from autofit import disk
from autofit.plan import Plan
from autofit.testing import inject_oom, tiny_flux, tiny_sdxl

from helpers import BUILDERS, DENOISER, dials, run, switch_plan, wrap

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
    from autofit.planning.context import Machine, context
    from autofit.planning.rungs import refusal
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
    proxy = wrap(pipe, plan=("model_offload",), cache=False, max_ram=weights // 2)
    with inject_oom(proxy, stage="denoise", at=2):
        run(proxy, "flux", **STEPS)
    assert proxy.autofit.plan == ("group_disk",)
    for _ in range(12):  # three times the first wait before a probe
        run(proxy, "flux", **STEPS)
    assert proxy.autofit.plan == ("group_disk",)
    assert not [r for r in proxy.autofit.history if r.action == "probe"]
    dials(proxy).ram_cap = None  # the host RAM came back
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


# ---- issue 27: never remove what autofit did not make; survive removed files; identical outputs ----
def _killed_owner_folder(root):
    """A placement folder whose process was killed (kill -9) while it held the folder's lock."""
    child = subprocess.Popen(
        [sys.executable, "-c", "from autofit import disk; f = disk.new_folder(); (f / 'unet').mkdir(); "
                               "print(f.name, flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, AUTOFIT_OFFLOAD_DIR=str(root)))
    try:
        name = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return name


def test_the_sweep_removes_only_folders_autofit_made_and_never_follows_a_link(tmp_path, monkeypatch):
    """The offload root shared with the user's own data: a project with an unheld ``.lock``
    (even one holding a copy of what autofit writes in its folders), folders named like
    autofit's without its marker or with another text in it, a link named like autofit's to a
    folder that looks exactly like one of autofit's, a file named like one: all survive the sweep,
    byte for byte. The folder of a killed autofit process is still removed."""
    root = tmp_path / "offload"
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(root))
    stale = _killed_owner_folder(root)
    # What autofit writes in a folder of its own besides the lock (its marker), copied.
    ours = {p.name: p.read_bytes() for p in (root / stale).iterdir() if p.is_file() and p.name != ".lock"}

    def user_folder(path, extra):
        path.mkdir(parents=True)
        (path / ".lock").write_text("")  # a lock file nobody holds
        (path / "thesis.txt").write_text("four years of work")
        for name, data in extra.items():
            (path / name).write_bytes(data)
        return path

    user_folder(root / "my_project", ours)
    user_folder(root / "4242-0123456789ab", {})  # autofit's naming, no marker
    user_folder(root / "4243-0123456789ab", {name: b"something else\n" for name in ours})  # another text
    target = user_folder(tmp_path / "elsewhere" / "4244-0123456789ab", ours)  # looks like one of autofit's
    (root / "4244-0123456789ab").symlink_to(target, target_is_directory=True)
    (root / "4245-0123456789ab").write_text("a file named like a folder of autofit's")
    users = [p for p in [*root.rglob("*"), *target.rglob("*")] if stale not in p.parts]
    before = {p: p.read_bytes() for p in users if p.is_file()}
    assert stale in _runs(root) and len(before) >= 9

    mine = disk.new_folder()
    assert stale not in _runs(root)  # the killed process's folder: autofit's marker, its lock free
    assert sorted(p for p in users if p.exists() or p.is_symlink()) == sorted(users)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (root / "4244-0123456789ab").is_symlink()
    assert set(_runs(root)) == {"my_project", "4242-0123456789ab", "4243-0123456789ab", "4244-0123456789ab",
                                "4245-0123456789ab", mine.name}
    disk.remove([mine / "unet"])
    assert mine.name not in _runs(root)


@pytest.mark.parametrize("when", ["during the call", "between calls"])
def test_offload_files_removed_by_a_cleaner_cost_nothing(kind, when, tmp_path, monkeypatch):
    """A tmp cleaner or scratch purge removes the placement's folder, files and all, from inside a
    step of a call (diffusers' ``callback_on_step_end``) or between calls: that call and every
    later one run on and give the plain pipeline's image, and switching away reads every weight
    back bit for bit. autofit keeps each file it offloaded open while the placement lasts and
    reads through that descriptor; before, every call failed with FileNotFoundError."""
    root = tmp_path / "offload"
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(root))
    reference = run(BUILDERS[kind](), kind, **STEPS)
    pipe = BUILDERS[kind]()
    before = _state(pipe)
    proxy = autofit(pipe, plan=("group_disk",), cache=False)
    purged = []

    def purge(*_):
        if not purged:
            shutil.rmtree(root)
            purged.append(True)

    def cleaner(_pipe, step, timestep, callback_kwargs):
        purge()
        return callback_kwargs

    if when == "during the call":
        image = run(proxy, kind, callback_on_step_end=cleaner, **STEPS)
    else:
        image = run(proxy, kind, **STEPS)
        purge()
    assert purged and not root.exists()
    assert torch.equal(image, reference)
    assert torch.equal(run(proxy, kind, **STEPS), reference)
    assert proxy.autofit.plan == ("group_disk",)
    switch_plan(proxy, Plan())
    after = _state(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(run(proxy, kind, **STEPS), reference)


def test_weights_read_back_from_disk_are_aligned_as_torch_allocates(kind, tmp_path, monkeypatch):
    """Every weight a layer of the denoiser computes with, read back from its file during a call,
    starts on a 64-byte boundary (as torch allocates every tensor): the same kernels run as with
    the weights in memory, so the image is identical. safetensors' own reads return views at the
    file's offsets (4, 16, 56 bytes past a boundary), and on an AVX2/AVX-512 CPU the image
    differed from the plain pipeline's by ~1e-6."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    pipe = BUILDERS[kind]()
    proxy = autofit(pipe, plan=("group_disk",), cache=False)
    seen = []

    def look(module, args):
        seen.extend(p.data_ptr() % 64 for p in module.parameters(recurse=False) if p.numel())

    denoiser = getattr(pipe, DENOISER[kind])
    handles = [m.register_forward_pre_hook(look) for m in denoiser.modules() if next(m.parameters(recurse=False), None) is not None]
    try:
        run(proxy, kind, **STEPS)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) > 20 and set(seen) == {0}, sorted(set(seen))


def test_an_offload_file_cut_short_fails_the_call_naming_it(tmp_path, monkeypatch):
    """A file damaged in place (cut short) cannot be read back, and autofit keeps no second copy:
    the call fails with OffloadUnreadable (an OSError) naming the file, and never computes with
    diffusers' placeholders."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    proxy = autofit(tiny_sdxl(), plan=("group_disk",), cache=False)
    run(proxy, "sdxl", **STEPS)
    (folder,) = [tmp_path / "offload" / r for r in _runs(tmp_path / "offload")]
    files = sorted((folder / "unet").glob("*.safetensors"))
    for f in files:
        os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(disk.OffloadUnreadable, match="cut short") as failure:
        run(proxy, "sdxl", **STEPS)
    assert isinstance(failure.value, OSError) and any(str(f) in str(failure.value) for f in files)


def _skewed(t, past):
    """``t``'s values in a tensor starting ``past`` bytes after a 64-byte boundary."""
    n = t.numel() * t.element_size()
    out = torch.empty(n + past, dtype=torch.uint8)[past:].view(t.dtype).view(t.shape)
    return out.copy_(t)


def test_weights_mapped_off_a_boundary_come_back_where_they_were(kind, tmp_path, monkeypatch):
    """On the CPU a pipeline loaded with from_pretrained computes with weights mapped from its
    checkpoint, at the file's offsets (4 to 52 bytes past a boundary for the saved tiny SDXL's
    VAE), and a weight 4 bytes past one runs other kernels than an aligned one: the image differs
    by ~7e-7. Read back from disk where each weight sat before, during the calls and after a
    switch away, the image is the plain pipeline's, bit for bit."""
    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    pipe = BUILDERS[kind]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                p.data = _skewed(p.data, 4)
    reference = run(pipe, kind, **STEPS)
    proxy = autofit(pipe, plan=("group_disk",), cache=False)
    assert torch.equal(run(proxy, kind, **STEPS), reference)
    switch_plan(proxy, Plan())
    assert {p.data_ptr() % 64 for p in getattr(pipe, DENOISER[kind]).parameters()} == {4}
    assert torch.equal(run(proxy, kind, **STEPS), reference)


@pytest.fixture(params=["read-only mount", "a file where the folder goes"])
def unwritable_root(request, tmp_path):
    """An offload root nothing can be written in, made the real way."""
    root = tmp_path / "offload"
    how = request.param
    if how == "read-only mount":
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a read-only tmpfs needs root and mount(8)")
        root.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=256m", "tmpfs", str(root)], capture_output=True)
        if done.returncode:
            pytest.skip(f"mount -t tmpfs -o ro failed here: {done.stderr.decode().strip()}")
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root)], check=True)
    else:  # a file where the folder goes
        root.write_text("not a folder")
        yield root


def test_an_unwritable_offload_folder_passes_group_disk_over_with_a_reason(unwritable_root, monkeypatch):
    """Host RAM short, the offload folder unwritable: a denoise OOM passes group_disk over with
    why (in the history), and recovery goes on with the next rung that fits (fp8, under policy
    'balanced'); the user sees no OSError. Before, every OOM turned into the OSError of the
    folder's making."""
    from autofit.planning.cost import HOST_SHARE, host_bytes

    monkeypatch.setenv(disk.OFFLOAD_ENV, str(unwritable_root))
    probe = autofit(tiny_flux(), cache=False)
    fp = probe.autofit.footprint
    del probe
    # Room for fp8's host RAM, not for the RAM-backed group offloads'.
    ram = (host_bytes(Plan("model_offload", frozenset({"fp8"})), fp) + host_bytes(Plan("group_block"), fp)) // 2
    proxy = autofit(tiny_flux(), plan=("model_offload",), cache=False, max_ram=int(ram / HOST_SHARE),
                    policy="balanced")
    with inject_oom(proxy, stage="denoise", at=2) as fault:
        run(proxy, "flux", **STEPS)
    assert fault.fired == 1
    record = proxy.autofit.history[-1]
    skipped = dict(record.skipped)
    assert "cannot be" in skipped["group_disk"] and str(unwritable_root) in skipped["group_disk"]
    assert "host RAM" in skipped["group_block"]
    assert record.action == "fp8" and proxy.autofit.plan == ("fp8", "model_offload")
    assert not os.path.isdir(unwritable_root) or os.listdir(unwritable_root) == []


def test_an_unwritable_offload_folder_is_a_refusal_in_the_rung_table(unwritable_root, monkeypatch, tmp_path):
    """The probe (a file written and removed) says why; the rung table refuses with that; a
    writable root, existing or not yet made, passes and is left as it was."""
    from autofit.planning.context import Machine, context
    from autofit.planning.rungs import refusal
    from footprints import SDXL

    monkeypatch.setenv(disk.OFFLOAD_ENV, str(unwritable_root))
    why = disk.unusable()
    assert why and str(unwritable_root) in why
    ctx = context(SDXL, Machine(0, 10**12, disk_available_bytes=10**15, disk_unusable=why))
    assert refusal("group_disk", Plan("group_disk"), ctx) == why
    for writable in (tmp_path / "fine", tmp_path / "not" / "made" / "yet"):
        if writable.name == "fine":
            writable.mkdir()
        assert disk.unusable(writable) is None
    assert os.listdir(tmp_path / "fine") == [] and not (tmp_path / "not" / "made").exists()
