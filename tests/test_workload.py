"""The workload autofit plans for is the one the pipeline computes for the call."""

import torch

from autofit.engine.preflight import workload

from tiny_pipelines import animatediff, sd15, sd15_img2img


def test_default_size_comes_from_the_denoiser_config():
    """Without default_sample_size, the size is unet.config.sample_size x vae_scale_factor (not 1024)."""
    for build in (animatediff, sd15):
        pipe, _ = build()
        assert getattr(pipe, "default_sample_size", None) is None
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        wl = workload(pipe, (), {"prompt": "a cat"})
        assert (wl.height, wl.width) == (side, side) != (1024, 1024)


def test_animatediff_workload_matches_its_output():
    """AnimateDiff's planned frames and size are those of the video it makes."""
    pipe, kwargs = animatediff()
    wl = workload(pipe, (), {k: v for k, v in kwargs.items() if k not in ("height", "width")})
    video = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert (wl.frames, wl.height, wl.width) == tuple(video.shape[1:2]) + tuple(video.shape[-2:])


def test_batch_from_prompt_embeds_and_images_per_prompt():
    """Three prompts given as embeddings are a batch of 3; images per prompt multiply it."""
    pipe, _ = sd15()
    embeds = torch.zeros(3, 77, 32)
    assert workload(pipe, (), {"prompt_embeds": embeds}).batch == 3
    assert workload(pipe, (), {"prompt_embeds": embeds, "num_images_per_prompt": 2}).batch == 6
    assert workload(pipe, (), {"prompt": ["a", "b"], "num_images_per_prompt": 2}).batch == 4


def test_image_to_image_size_is_the_image_size():
    """img2img without height/width makes an image the size of its input."""
    pipe, kwargs = sd15_img2img()
    image = torch.rand(2, 3, 48, 40)
    wl = workload(pipe, (), {"prompt": None, "image": image})
    assert (wl.height, wl.width, wl.batch) == (48, 40, 2)
