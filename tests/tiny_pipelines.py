"""Tiny pipelines of many diffusers families, built from configs with random weights and
tokenizers made in code (nothing downloaded; diffusers' own test fixtures are not installed).

Each builder returns (pipeline, inputs): the call's keyword arguments without ``generator``.
Sizes are the smallest each family accepts, so the whole walk runs in CI time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from autofit.testing.tiny import _clip_config, _finish, make_tokenizer, tiny_flux, tiny_sdxl

STEPS = 2


def _image(size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)


def _mask(size: int = 32) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return m


def _sd_unet(in_channels: int = 4, cross: int = 32, attention_first: bool = False):
    from diffusers import UNet2DConditionModel

    down = ("DownBlock2D", "CrossAttnDownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D")
    if attention_first:  # the order T2I adapters' features line up with
        down, up = down[::-1], up[::-1]
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=2)


def _sd_vae(in_channels: int = 3, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=in_channels, out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=2,
        sample_size=32, **kw)


def _sd_parts(in_channels: int = 4) -> dict[str, Any]:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    return dict(
        unet=_sd_unet(in_channels), vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_config(32, 2, 32)),
        tokenizer=make_tokenizer(), scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                                            beta_schedule="scaled_linear", clip_sample=False,
                                                            set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd15():
    from diffusers import StableDiffusionPipeline

    return _finish(StableDiffusionPipeline(**_sd_parts()), torch.float32), dict(
        prompt="a photo of a cat", num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt")


def sd15_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return _finish(StableDiffusionImg2ImgPipeline(**_sd_parts()), torch.float32), dict(
        prompt="a photo of a cat", image=_image(), strength=0.5, num_inference_steps=4, guidance_scale=5.0,
        output_type="pt")


def sd15_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    return _finish(StableDiffusionInpaintPipeline(**_sd_parts(9)), torch.float32), dict(
        prompt="a photo of a cat", image=_image(), mask_image=_mask(), height=32, width=32,
        num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt")


def sd_t2i_adapter():
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    parts = _sd_parts()
    parts["unet"] = _sd_unet(attention_first=True)
    adapter = T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    return _finish(StableDiffusionAdapterPipeline(adapter=adapter, **parts), torch.float32), dict(
        prompt="a photo of a cat", image=_image(), height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=5.0, output_type="pt")


def sd_depth2img():
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    parts = _sd_parts(5)
    for k in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        parts.pop(k)
    torch.manual_seed(0)
    depth = DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
        backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37, is_hybrid=False,
        neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5]))
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_resize=True)
    pipe = StableDiffusionDepth2ImgPipeline(depth_estimator=depth, feature_extractor=processor, **parts)
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", image=_image(), strength=0.5, num_inference_steps=4, guidance_scale=5.0,
        output_type="pt")


def sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = tiny_sdxl()
    return _finish(StableDiffusionXLImg2ImgPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), strength=0.5, num_inference_steps=4, guidance_scale=5.0,
        output_type="pt")


def sdxl_inpaint():
    from diffusers import StableDiffusionXLInpaintPipeline

    base = tiny_sdxl()
    return _finish(StableDiffusionXLInpaintPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), mask_image=_mask(32), height=32, width=32, strength=0.5,
        num_inference_steps=4, guidance_scale=5.0, output_type="pt")


def sdxl_upcast():
    """SDXL with the stock VAE config: an fp16 VAE with ``force_upcast``, cast to fp32 by the
    pipeline (``upcast_vae``) before decoding."""
    pipe = tiny_sdxl()
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    return pipe, dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=STEPS,
                      guidance_scale=5.0, output_type="pt")


def sdxl():
    return tiny_sdxl(), dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=STEPS,
                             guidance_scale=5.0, output_type="pt")


def flux_img2img():
    from diffusers import FluxImg2ImgPipeline

    base = tiny_flux()
    return _finish(FluxImg2ImgPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), height=32, width=32, strength=0.5, num_inference_steps=4,
        guidance_scale=3.5, max_sequence_length=16, output_type="pt")


def ldm_text2img():
    from diffusers import DDIMScheduler, LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(0)
    bert = LDMBertModel(LDMBertConfig(d_model=32, encoder_layers=2, encoder_ffn_dim=37, encoder_attention_heads=4,
                                      head_dim=8, vocab_size=1000, max_position_embeddings=77))
    pipe = LDMTextToImagePipeline(vqvae=_sd_vae(), bert=bert, tokenizer=make_tokenizer(), unet=_sd_unet(),
                                  scheduler=DDIMScheduler(clip_sample=False))
    return _finish(pipe, torch.float32), dict(prompt="a photo of a cat", height=32, width=32,
                                              num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")


def stable_cascade_decoder():
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline
    from diffusers.models import StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    decoder = StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=[16, 32],
        num_attention_heads=[-1, 2], down_num_layers_per_block=[1, 1], up_num_layers_per_block=[1, 1],
        down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
        block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock"],
                               ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]],
        switch_level=None, clip_text_pooled_in_channels=32, effnet_in_channels=4, dropout=[0.0, 0.0])
    vqgan = PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2, levels=2, embed_dim=16, latent_channels=4)
    text_encoder = CLIPTextModelWithProjection(_clip_config(32, 2, 32))
    pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=make_tokenizer(), text_encoder=text_encoder,
                                        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, latent_dim_scale=4.0)
    g = torch.Generator().manual_seed(3)
    return _finish(pipe, torch.float32), dict(
        image_embeddings=torch.randn(1, 4, 4, 4, generator=g), prompt="a photo of a cat",
        num_inference_steps=STEPS, guidance_scale=2.0, output_type="pt")


def animatediff():
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = _sd_unet()
    motion = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=2,
                           motion_num_attention_heads=2, conv_in_channels=None)
    pipe = AnimateDiffPipeline(vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_config(32, 2, 32)),
                               tokenizer=make_tokenizer(), unet=unet, motion_adapter=motion,
                               scheduler=DDIMScheduler(clip_sample=False, beta_schedule="linear"))
    return _finish(pipe, torch.float32), dict(prompt="a photo of a cat", num_frames=2, num_inference_steps=STEPS,
                                              guidance_scale=5.0, output_type="pt")


def _t5(d: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=d, d_kv=8, d_ff=2 * d, num_layers=2, num_heads=4, vocab_size=1000,
                                   relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=2,
                                   decoder_start_token_id=1))


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_sd_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_clip_config(32, 2, 32)), tokenizer=make_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(32, 2, 32)), tokenizer_2=make_tokenizer(),
        text_encoder_3=_t5(), tokenizer_3=make_tokenizer(model_max_length=77))
    return _finish(pipe, torch.float32), dict(prompt="a photo of a cat", height=32, width=32,
                                              num_inference_steps=STEPS, guidance_scale=5.0,
                                              max_sequence_length=16, output_type="pt")


def pixart():
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=make_tokenizer(), text_encoder=_t5(), vae=_sd_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())
    return _finish(pipe, torch.float32), dict(prompt="a photo of a cat", num_inference_steps=STEPS,
                                              guidance_scale=5.0, max_sequence_length=16, use_resolution_binning=False,
                                              output_type="pt")


def ltx_latent_upsample():
    from diffusers import AutoencoderKLLTXVideo, LTXLatentUpsamplePipeline
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    upsampler = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1, dims=3,
                                        spatial_upsample=True, temporal_upsample=False)
    g = torch.Generator().manual_seed(1)
    video = [torch.rand(3, 16, 16, generator=g) for _ in range(5)]
    pipe = LTXLatentUpsamplePipeline(vae=vae, latent_upsampler=upsampler)
    return _finish(pipe, torch.float32), dict(video=video, height=16, width=16, output_type="pt")


def sd_controlnet():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    parts = _sd_parts()
    torch.manual_seed(0)
    # Matches the tiny UNet's down blocks; one stride-2 conditioning conv maps the 32 px control
    # image to the 16 px latent.
    controlnet = ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=2, conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=5.0, output_type="pt")


def sdxl_controlnet():
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    base = tiny_sdxl()
    torch.manual_seed(0)
    u = base.unet.config  # the ControlNet mirrors the UNet's encoder half and its SDXL conditioning
    controlnet = ControlNetModel(
        block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block, in_channels=4,
        down_block_types=u.down_block_types, attention_head_dim=u.attention_head_dim,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=u.transformer_layers_per_block,
        projection_class_embeddings_input_dim=u.projection_class_embeddings_input_dim,
        cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups,
        conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionXLControlNetPipeline(controlnet=controlnet, **base.components)
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", image=_image(64), height=64, width=64, num_inference_steps=STEPS,
        guidance_scale=5.0, output_type="pt")


def kandinsky22():
    """Kandinsky 2.2's decoder: image embeddings in, an image-conditioned UNet, a MoVQ (VQModel)."""
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None)
    # MoVQ's spatial norm has 32 groups: its channels stay multiples of 32.
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(2)
    return _finish(KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq), torch.float32), dict(
        image_embeds=torch.randn(1, 32, generator=g), negative_image_embeds=torch.randn(1, 32, generator=g),
        height=32, width=32, guidance_scale=4.0, num_inference_steps=STEPS, output_type="pt")


def wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    pipe = WanPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       text_encoder=_t5(), tokenizer=make_tokenizer(model_max_length=77))
    return _finish(pipe, torch.float32), dict(
        prompt="dance monkey", negative_prompt="negative", num_inference_steps=STEPS, guidance_scale=6.0,
        height=16, width=16, num_frames=5, max_sequence_length=16, output_type="pt")


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), text_encoder=_t5(),
                             tokenizer=make_tokenizer(model_max_length=77))
    return _finish(pipe, torch.float32), dict(
        prompt="dance monkey", negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0, height=16,
        width=16, num_frames=8, max_sequence_length=16, output_type="pt")


def sana():
    """Sana: a Gemma-2 text encoder, a linear-attention transformer, a deep-compression AE."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32)
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=1000, attn_implementation="eager"))
    pipe = SanaPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                        text_encoder=text_encoder, tokenizer=make_tokenizer(model_max_length=300))
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0, height=32,
        width=32, max_sequence_length=16, complex_human_instruction=None, use_resolution_binning=False,
        output_type="pt")


def flux_inpaint():
    from diffusers import FluxInpaintPipeline

    base = tiny_flux()
    return _finish(FluxInpaintPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), mask_image=_mask(32), height=32, width=32, strength=0.8,
        num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16, output_type="pt")


def flux_kontext():
    """Flux Kontext: the reference image is encoded by the VAE and joins the denoiser's tokens."""
    from diffusers import FluxKontextPipeline

    base = tiny_flux()
    return _finish(FluxKontextPipeline(**base.components), torch.float32), dict(
        prompt="make it red", image=_image(32), height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=3.5, max_sequence_length=16, max_area=32 * 32, _auto_resize=False, output_type="pt")


def sd3_img2img():
    from diffusers import StableDiffusion3Img2ImgPipeline

    base, _ = sd3()
    return _finish(StableDiffusion3Img2ImgPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(32), strength=0.8, num_inference_steps=4, guidance_scale=5.0,
        max_sequence_length=16, output_type="pt")


def pixart_sigma():
    from diffusers import PixArtSigmaPipeline

    base, kwargs = pixart()
    return _finish(PixArtSigmaPipeline(**base.components), torch.float32), kwargs


def sdxl_pag():
    """Perturbed-attention guidance: the UNet runs a third, perturbed branch in each batch."""
    from diffusers import StableDiffusionXLPAGPipeline

    base = tiny_sdxl()
    pipe = StableDiffusionXLPAGPipeline(**base.components, pag_applied_layers=["mid"])
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", height=32, width=32, num_inference_steps=STEPS, guidance_scale=5.0,
        pag_scale=3.0, output_type="pt")


def sdxl_controlnet_img2img():
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    base, _ = sdxl_controlnet()
    return _finish(StableDiffusionXLControlNetImg2ImgPipeline(**base.components), torch.float32), dict(
        prompt="a photo of a cat", image=_image(64), control_image=_image(64, seed=2), height=64, width=64,
        strength=0.8, num_inference_steps=4, guidance_scale=5.0, output_type="pt")


def flux_controlnet():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = tiny_flux()
    t = base.transformer.config
    torch.manual_seed(0)
    controlnet = FluxControlNetModel(
        patch_size=t.patch_size, in_channels=t.in_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
        joint_attention_dim=t.joint_attention_dim, pooled_projection_dim=t.pooled_projection_dim,
        axes_dims_rope=t.axes_dims_rope)
    pipe = FluxControlNetPipeline(controlnet=controlnet, **base.components)
    return _finish(pipe, torch.float32), dict(
        prompt="a photo of a cat", control_image=_image(32), height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=3.5, controlnet_conditioning_scale=0.5, max_sequence_length=16, output_type="pt")


# family -> builder; the walk covers each stage the pipeline has.
BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "StableDiffusionPipeline": sd15,
    "StableDiffusionImg2ImgPipeline": sd15_img2img,
    "StableDiffusionInpaintPipeline": sd15_inpaint,
    "StableDiffusionAdapterPipeline": sd_t2i_adapter,
    "StableDiffusionDepth2ImgPipeline": sd_depth2img,
    "StableDiffusionXLImg2ImgPipeline": sdxl_img2img,
    "StableDiffusionXLInpaintPipeline": sdxl_inpaint,
    "StableDiffusionXLPipeline (fp16 VAE, force_upcast)": sdxl_upcast,
    "FluxImg2ImgPipeline": flux_img2img,
    "LDMTextToImagePipeline": ldm_text2img,
    "StableCascadeDecoderPipeline": stable_cascade_decoder,
    "AnimateDiffPipeline": animatediff,
    "StableDiffusion3Pipeline": sd3,
    "PixArtAlphaPipeline": pixart,
    "LTXLatentUpsamplePipeline": ltx_latent_upsample,
    "StableDiffusionControlNetPipeline": sd_controlnet,
    "StableDiffusionXLControlNetPipeline": sdxl_controlnet,
    "KandinskyV22Pipeline": kandinsky22,
    "WanPipeline": wan,
    "CogVideoXPipeline": cogvideox,
    "SanaPipeline": sana,
    "FluxInpaintPipeline": flux_inpaint,
    "FluxKontextPipeline": flux_kontext,
    "StableDiffusion3Img2ImgPipeline": sd3_img2img,
    "PixArtSigmaPipeline": pixart_sigma,
    "StableDiffusionXLPAGPipeline": sdxl_pag,
    "StableDiffusionXLControlNetImg2ImgPipeline": sdxl_controlnet_img2img,
    "FluxControlNetPipeline": flux_controlnet,
}
