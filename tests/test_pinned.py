"""Pinned (page-locked) host memory and the host RAM a plan may use: measured pinned sizes, the
driver's cap on Windows/WSL2, and credit for the weights a pipeline already holds in host RAM."""

import sys
from pathlib import Path

import pytest
import torch

from autofit import autofit
from autofit.facts.footprint import footprint_from_header, measure_component, pinned_size
from autofit.planning.context import Machine, Workload, context
from autofit.planning.cost import host_bytes, pinned_bytes
from autofit.planning.ladder import next_plan
from autofit.planning.rungs import refusal
from autofit.facts.memory import held_on_host, pinned_ceiling
from autofit.plan import Plan
from autofit.planning.planner import choose, predict
from autofit.testing import tiny_sdxl
from helpers import host_room, rung_context
from footprints import FLUX, SDXL

GIB = 2**30
STREAM = Plan("group_leaf_stream")


def test_pinned_size_rounds_each_tensor_up_to_a_power_of_two():
    """torch's pinned allocator hands out power-of-two blocks: a Linear(3, 5) in float32 pins
    64 + 32 bytes for its 60 + 20, from the module and from a safetensors header alike."""
    assert [pinned_size(n) for n in (0, 1, 60, 64, 65, 20)] == [0, 1, 64, 64, 128, 32]
    layer = torch.nn.Linear(3, 5)
    assert measure_component("unet", layer).pinned_bytes == 96
    header = {"weight": {"dtype": "F32", "shape": [5, 3]}, "bias": {"dtype": "F32", "shape": [5]}}
    assert footprint_from_header("unet", header, "Linear").pinned_bytes == 96


def test_pinned_copies_of_the_sdxl_sized_pipeline_match_the_h200():
    """Streamed leaf-level group offload pins a copy of every tensor. For the SDXL-sized pipeline
    (benchmarks/sized.py, built on the meta device) that predicts the +8.6 GiB measured on an H200."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sized
    from autofit.facts.footprint import measure

    fp = measure(sized.sdxl_sized(device="meta"))
    assert fp.total / GIB == pytest.approx(6.46, rel=0.01)
    assert pinned_bytes(STREAM, fp) / GIB == pytest.approx(8.6, rel=0.03)
    # The same figure is what the plan holds in host RAM: the pinned copies replace the weights.
    assert host_bytes(STREAM, fp) == pinned_bytes(STREAM, fp)


@pytest.mark.parametrize("system,release,fraction", [
    ("Windows", "10", 0.4),
    ("Linux", "5.15.167.4-microsoft-standard-WSL2", 0.4),
    ("Linux", "6.8.0-45-generic", 1.0),
])
def test_pinned_ceiling_follows_the_driver(system, release, fraction):
    ceiling, why = pinned_ceiling(64 * GIB, system=system, release=release)
    assert ceiling == int(fraction * 64 * GIB)
    assert why


def machine(vram_gib, ram_gib=256, pinned_gib=None):
    return Machine(int(vram_gib * GIB), int(ram_gib * GIB), "cuda",
                   pinned_available_bytes=None if pinned_gib is None else int(pinned_gib * GIB))


FLUX_4 = Workload(steps=4, cfg=False)


def test_streams_are_not_planned_beyond_what_can_be_pinned():
    """Flux at 16 GiB with plenty of RAM fits streamed group offload; on a machine that can pin
    only 40% of 64 GiB (Windows, WSL2) that plan would pin ~48 GiB: the planner says why and
    picks a plan that pins less than can be pinned."""
    fast = predict(Plan("group_leaf_stream"), context(FLUX, machine(16), FLUX_4))
    assert fast.fits
    capped_ctx = context(FLUX, machine(16, ram_gib=64, pinned_gib=25.6), FLUX_4)
    capped = predict(fast.plan, capped_ctx)
    assert not capped.fits and "pinned" in capped.why_not
    best = choose(capped_ctx)  # partial residency pins only what it streams
    assert best is not None and best.plan.family == "resident_stream"
    assert pinned_bytes(best.plan, FLUX) <= 0.9 * 25.6 * GIB


def test_per_call_moves_slow_down_when_their_buffers_cannot_be_pinned():
    """offload_for_decode moves the UNet and encoders through reusable host buffers, pinned when
    they can be (55.5 GB/s), pageable otherwise (8.9 GB/s): the prediction follows."""
    plan = Plan("device", frozenset({"offload_for_decode"}))
    assert pinned_bytes(plan, SDXL) / GIB == pytest.approx(1.31 * 4.78 + 1.26 * 1.29 + 1.77 * 0.23, rel=0.01)
    wl = Workload()
    roomy = predict(plan, context(SDXL, machine(8), wl))
    tight = predict(plan, context(SDXL, machine(8, pinned_gib=1), wl))
    assert tight.fits and tight.seconds > roomy.seconds + 1.0
    assert host_bytes(plan, SDXL) == pinned_bytes(plan, SDXL)


def test_the_ladder_skips_streams_it_cannot_pin():
    ctx = context(FLUX, Machine(0, 64 * GIB, pinned_available_bytes=25 * GIB))
    # From the floor of partial residency (5% resident) the next family is leaf streaming.
    plan, rung, skipped = next_plan(Plan("resident_stream:5"), "denoise", host_oom=False, ctx=ctx)
    assert rung == "group_leaf_lowmem"
    why = dict(skipped)["group_leaf_stream"]
    assert "pinned" in why and why == refusal("group_leaf_stream", Plan("group_leaf_stream"), ctx)


def test_host_room_counts_the_weights_the_pipeline_already_holds():
    """A pipeline loaded on the CPU already holds its weights in host RAM: offloading them needs
    no RAM beyond that, so it is room a plan may use. max_ram caps it."""
    pipe = tiny_sdxl()
    held, pinned = held_on_host(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    proxy = autofit(pipe, device="cpu", cache=False)
    assert held == proxy.autofit.footprint.total and pinned == 0
    room, pinnable = host_room(proxy)
    assert room >= held and pinnable <= room
    assert rung_context(proxy).machine.host_available_bytes >= held
    capped = autofit(tiny_sdxl(), device="cpu", cache=False, max_ram="1MiB")
    assert host_room(capped)[0] == 2**20
    assert rung_context(capped).machine.host_available_bytes == 2**20


def test_held_on_host_counts_shared_storage_once():
    w = torch.zeros(256)
    a, b = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
    a.weight.data = w.view(16, 16)
    b.weight.data = w.view(16, 16)
    assert held_on_host([a, b]) == (1024, 0)
    assert held_on_host([a], [torch.ones(8)]) == (1024 + 32, 0)
    # Views of one fused tensor (a split QKV) hold the whole storage, counted once.
    qkv = torch.zeros(3, 16, 16)
    q, k, v = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))
    for layer, part in zip((q, k, v), qkv):
        layer.weight.data = part
    assert held_on_host([q, k, v]) == (3 * 1024, 0)


class _NoIsPinned(torch.Tensor):
    """A wrapper subclass (like torchao's quantized tensors) that implements every op but is_pinned."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        if func is torch.ops.aten.is_pinned.default:
            raise NotImplementedError(f"{func} is not implemented for this subclass")
        unwrap = lambda t: t.inner if isinstance(t, _NoIsPinned) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def test_a_tensor_subclass_without_is_pinned_does_not_break_a_call():
    """Planning reads every host tensor; a subclass that cannot say whether it is pinned counts
    as not pinned instead of failing the user's call."""
    pipe = tiny_sdxl()
    pipe.unet.register_buffer("extra_scale", _NoIsPinned(torch.ones(8)))
    proxy = autofit(pipe, device="cpu", cache=False)
    out = proxy("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert torch.isfinite(out.images).all()
    assert held_on_host([pipe.unet])[1] == 0


def test_weights_mapped_from_the_checkpoint_are_not_counted_twice(tmp_path):
    """Loaded in its stored dtype, a pipeline's weights are memory-mapped from the safetensors
    files: page cache, already part of the RAM available. Only a copy (a dtype cast) is credited."""
    from diffusers import DiffusionPipeline

    tiny_sdxl().save_pretrained(tmp_path)

    def modules(p):
        return [m for m in p.components.values() if isinstance(m, torch.nn.Module)]

    mapped = DiffusionPipeline.from_pretrained(tmp_path)
    total = sum(p.numel() * p.element_size() for m in modules(mapped) for p in m.parameters())
    assert held_on_host(modules(mapped))[0] < 0.01 * total
    cast = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert held_on_host(modules(cast))[0] >= 0.99 * total / 2


def test_unpin_gives_weights_pageable_storage_and_keeps_ties():
    """After a streamed plan, weights point at pinned copies. unpin() copies each into pageable
    memory once (tied parameters stay one Parameter), keeps the values and reports the bytes.
    Pinning needs CUDA, so here every CPU tensor is declared pinned."""
    from autofit.strategies.placement import unpin

    pipe = tiny_sdxl()
    tied = pipe.vae.post_quant_conv.weight
    pipe.vae.register_parameter("tied_copy", tied)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    ptr = tied.data_ptr()
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    total = held_on_host(modules)[0]
    moved = unpin(pipe, is_pinned=lambda t: True)
    assert moved == total
    assert pipe.vae.tied_copy is pipe.vae.post_quant_conv.weight and tied.data_ptr() != ptr
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert unpin(pipe, is_pinned=lambda t: False) == 0


def test_unpin_is_not_fooled_by_reused_ids():
    """A module listed under two names is walked twice. Buffers replaced on the first walk are
    freed, and Python may hand their ids to the copies; the originals are kept alive for the
    walk, so no copy is mistaken for an original and swapped for another's values."""
    from autofit.strategies.placement import unpin

    pipe = tiny_sdxl()
    encoder = pipe.text_encoder
    for i in range(20):
        encoder.register_buffer(f"b{i}", torch.full((64,), float(i)))
    pipe.text_encoder_2 = encoder  # the same module under a second component name
    originals = {id(getattr(encoder, f"b{i}")) for i in range(20)}
    unpin(pipe, is_pinned=lambda t: id(t) in originals)
    assert all(torch.equal(getattr(encoder, f"b{i}"), torch.full((64,), float(i))) for i in range(20))
