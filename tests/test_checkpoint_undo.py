"""One-way rungs on a pipeline loaded from a folder: the checkpoint is the undo copy.

Real tiny pipelines written with save_pretrained and read back with from_pretrained; no copy of
the original weights is kept in host RAM where the files hold them, and a weight the user
changed after loading is never replaced by the file's."""

import os
import threading

import pytest
import structlog
import torch
from diffusers import DiffusionPipeline

from autofit import autofit
from autofit import CheckpointChanged
from autofit.facts.checkpoint import Checkpoint
from autofit.facts.footprint import measure
from autofit.planning.cost import host_bytes
from autofit.plan import Plan
from autofit.strategies.casting import FromCheckpoint, apply_fp8, restore_original
from autofit.strategies.quantize import quantize_module, quantized_level

from helpers import BUILDERS, DENOISER, one_way_rungs, placed_plan, run, rung_context, switch_plan

pytest.importorskip("bitsandbytes")


def _from_disk(kind, folder, **load):
    BUILDERS[kind]().save_pretrained(folder)
    return DiffusionPipeline.from_pretrained(folder, **load)


def _states(pipe):
    return {n: {k: v.clone() for k, v in m.state_dict().items()}
            for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _assert_same(pipe, states):
    for name, state in states.items():
        now = getattr(pipe, name).state_dict()
        assert now.keys() == state.keys(), name
        for key, value in state.items():
            assert now[key].dtype == value.dtype and torch.equal(now[key], value), (name, key)


@pytest.mark.parametrize("level", ["nf4", "int8"])
def test_quantized_from_disk_keeps_no_copy_and_restores_bit_for_bit(kind, level, tmp_path):
    pipe = _from_disk(kind, tmp_path / "model")
    states = _states(pipe)
    proxy = autofit(pipe, plan=(level,), policy="balanced", cache=False)
    with structlog.testing.capture_logs() as logs:
        run(proxy, kind)
    event = next(e for e in logs if e["event"] == "autofit.quantized")
    assert event["undo_copy_gib"] == 0.0
    rungs = one_way_rungs(proxy)
    assert DENOISER[kind] in rungs
    assert all(w.undo.held_bytes == 0 for w in rungs.values())
    assert quantized_level(getattr(pipe, DENOISER[kind])) == level
    switch_plan(proxy, Plan())
    assert all(quantized_level(m) is None for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    _assert_same(pipe, states)


def test_a_weight_changed_after_loading_is_kept_in_ram_not_read_from_disk(tmp_path):
    """A fused LoRA changes weights in memory: those layers keep their in-RAM copy and come back as
    the user had them, the untouched layers come back from the file."""
    pipe = _from_disk("flux", tmp_path / "model")
    changed = pipe.transformer.transformer_blocks[0].attn.to_q
    with torch.no_grad():
        changed.weight.add_(0.25)  # what fuse_lora does to a layer
    states = _states(pipe)
    undo = quantize_module(pipe.transformer, "nf4", torch.device("cpu"), Checkpoint.of(pipe.transformer))
    assert undo.held_bytes == changed.weight.numel() * changed.weight.element_size()
    assert sum(s.key is not None for s in undo.done) == len(undo.done) - 1
    undo()
    _assert_same(pipe, {"transformer": states["transformer"]})


def test_fp8_from_disk_is_undoable_without_host_ram(tmp_path):
    """With no host RAM to spare for a snapshot, a built-in-memory denoiser cannot be uncast, one
    loaded from a folder can: its checkpoint is the copy."""
    pipe = _from_disk("sdxl", tmp_path / "model")
    states = _states(pipe)
    fp = measure(pipe)
    assert fp.components["unet"].restorable
    cast, originals = apply_fp8(pipe, fp, host_available=0)
    assert cast == ["unet"] and isinstance(originals["unet"], FromCheckpoint)
    assert "buf" not in originals["unet"].source._scratch.__dict__  # no read buffer kept with the copy
    assert any(v.dtype == torch.float8_e4m3fn for v in pipe.unet.state_dict().values())
    restore_original(pipe.unet, originals["unet"])
    _assert_same(pipe, {"unet": states["unet"]})

    built = BUILDERS["sdxl"]()
    cast, originals = apply_fp8(built, measure(built), host_available=0)
    assert cast == ["unet"] and originals == {}


def test_a_tied_weight_the_file_holds_under_its_other_name_restores_and_stays_tied(tmp_path):
    """transformers saves one name of a tied pair (T5: shared.weight, not encoder.embed_tokens.weight):
    the checkpoint still covers the component, a cast reads the tensor back under the name the file
    has, and the tie survives the undo."""
    pipe = _from_disk("flux", tmp_path / "model")
    t5 = pipe.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the pair this test is about
    source = Checkpoint.of(t5)
    assert "encoder.embed_tokens.weight" not in source._where and "shared.weight" in source._where
    assert measure(pipe).components["text_encoder_2"].restorable
    states = _states(pipe)
    params = [(k, p) for k, p in t5.named_parameters(remove_duplicate=False)]
    assert all(source.same(k, p) for k, p in params)
    with torch.no_grad():
        for p in t5.parameters():
            p.zero_()
    restore_original(t5, FromCheckpoint(source, {k: (p.dtype, p.stride()) for k, p in params}))
    _assert_same(pipe, {"text_encoder_2": states["text_encoder_2"]})
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_variants_restore_from_the_file_that_matched(tmp_path):
    """A folder with an fp32 file and a different fp16 variant: the loaded fp16 weights equal the
    variant, and undo reads the variant back, not the fp32 file."""
    folder = tmp_path / "model"
    pipe = BUILDERS["flux"]()
    pipe.save_pretrained(folder)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.mul_(0.5)
    pipe.transformer.to(torch.float16).save_pretrained(folder / "transformer", variant="fp16")
    loaded = DiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert len(list((folder / "transformer").glob("*.safetensors"))) == 2
    state = {k: v.clone() for k, v in loaded.transformer.state_dict().items()}
    undo = quantize_module(loaded.transformer, "nf4", torch.device("cpu"), Checkpoint.of(loaded.transformer))
    assert undo.held_bytes == 0
    undo()
    _assert_same(loaded, {"transformer": state})


def test_a_checkpoint_changed_on_disk_is_refused_and_the_pipeline_keeps_working(tmp_path):
    pipe = _from_disk("flux", tmp_path / "model")
    proxy = autofit(pipe, plan=("nf4",), policy="balanced", cache=False)
    before = run(proxy, "flux")
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointChanged, match="changed on disk.*Reload the pipeline"):
        switch_plan(proxy, Plan())
    assert quantized_level(pipe.transformer) == "nf4"
    assert rung_context(proxy).pipeline.storage_locked == "nf4" and "nf4" in proxy.autofit.plan
    torch.testing.assert_close(run(proxy, "flux"), before)


def test_a_restorable_footprint_predicts_no_undo_copy(tmp_path):
    """The planner's host RAM for an nf4 plan drops by the full-precision size of the targets when
    the checkpoint is the copy; a pipeline built in memory is not restorable."""
    disk = measure(_from_disk("flux", tmp_path / "model"))
    memory = measure(BUILDERS["flux"]())
    assert all(c.restorable for c in disk.components.values() if c.quant_ok)
    assert not any(c.restorable for c in memory.components.values())
    plan = Plan(extras=frozenset({"nf4"}))
    targets = sum(c.bytes for c in memory.components.values() if c.quant_ok)
    assert host_bytes(plan, memory) - host_bytes(plan, disk) == targets


def test_a_component_loaded_from_a_path_object_finds_its_checkpoint(tmp_path):
    """from_pretrained(Path(...)) records the Path itself as _name_or_path."""
    from diffusers import UNet2DConditionModel

    BUILDERS["sdxl"]().unet.save_pretrained(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    undo = quantize_module(unet, "nf4", torch.device("cpu"), Checkpoint.of(unet))
    assert undo.done and undo.held_bytes == 0


# ---- what the review found ------------------------------------------------------------------
def _touch(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("how", ["touched", "deleted"])
def test_an_fp8_undo_that_cannot_read_its_checkpoint_leaves_the_component_cast_and_working(tmp_path, how):
    pipe = _from_disk("sdxl", tmp_path / "model")
    proxy = autofit(pipe, plan=("fp8",), policy="balanced", cache=False)
    before = run(proxy, "sdxl")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    _touch(weights) if how == "touched" else weights.unlink()
    with pytest.raises(CheckpointChanged):
        switch_plan(proxy, Plan())
    assert rung_context(proxy).pipeline.storage_locked == "fp8"
    torch.testing.assert_close(run(proxy, "sdxl"), before)


def test_a_failed_roll_back_leaves_the_pipeline_placed_again_at_the_next_call(tmp_path):
    from test_quantization import _break_when_quantized

    pipe = _from_disk("flux", tmp_path / "model")
    handle = _break_when_quantized(pipe.transformer.transformer_blocks[0])
    proxy = autofit(pipe, plan=("nf4",), policy="balanced", cache=False)
    switch_plan(proxy, Plan(extras=frozenset({"nf4"})))  # quantize now, then make the checkpoint broken
    _touch(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointChanged, match="It was being undone because transformer failed"):
        run(proxy, "flux")
    assert placed_plan(proxy) is None
    handle.remove()
    assert run(proxy, "flux").isfinite().all()
    assert placed_plan(proxy) == Plan.from_names(proxy.autofit.plan)


def test_tied_and_sign_flipped_weights_are_kept_in_ram(tmp_path):
    """A weight sharing its storage with another parameter is never released (releasing it would
    empty its twin); -0.0 where the file has 0.0 is a change (bit for bit, not torch.equal)."""
    built = BUILDERS["flux"]()
    with torch.no_grad():
        built.transformer.transformer_blocks[0].ff.net[2].weight[0, 0] = 0.0
    built.save_pretrained(tmp_path / "model")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.to_k.weight = attn.to_q.weight  # tied after loading
    ff = pipe.transformer.transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        ff.weight[0, 0] = -0.0
    states = _states(pipe)
    originals = {id(attn.to_q), id(attn.to_k), id(ff)}
    undo = quantize_module(pipe.transformer, "nf4", torch.device("cpu"), Checkpoint.of(pipe.transformer))
    kept = {id(s.original) for s in undo.done if s.key is None}
    assert kept == originals  # every other layer equals its file and was released
    assert quantized_level(attn.to_q) == quantized_level(attn.to_k) == "nf4"
    undo()
    assert attn.to_k.weight is attn.to_q.weight
    _assert_same(pipe, {"transformer": states["transformer"]})


def test_an_unreadable_checkpoint_falls_back_to_a_ram_copy(tmp_path):
    """A truncated file: quantization keeps the weights in RAM, fp8 takes a RAM snapshot, and an
    empty *.safetensors beside it does not stop autofit() from wrapping the pipeline."""
    pipe = _from_disk("sdxl", tmp_path / "model")
    states = _states(pipe)
    folder = tmp_path / "model" / "unet"
    (folder / "empty.safetensors").write_bytes(b"")
    weights = folder / "diffusion_pytorch_model.safetensors"
    # Replaced by a truncated file (a new inode: the loaded weights may be mapped from the old one).
    (folder / "partial").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    os.replace(folder / "partial", weights)
    fp = measure(pipe)
    undo = quantize_module(pipe.unet, "nf4", torch.device("cpu"), Checkpoint.of(pipe.unet))
    assert undo.held_bytes > 0 and all(s.key is None for s in undo.done)
    undo()
    cast, originals = apply_fp8(pipe, fp, host_available=64 * 2**30)
    assert cast == ["unet"] and isinstance(originals["unet"], dict)
    restore_original(pipe.unet, originals["unet"])
    _assert_same(pipe, {"unet": states["unet"]})
    assert autofit(pipe, cache=False)  # wraps despite the broken files


def test_fp8_undo_from_the_checkpoint_keeps_channels_last(tmp_path):
    pipe = _from_disk("sdxl", tmp_path / "model")
    pipe.unet.to(memory_format=torch.channels_last)
    convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    states = _states(pipe)
    cast, originals = apply_fp8(pipe, measure(pipe), host_available=0)
    assert isinstance(originals["unet"], FromCheckpoint)
    restore_original(pipe.unet, originals["unet"])
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    _assert_same(pipe, {"unet": states["unet"]})


def test_an_interrupted_quantization_restores_the_layers_and_stops_reading(tmp_path, monkeypatch):
    """An OOM (or Ctrl-C) in the middle: every layer goes back, the queued comparisons are dropped,
    and the one in flight has finished before quantize_module lets the error go."""
    from autofit.strategies import quantize

    pipe = _from_disk("flux", tmp_path / "model")
    states = _states(pipe)
    gate, compared, real_same = threading.Event(), [], Checkpoint.same

    def slow_same(self, key, tensor):  # comparisons slower than quantizing: a queue builds up
        assert gate.wait(timeout=60)
        compared.append(key)
        return real_same(self, key, tensor)

    real_layer, built = quantize._bnb_layer, []

    def failing_layer(linear, level, dtype):
        built.append(1)
        if len(built) == 10:
            gate.set()  # let the comparison in flight finish
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
        return real_layer(linear, level, dtype)

    monkeypatch.setattr(Checkpoint, "same", slow_same)
    monkeypatch.setattr(quantize, "_bnb_layer", failing_layer)
    with pytest.raises(torch.OutOfMemoryError):
        quantize_module(pipe.transformer, "nf4", torch.device("cpu"), Checkpoint.of(pipe.transformer))
    done = len(compared)
    assert 1 <= done < 9  # the one in flight, not the 8 queued behind it
    assert not [t for t in threading.enumerate() if t.name.startswith("autofit-verify")]
    assert len(compared) == done  # nothing read after the error went up
    assert quantized_level(pipe.transformer) is None
    _assert_same(pipe, {"transformer": states["transformer"]})


def test_a_checkpoint_truncated_in_place_is_a_mismatch_not_a_crash(tmp_path):
    """Read with plain reads, not memory maps: a file cut short under autofit gives a short read
    (weights kept in RAM) instead of a SIGBUS."""
    pipe = _from_disk("flux", tmp_path / "model")
    with torch.no_grad():  # in anonymous memory, as after a tear-down from the GPU
        for p in pipe.transformer.parameters():
            p.data = p.data.clone()
    source = Checkpoint.of(pipe.transformer)
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    undo = quantize_module(pipe.transformer, "nf4", torch.device("cpu"), source)
    released = sum(s.key is not None for s in undo.done)
    assert 0 < released < len(undo.done)  # the entries in the first half still matched
    undo()
    assert quantized_level(pipe.transformer) is None


def test_restore_layouts():
    """Only dense layouts are reproduced; an expanded or gapped stride restores contiguous."""
    from autofit.facts.checkpoint import _dense

    assert _dense(torch.Size([4, 3, 2, 2]), torch.empty(4, 3, 2, 2).to(memory_format=torch.channels_last).stride())
    assert _dense(torch.Size([3, 5]), (1, 3))  # transposed
    assert not _dense(torch.Size([4, 4]), (0, 1))  # expanded
    assert not _dense(torch.Size([4, 4]), (8, 1))  # a slice of a wider tensor


def test_autofits_int8_layers_pickle():
    import pickle

    import bitsandbytes as bnb

    from helpers import BUILDERS as B

    unet = B["sdxl"]().unet
    quantize_module(unet, "int8", torch.device("cpu"))
    layer = next(m for m in unet.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    copy = pickle.loads(pickle.dumps(layer))
    assert type(copy) is type(layer) and torch.equal(copy.weight, layer.weight)
