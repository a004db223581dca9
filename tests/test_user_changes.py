"""What users change on the modules after wrapping: LoRA loaded or fused through the proxy, an
attention processor set on the denoiser. Each is in force at the next call and after a recovery,
compared with the raw pipeline given the same change."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from autofit import autofit
from autofit import _diffusers
from autofit.plan import Plan
from autofit.testing import inject_oom, tiny_sdxl

from helpers import run, switch_plan

STEPS = dict(num_inference_steps=2)
# Placements that hold hooks or streamed copies (diffusers' loaders undo and redo only the
# offloading they know), and the plain one.
STARTS = [(), ("offload_encoders",), ("model_offload",), ("group_block",), ("resident_stream:50",)]


def _lora() -> dict[str, torch.Tensor]:
    """A LoRA for the tiny SDXL UNet with non-zero weights (peft's default B is zero: no effect)."""
    donor = tiny_sdxl(seed=1).unet
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    return {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(donor).items()}


@pytest.fixture(scope="module")
def lora():
    return _lora()


@pytest.fixture(scope="module")
def reference(lora):
    """The raw pipeline with the LoRA loaded, and without it."""
    raw = tiny_sdxl()
    plain = run(raw, "sdxl", **STEPS)
    raw.load_lora_weights(dict(lora), adapter_name="style")
    return run(raw, "sdxl", **STEPS), plain


@pytest.mark.parametrize("start", STARTS, ids=lambda s: ",".join(s) or "device")
def test_a_lora_loaded_after_wrapping_is_used_and_kept_through_a_recovery(start, lora, reference):
    with_lora, without = reference
    assert (with_lora - without).abs().max() > 1e-2  # the LoRA changes the image: the check below can fail
    proxy = autofit(tiny_sdxl(), plan=start, cache=False)
    run(proxy, "sdxl", **STEPS)  # placed: hooks or streamed copies in force where the plan has them
    proxy.load_lora_weights(dict(lora), adapter_name="style")
    assert torch.equal(run(proxy, "sdxl", **STEPS), with_lora)
    with inject_oom(proxy, stage="denoise", at=2) as fault:  # the second step runs out
        image = run(proxy, "sdxl", **STEPS)
    assert fault.fired == 1 and proxy.autofit.history[-1].stage == "denoise"
    assert proxy.autofit.plan != start  # recovered on another placement, LoRA layers included
    assert torch.equal(image, with_lora)


def test_fusing_and_unloading_a_lora_through_the_proxy_under_offload(lora, reference):
    with_lora, without = reference
    proxy = autofit(tiny_sdxl(), plan=("group_block",), cache=False)
    run(proxy, "sdxl", **STEPS)
    proxy.load_lora_weights(dict(lora), adapter_name="style")
    proxy.fuse_lora()
    # Fusing adds the LoRA product into the weights: equal up to the rounding of that sum.
    torch.testing.assert_close(run(proxy, "sdxl", **STEPS), with_lora, atol=1e-5, rtol=0)
    assert _diffusers.detect_placement(proxy.__wrapped__) == "group_block"  # placed again for the call
    proxy.unfuse_lora()
    proxy.unload_lora_weights()
    torch.testing.assert_close(run(proxy, "sdxl", **STEPS), without, atol=1e-5, rtol=0)


class CountingProcessor(AttnProcessor):
    calls = 0

    def __call__(self, *args, **kwargs):
        CountingProcessor.calls += 1
        return super().__call__(*args, **kwargs)


def test_an_attention_processor_set_after_wrapping_is_kept_through_a_recovery():
    raw = tiny_sdxl()
    raw.unet.set_attn_processor(AttnProcessor())
    reference = run(raw, "sdxl", **STEPS)
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl", **STEPS)
    proxy.unet.set_attn_processor(CountingProcessor())
    CountingProcessor.calls = 0
    with inject_oom(proxy, stage="denoise", at=2) as fault:
        image = run(proxy, "sdxl", **STEPS)
    assert fault.fired == 1 and proxy.autofit.plan != ()
    assert all(isinstance(p, CountingProcessor) for p in proxy.unet.attn_processors.values())
    # It ran in every attention layer at every step (one UNet call a step: guidance is batched;
    # the failed attempt raised before any attention ran).
    assert CountingProcessor.calls == len(proxy.unet.attn_processors) * STEPS["num_inference_steps"]
    assert torch.equal(image, reference)


@pytest.mark.parametrize("storage", ["fp8", "nf4"])
def test_a_lora_loaded_under_weight_storage_keeps_its_weights_and_the_undo_is_exact(storage, lora, reference):
    """Under a storage rung, peft would make the LoRA's layers in fp8 (rounding its weights, then
    failing: fp8 has no matmul), and the undo would miss the layers peft wrapped (fp8: their
    weights moved under ``base_layer``; nf4: the wrapper replaced, the LoRA silently dropped).
    The call runs, the LoRA's weights are the file's to the bit, and the undo gives the raw
    pipeline's image with the LoRA exactly."""
    if storage == "nf4":
        pytest.importorskip("bitsandbytes")
    with_lora, without = reference
    pipe = tiny_sdxl()
    proxy = autofit(pipe, plan=(storage,), policy="balanced", cache=False)
    run(proxy, "sdxl", **STEPS)
    proxy.load_lora_weights(dict(lora), adapter_name="style")
    image = run(proxy, "sdxl", **STEPS)
    # The storage rounds the base weights: nearer the LoRA image than the plain one, not equal.
    assert (image - with_lora).abs().max() < (image - without).abs().max()
    loaded = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="style").items()}
    assert loaded.keys() == lora.keys() and all(torch.equal(loaded[k], lora[k]) for k in lora)
    switch_plan(proxy, Plan())  # the storage rung undone, as a relaxation would
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert torch.equal(run(proxy, "sdxl", **STEPS), with_lora)
    proxy.fuse_lora()  # peft's wrappers made for the stored layers fuse into the originals too
    torch.testing.assert_close(run(proxy, "sdxl", **STEPS), with_lora, atol=1e-5, rtol=0)


def test_the_footprint_follows_a_lora_load_and_unload(lora):
    """Predictions are made from the pipeline as it is: the LoRA's bytes are in the footprint
    after the load (as many as its tensors hold), and gone after the unload."""
    proxy = autofit(tiny_sdxl(), cache=False)
    run(proxy, "sdxl", **STEPS)
    before = proxy.autofit.footprint.components["unet"].bytes
    proxy.load_lora_weights(dict(lora), adapter_name="style")
    added = sum(t.numel() * t.element_size() for t in lora.values())
    assert proxy.autofit.footprint.components["unet"].bytes == before + added
    proxy.unload_lora_weights()
    assert proxy.autofit.footprint.components["unet"].bytes == before
