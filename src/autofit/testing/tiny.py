"""Tiny, offline diffusers pipelines built from configs with random weights.

Used by the tests, the demo and the CPU smoke path of the benchmarks. Nothing is downloaded:
tokenizers are word-level vocabularies made in code. ``scale`` widens the models so the same
builders serve GPU benchmarks at larger sizes.
"""

from __future__ import annotations

import torch

_WORDS = (
    "a photo of an astronaut riding horse on the moon cat dog red blue green painting "
    "city night sky mountain lake sunset portrait detailed high quality"
).split()


def require_text_models() -> None:
    """The tiny pipelines' text encoders and tokenizer come from transformers and tokenizers, which
    autofit itself does not need: say how to get them."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"autofit.testing builds tiny pipelines with transformers text encoders and a tokenizers "
            f"vocabulary ({exc}). Install them with: pip install 'autofit-diffusers[testing]'"
        ) from exc


def make_tokenizer(model_max_length: int = 77):
    """A word-level fast tokenizer with CLIP-like special tokens (bos=0, pad=1, eos=2)."""
    require_text_models()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _clip_config(hidden: int, layers: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=max(1, hidden // 16),
        num_hidden_layers=layers,
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def tiny_sdxl(*, seed: int = 0, dtype: torch.dtype = torch.float32, scale: int = 1):
    """An SDXL-class pipeline (UNet denoiser, two CLIP encoders, KL VAE) with random weights."""
    require_text_models()
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    w = 32 * scale
    unet = UNet2DConditionModel(
        block_out_channels=(w, 2 * w),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + w,
        cross_attention_dim=2 * w,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(w, 2 * w),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=1,
        sample_size=128,
        force_upcast=False,
    )
    text_encoder = CLIPTextModel(_clip_config(w, 2, w))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(w, 2, w))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
        ),
    )
    return _finish(pipe, dtype)


def _finish(pipe, dtype: torch.dtype):
    # Built from configs, the modules are in training mode (dropout on); from_pretrained would
    # have put them in eval mode.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_flux(*, seed: int = 0, dtype: torch.dtype = torch.float32, scale: int = 1):
    """A Flux-class pipeline (MMDiT transformer, CLIP + T5 encoders, 16-channel-style KL VAE)."""
    require_text_models()
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    w = 32 * scale
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=4 * scale,
        joint_attention_dim=w,
        pooled_projection_dim=w,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=1,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    text_encoder = CLIPTextModel(_clip_config(w, 2, w))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=w,
            d_kv=8,
            d_ff=2 * w,
            num_layers=2,
            num_heads=4,
            vocab_size=1000,
            relative_attention_num_buckets=8,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(model_max_length=512),
        transformer=transformer,
    )
    return _finish(pipe, dtype)
