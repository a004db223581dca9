"""Real CUDA out-of-memory errors from the caching allocator (skipped without CUDA)."""

import gc

import pytest
import torch

from autofit import autofit
from autofit.plan import Plan
from autofit.testing import tiny_sdxl

from helpers import measured_activations, run, switch_plan

pytestmark = pytest.mark.gpu


def _allocated() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("where", ["decode", "denoise"])
def test_real_cuda_oom_is_recovered_and_frees_the_failed_attempt(where):
    """A real allocator OOM inside a component: recovered, the failed attempt's 1 GiB freed before
    the retry, and memory after recovery equals a clean run of the same plan."""
    pipe = tiny_sdxl().to("cuda")
    proxy = autofit(pipe, device="cuda")
    target = pipe.vae.decoder.conv_in if where == "decode" else pipe.unet.conv_in
    seen: list[int] = []

    def hog(module, args):
        seen.append(torch.cuda.memory_allocated())
        if len(seen) == 1:
            ballast = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # held by this frame
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: a real CUDA OOM
            del ballast

    handle = target.register_forward_pre_hook(hog)
    image = run(proxy, "sdxl")
    handle.remove()
    assert proxy.autofit.history[0].stage == where
    assert seen[1] < seen[0] + (256 << 20), "the failed attempt's ballast was still allocated at retry"
    after_recovery = _allocated()
    clean = run(proxy, "sdxl")
    after_clean = _allocated()
    torch.testing.assert_close(image, clean)
    assert abs(after_recovery - after_clean) < (64 << 20)


def test_pinned_copies_are_credited_and_returned_after_a_switch():
    """Streamed group offload pins a copy of every tensor: held_on_host credits them to the
    pipeline (they are /dev mappings, not page cache), and switching to a plan that pins nothing
    returns them to the OS instead of leaving them in torch's pinned cache."""
    from autofit.facts.memory import held_on_host, pinned_in_use

    pipe = tiny_sdxl()
    proxy = autofit(pipe, device="cuda", plan=("group_leaf_stream",), cache=False)
    run(proxy, "sdxl")
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    held, pinned = held_on_host(modules)
    assert pinned > 0 and held >= pinned // 2
    switch_plan(proxy, Plan("model_offload"))
    assert pinned_in_use() < pinned // 4


def test_peaks_measured_before_an_escalation_are_kept_with_their_plan():
    """An OOM in decode after encode and denoise ran: the decode stage is retried under a new
    plan. The encode/denoise peaks were measured under the old plan and are stored as
    activations with that plan's resident weights; the failed decode attempt's peak is not."""
    import structlog

    from autofit.testing import inject_oom

    proxy = autofit(tiny_sdxl(), device="cuda", cache=False)  # preflight: the tiny pipeline fits
    with structlog.testing.capture_logs() as logs, inject_oom(proxy, stage="decode", times=1):
        run(proxy, "sdxl")
    assert proxy.autofit.plan != ()
    assert {"encode", "denoise", "decode"} <= set(measured_activations(proxy))
    (peaks,) = [e for e in logs if e["event"] == "autofit.stage_peaks"]
    assert peaks["stage"] == "decode"  # only the stage that ran under the plan in force now


def test_partial_residency_on_cuda_streams_from_pinned_chunks_and_matches():
    """resident_stream:30 on CUDA: streamed weights sit in page-locked chunks holding only them
    (at most 1.1x the streamed bytes), copies run on a side stream, the image equals
    everything on the device, and leaving the plan returns the pinned memory."""
    from autofit.facts.memory import pinned_in_use
    from autofit.strategies import partial

    reference = run(autofit(tiny_sdxl().to("cuda"), device="cuda", plan=(), cache=False), "sdxl")
    pipe = tiny_sdxl()
    proxy = autofit(pipe, device="cuda", plan=("resident_stream:30",), cache=False)
    image = run(proxy, "sdxl")
    s = partial.streamer_of(pipe.unet)
    assert s.pinned and all(c.is_pinned() for c in s.chunks) and s._side is not None
    assert sum(c.numel() for c in s.chunks) <= 1.1 * s.streamed_bytes + 512 * len(s.units) * 8
    assert next(pipe.unet.parameters()).device.type == "cuda"
    torch.testing.assert_close(image, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(proxy, "sdxl"), reference, rtol=1e-4, atol=1e-4)
    switch_plan(proxy, Plan())
    assert partial.streamer_of(pipe.unet) is None
    assert pinned_in_use() < s.streamed_bytes // 2


def test_group_disk_on_cuda_matches_the_device_and_holds_no_weights_on_the_device(tmp_path, monkeypatch):
    """group_disk on CUDA: the image equals everything on the device; between calls only the VAE
    is on the device (the offloaded blocks are in files); switching back reads every weight back."""
    from autofit import disk

    monkeypatch.setenv(disk.OFFLOAD_ENV, str(tmp_path / "offload"))
    reference = run(autofit(tiny_sdxl(), device="cuda", plan=(), cache=False), "sdxl")
    pipe = tiny_sdxl()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    proxy = autofit(pipe, device="cuda", plan=("group_disk",), cache=False)
    torch.testing.assert_close(run(proxy, "sdxl"), reference)
    vae = sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    assert _allocated() < vae + (64 << 20)
    switch_plan(proxy, Plan())
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k].cpu(), before[k]) for k in before)
    torch.testing.assert_close(run(proxy, "sdxl"), reference)
