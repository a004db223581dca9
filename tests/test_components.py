"""A component's stage comes from what it is, then from the pipeline's offload sequence, and
only last (logged) from its name."""

import structlog
import torch

from autofit.facts.components import entry_points, next_stage, role_of


def test_components_named_unlike_sd_get_their_stage_from_their_class():
    """AudioLDM2's language model and vocoder, LTX's latent upsampler, CLAP: stage by class, under any name."""
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel
    from transformers import (ClapConfig, ClapModel, GPT2Config, GPT2Model, SpeechT5HifiGan,
                              SpeechT5HifiGanConfig)

    lm = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=100, n_positions=16))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=8, upsample_rates=[2],
                                                    upsample_kernel_sizes=[4], resblock_kernel_sizes=[3],
                                                    resblock_dilation_sizes=[[1]]))
    upsampler = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1)
    clap = ClapModel(ClapConfig(text_config=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                                 num_hidden_layers=1, vocab_size=100, projection_dim=8),
                                audio_config=dict(hidden_size=16, depths=[1], num_attention_heads=[1], spec_size=16,
                                                  window_size=4, patch_embeds_hidden_size=8, num_mel_bins=16,
                                                  projection_dim=8),
                                projection_dim=8))
    with structlog.testing.capture_logs() as logs:
        assert role_of("language_model", lm) == "encode"
        assert role_of("anything", lm) == "encode"
        assert role_of("vocoder", vocoder) == "decode"
        assert role_of("latent_upsampler", upsampler) == "denoise"
        assert role_of("text_encoder", clap) == "encode"
    assert not [e for e in logs if e["event"] == "autofit.role_from_name"]
    assert ("get_text_features", "encode") in entry_points("text_encoder", clap, "encode")


def test_offload_sequence_then_name_as_last_fallback_logged():
    """A module whose class says nothing takes its place in model_cpu_offload_seq; failing that, its name."""
    plain = torch.nn.Linear(2, 2)
    seq = "text_encoder->mystery->unet->vae"
    assert role_of("mystery", plain, offload_seq=seq) == "encode"
    with structlog.testing.capture_logs() as logs:
        assert role_of("unet_plain", plain) == "denoise"
    assert [e["component"] for e in logs if e["event"] == "autofit.role_from_name"] == ["unet_plain"]


def test_a_vae_has_an_encode_and_a_decode_stage():
    """A VAE's encode is the vae_encode stage, its decode the decode stage."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=2, latent_channels=4)
    assert role_of("vae", vae) == "decode"
    assert sorted(entry_points("vae", vae, "decode")) == [("decode", "decode"), ("encode", "vae_encode")]


def test_glue_oom_blamed_on_the_next_component_call():
    """Known call order: the next call's stage; else denoise after encoders, else the stage running."""
    known = ["encode", "encode", "vae_encode", "denoise", "denoise", "decode"]
    assert next_stage(["encode", "encode"], known) == "vae_encode"
    assert next_stage(["encode", "encode", "vae_encode", "denoise", "denoise"], known) == "decode"
    assert next_stage(["encode"], None) == "denoise"
    assert next_stage(["encode", "denoise"], None) == "denoise"
    assert next_stage([], None) == "encode"
