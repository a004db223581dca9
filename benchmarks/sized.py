"""SDXL-sized and Flux-sized pipelines built from configs with random weights (no hub), at the
published sizes. Init happens directly on the target device, which is fast on a GPU."""

from __future__ import annotations

import torch

from autofit.testing import make_tokenizer


def _clip(hidden: int, layers: int, heads: int, inter: int, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu", projection_dim=proj,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def sdxl_sized_unet(device: str = "cuda", dtype: torch.dtype = torch.float16):
    """The SDXL UNet alone: 2.57B params (4.78 GiB fp16), in eval mode."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
    return unet.to(dtype=dtype).eval()


def sdxl_sized(device: str = "cuda", dtype: torch.dtype = torch.float16):
    """unet 2.57B params (4.78 GiB fp16), CLIP-L, CLIP-G, SDXL VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = sdxl_sized_unet(device, dtype)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025, force_upcast=False,
        )
        te = CLIPTextModel(_clip(768, 12, 12, 3072, 768))
        te2 = CLIPTextModelWithProjection(_clip(1280, 32, 20, 5120, 1280))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=make_tokenizer(), tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
    )
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def flux_sized(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """FLUX.1-dev sized: transformer 11.9B params (22.2 GiB bf16), T5-XXL encoder, CLIP-L, 16-ch VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, sample_size=1024, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        )
        te = CLIPTextModel(_clip(768, 12, 12, 3072, 768))
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                     vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                     pad_token_id=1, eos_token_id=2))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15),
        vae=vae, text_encoder=te, tokenizer=make_tokenizer(), text_encoder_2=t5,
        tokenizer_2=make_tokenizer(model_max_length=512), transformer=transformer,
    )
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
