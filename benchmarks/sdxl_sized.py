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


def sdxl_sized(device: str = "cuda", dtype: torch.dtype = torch.float16):
    """unet 2.57B params (4.78 GiB fp16), CLIP-L, CLIP-G, SDXL VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

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
