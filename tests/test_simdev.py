"""autofit.testing.simdev: the simulated accelerator with capped memory (docs/simdev.md).

The tests that use the device skip where its extension cannot be built (no C++ compiler or
ninja, an old torch); the first run builds it into the cache (10-30 s on 2 cores), later runs
load it.
"""

import gc

import pytest
import torch

from autofit.testing import simdev
from autofit.planning.explain import OOMFigures
from autofit.engine.oom import OOMKind, classify

MiB = 1 << 20
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def sim():
    """Installed once for the module (registration is process-wide); caps lifted afterwards so
    later test modules see a device as big as the host. One thread meanwhile: the tensors are
    tiny, and on a busy machine a thread waiting at OpenMP's barrier for a descheduled partner
    made the pipeline calls up to 5x slower."""
    device = simdev.require()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield device
    torch.set_num_threads(threads)
    simdev.set_cap(None)
    simdev.set_pinned_cap(None)
    simdev.reset_counters()


@pytest.fixture(autouse=True)
def _fresh(request):
    """Counters and peaks start at zero, and every test leaves both caps lifted."""
    if "sim" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("sim")
    gc.collect()
    simdev.set_cap(None)
    simdev.set_pinned_cap(None)
    simdev.reset_counters()
    simdev.reset_peak_memory_stats()
    yield
    simdev.set_cap(None)
    simdev.set_pinned_cap(None)


def _accelerator_is_sim() -> bool:
    current = torch.accelerator.current_accelerator()
    return current is not None and current.type == simdev.NAME


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------------------- allocator
def test_an_allocation_over_the_cap_raises_a_device_oom_worded_like_cuda(sim):
    keep = torch.empty(3 * MiB, dtype=torch.uint8, device=sim)
    base = simdev.memory_allocated()
    simdev.set_cap(base + 5 * MiB)
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(6 * MiB, dtype=torch.uint8, device=sim)
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 6.00 MiB. GPU 0 has a total capacity of ")
    assert "0 bytes is reserved by PyTorch but unallocated." in message
    assert classify(info.value).kind is OOMKind.DEVICE
    figures = OOMFigures.parse(message)  # the figures autofit.planning.explain reads (two decimals)
    assert figures.requested == 6 * MiB
    assert figures.free == 5 * MiB
    assert figures.process == figures.allocated == pytest.approx(base, abs=0.01 * MiB)
    assert figures.capacity == pytest.approx(base + 5 * MiB, abs=0.01 * MiB)
    assert simdev.memory_allocated() == base  # the failed allocation took nothing
    assert simdev.counters()["device_ooms"] == 1
    torch.empty(5 * MiB, dtype=torch.uint8, device=sim)  # exactly what is left fits
    del keep


def test_an_op_whose_output_does_not_fit_raises_inside_the_op(sim):
    a = torch.ones(256, 1024, device=sim)  # 1 MiB
    simdev.set_cap(simdev.memory_allocated() + MiB + MiB // 2)
    b = a * 2  # 1 MiB more fits
    with pytest.raises(torch.OutOfMemoryError):
        torch.cat([a, b])  # 2 MiB does not
    assert torch.equal(b.cpu(), torch.full((256, 1024), 2.0))


def test_memory_figures_match_tensor_sizes(sim):
    base = simdev.memory_allocated()
    a = torch.empty(1000, 3, dtype=torch.float32, device=sim)
    b = torch.empty(77, dtype=torch.float16, device=sim)
    assert simdev.memory_allocated() == base + 12000 + 154
    del a
    assert simdev.memory_allocated() == base + 154
    assert simdev.max_memory_allocated() == base + 12154
    simdev.reset_peak_memory_stats()
    assert simdev.max_memory_allocated() == base + 154
    view = b[10:20]  # a view allocates nothing
    assert simdev.memory_allocated() == base + 154 and view.device == sim
    simdev.set_cap(64 * MiB)
    assert torch.sim.mem_get_info() == (64 * MiB - base - 154, 64 * MiB)
    assert torch.sim.memory_allocated() == simdev.memory_allocated()
    if _accelerator_is_sim():  # torch.accelerator reads the allocator's DeviceStats
        assert torch.accelerator.memory_allocated() == base + 154
        assert torch.accelerator.max_memory_allocated() == base + 154
        assert torch.accelerator.get_memory_info() == (64 * MiB - base - 154, 64 * MiB)
        torch.empty(1000, dtype=torch.uint8, device=sim)
        assert torch.accelerator.max_memory_allocated() == base + 1154
        torch.accelerator.reset_peak_memory_stats()
        assert torch.accelerator.max_memory_allocated() == base + 154


def test_moving_a_module_counts_the_bytes_it_moved(sim):
    from autofit.testing import tiny_sdxl

    module = tiny_sdxl().text_encoder
    expected = _nbytes(module)
    base = simdev.memory_allocated()
    module.to(sim)
    c = simdev.counters()
    assert c["h2d_bytes"] == c["h2d_pageable_bytes"] == expected
    assert c["h2d_pinned_bytes"] == c["d2h_bytes"] == 0
    assert simdev.memory_allocated() - base == expected
    module.to("cpu")
    assert simdev.counters()["d2h_bytes"] == expected
    assert simdev.memory_allocated() == base


def test_compute_matches_the_cpu(sim):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    q = torch.randn(2, 2, 64, 16)
    expected = (conv(x).relu().mean(), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    xs, qs = x.to(sim), q.to(sim)
    conv.to(sim)
    got = (conv(xs).relu().mean(), torch.nn.functional.scaled_dot_product_attention(qs, qs, qs))
    for e, g in zip(expected, got):
        assert g.device == sim
        torch.testing.assert_close(g.cpu(), e)
    y = xs.clone()
    assert y.add_(1) is y  # in place: the very tensor comes back
    torch.testing.assert_close(y.cpu(), x + 1)
    assert torch.arange(5, device=sim).cpu().tolist() == [0, 1, 2, 3, 4]  # an out= kernel that grows its output


def test_group_norm_takes_channels_last_input_as_a_gpu_does(sim):
    """A GPU's group norm takes channels-last input (UNets run so); torch's device-generic
    kernel, which an unknown device would get, views the input flat and refuses it. The sim
    device runs the CPU's kernel instead, and its gradient too."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(8, 32)
    expected = norm(x)
    xs = x.to(sim).requires_grad_()
    assert xs.is_contiguous(memory_format=torch.channels_last)
    got = norm.to(sim)(xs)
    torch.testing.assert_close(got.cpu(), expected)
    got.sum().backward()
    xc = x.clone().requires_grad_()
    norm.cpu()(xc).sum().backward()
    torch.testing.assert_close(xs.grad.cpu(), xc.grad)


def test_layer_norm_allocates_its_output_as_a_fused_kernel_does(sim):
    """torch's device-generic layer norm builds its result in several ops (a peak of twice the
    output); a GPU's fused kernel, and the CPU's run by the sim device, allocate the output and
    the per-row statistics only."""
    norm = torch.nn.LayerNorm(1024).to(sim)
    x = torch.randn(1, 1024, 1024, device=sim)
    base = simdev.memory_allocated()
    simdev.reset_peak_memory_stats()
    with torch.no_grad():
        y = norm(x)
    rows = x.shape[0] * x.shape[1]
    assert simdev.max_memory_allocated() - base <= y.numel() * y.element_size() + 2 * rows * 4 + 64 * 1024
    torch.testing.assert_close(y.cpu(), norm.cpu()(x.cpu()))


def test_attention_does_not_materialise_the_score_matrix(sim):
    q = torch.randn(1, 1, 1024, 32, device=sim)
    simdev.reset_peak_memory_stats()
    base = simdev.memory_allocated()
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert simdev.max_memory_allocated() - base < MiB  # the 1024 x 1024 scores would be 4 MiB


def test_param_data_swaps_between_host_and_device(sim):
    lin = torch.nn.Linear(8, 8)
    weight = lin.weight
    lin.to(sim)
    assert lin.weight is weight and weight.device == sim
    weight.data = weight.data.to("cpu")
    assert weight.device.type == "cpu"
    weight.data = weight.data.to(sim)
    assert weight.device == sim


def test_streams_and_events(sim):
    s = torch.sim.Stream()
    assert s.device == sim
    with torch.sim.stream(s):
        assert torch.sim.current_stream() == s
    assert torch.sim.current_stream() == torch.sim.default_stream()
    start, end = torch.sim.Event(enable_timing=True), torch.sim.Event(enable_timing=True)
    start.record()
    end.record()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) >= 0


# ---------------------------------------------------------------------------- pinned memory
def test_pinned_copies_count_as_pinned(sim):
    if not _accelerator_is_sim():
        pytest.skip("pinning is the process accelerator's, not sim's")
    host = torch.randn(1024).pin_memory()
    assert host.is_pinned() and host[10:].is_pinned() and not torch.randn(4).is_pinned()
    host.to(sim, non_blocking=True)
    assert simdev.counters()["h2d_pinned_bytes"] == 4096


def test_pinning_over_the_pinned_cap_raises_what_cuda_raises(sim):
    if not _accelerator_is_sim():
        pytest.skip("pinning is the process accelerator's, not sim's")
    simdev.set_pinned_cap(MiB)
    with pytest.raises(torch.AcceleratorError, match="^CUDA error: out of memory"):
        torch.empty(2 * MiB, dtype=torch.uint8, pin_memory=True)
    assert simdev.counters()["pinned_ooms"] == 1
    assert simdev.counters()["pinned_bytes"] == 0


def test_group_offload_pinning_over_the_cap_is_a_host_oom(sim):
    """diffusers' group offloading with streams pins host copies of the weights; where pinned
    memory runs out there, autofit reads a host OOM."""
    if not _accelerator_is_sim():
        pytest.skip("pinning is the process accelerator's, not sim's")
    from diffusers.hooks import apply_group_offloading

    from autofit.testing import tiny_sdxl

    vae = tiny_sdxl().vae
    simdev.set_pinned_cap(_nbytes(vae) // 2)
    with pytest.raises(torch.AcceleratorError) as info:
        apply_group_offloading(vae, onload_device=sim, offload_type="leaf_level", use_stream=True)
    assert classify(info.value).kind is OOMKind.HOST


# ---------------------------------------------------------------------------- pipelines
def _group(offload_type: str, **kw):
    def place(pipe, device):
        from diffusers.hooks import apply_group_offloading

        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            apply_group_offloading(getattr(pipe, name), onload_device=device, offload_type=offload_type, **kw)
    return place


PLACEMENTS = {
    "device": lambda pipe, device: pipe.to(device),
    "model_offload": lambda pipe, device: pipe.enable_model_cpu_offload(device=device),
    "group_block": _group("block_level", num_blocks_per_group=1),
    "group_leaf_stream": _group("leaf_level", use_stream=True, record_stream=True),
    "sequential": lambda pipe, device: pipe.enable_sequential_cpu_offload(device=device),
}


def _run(placement: str, device, cap=None):
    """Images, peak device bytes and counters of one call of a fresh tiny SDXL placed so."""
    from autofit.testing import tiny_sdxl

    gc.collect()
    pipe = tiny_sdxl()
    simdev.set_cap(cap)
    simdev.reset_counters()
    simdev.reset_peak_memory_stats()
    try:
        PLACEMENTS[placement](pipe, device)
        images = pipe("a photo of a cat", generator=torch.Generator("cpu").manual_seed(0), **CALL).images
        return images, simdev.max_memory_allocated(), simdev.counters()
    finally:
        simdev.set_cap(None)
        del pipe
        gc.collect()


@pytest.fixture(scope="module")
def cpu_images():
    from autofit.testing import tiny_sdxl

    return tiny_sdxl()("a photo of a cat", generator=torch.Generator("cpu").manual_seed(0), **CALL).images


@pytest.fixture(scope="module")
def weight_bytes():
    from autofit.testing import tiny_sdxl

    pipe = tiny_sdxl()
    return sum(_nbytes(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2"))


@pytest.fixture(scope="module")
def measured(sim):
    """placement -> (images, peak, counters) of its uncapped run, each measured once."""
    cache = {}

    def get(placement):
        if placement not in cache:
            cache[placement] = _run(placement, sim)
        return cache[placement]
    return get


def test_a_pipeline_on_sim_gives_the_cpu_images(sim, cpu_images, measured, weight_bytes):
    images, peak, c = measured("device")
    assert abs(images - cpu_images).max() < 1e-5  # the same kernels; float rounding at most
    assert peak > weight_bytes
    assert c["h2d_bytes"] >= weight_bytes


@pytest.mark.parametrize("placement", ["model_offload", "group_block", "group_leaf_stream", "sequential"])
def test_offloading_moves_weights_and_lowers_the_peak(sim, cpu_images, measured, weight_bytes, placement):
    images, peak, c = measured(placement)
    assert abs(images - cpu_images).max() < 1e-5
    assert peak < measured("device")[1]
    assert c["h2d_bytes"] >= weight_bytes  # every weight went onto the device at least once
    if placement == "group_leaf_stream" and _accelerator_is_sim():
        assert c["h2d_pinned_bytes"] >= weight_bytes  # from the pinned host copies


def test_a_placement_needs_exactly_its_measured_peak(sim, measured):
    """cap = the measured peak runs; one byte less raises the allocator's OOM."""
    peak = measured("model_offload")[1]
    _, at_cap, c = _run("model_offload", sim, cap=peak)
    assert at_cap == peak and c["device_ooms"] == 0
    with pytest.raises(torch.OutOfMemoryError) as info:
        _run("model_offload", sim, cap=peak - 1)
    assert classify(info.value).kind is OOMKind.DEVICE
    assert simdev.counters()["device_ooms"] == 1


# ---------------------------------------------------------------------------- install
def test_installing_again_only_sets_the_caps(sim):
    assert simdev.install(cap="3GiB", pinned_cap="1GiB") == sim
    assert simdev.get_cap() == 3 << 30 and simdev.get_pinned_cap() == 1 << 30
    simdev.install()
    assert simdev.get_pinned_cap() is None and simdev.get_cap() > 0


def test_installing_leaves_host_tensors_alone(sim):
    """What the rest of a process does on the CPU is unchanged by the device being there."""
    from autofit.facts.memory import release_pinned_cache

    t = torch.randn(16)
    assert t.device.type == "cpu" and not t.is_pinned()
    assert simdev.counters()["h2d_bytes"] == 0
    release_pinned_cache()  # torch.accelerator.empty_host_cache() reaches sim's pinned allocator
    torch.accelerator.empty_cache()


@pytest.mark.parametrize("text, expected", [("512MiB", 512 << 20), ("8GiB", 8 << 30), ("16GB", 16 * 10**9),
                                            ("1.5gib", 3 << 29), (1234, 1234), ("0", 0)])
def test_sizes(text, expected):
    assert simdev._parse_size(text) == expected


def test_a_bad_size_is_refused():
    with pytest.raises(ValueError, match="not a size"):
        simdev._parse_size("lots")


def test_without_a_compiler_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_SIMDEV_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ok, missing = simdev._toolchain()
    assert not ok and "C++ compiler" in missing
    with pytest.raises(simdev.SimDevUnavailable, match="apt-get install g\\+\\+"):
        simdev._load(verbose=False)


def test_require_skips_where_it_cannot_build(monkeypatch):
    monkeypatch.setattr(simdev, "available", lambda: (False, "cannot build: needs ninja (pip install ninja)"))
    with pytest.raises(pytest.skip.Exception, match="needs ninja"):
        simdev.require()


def test_the_build_folder_follows_the_source_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_SIMDEV_BUILD_DIR", str(tmp_path))
    folder = simdev.build_dir()
    assert folder.parent == tmp_path and torch.__version__ in folder.name
    monkeypatch.setattr(simdev, "_SOURCE", tmp_path / "changed.cpp")
    (tmp_path / "changed.cpp").write_text("// another source\n")
    assert simdev.build_dir() != folder
