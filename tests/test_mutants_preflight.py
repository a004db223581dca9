"""Tests that kill the mutants mutmut found alive in engine/preflight.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). The workload autofit plans a call for must be the call the pipeline really
makes, so the reference is the pipeline itself: the images it returns (how many, what size), the
steps its scheduler ran, and whether it ran classifier-free guidance (``do_classifier_free_guidance``).
"""

import numpy as np
import PIL.Image
import pytest
import torch

from autofit.engine.preflight import batch_of, workload

from tiny_pipelines import animatediff, sd15, sd15_img2img


def _run(pipe, **kwargs):
    """The call's images as a (N, C, H, W) tensor (or (N, F, C, H, W) for a video)."""
    kwargs.setdefault("num_inference_steps", 1)
    out = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0))
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module")
def sd():
    return sd15()[0]


@pytest.fixture(scope="module")
def img2img():
    return sd15_img2img()[0]


@pytest.mark.parametrize("args, kwargs", [
    ((), {"prompt": "a cat"}),
    (("a cat",), {}),
    ((["a cat", "a dog"],), {}),
    ((), {"prompt": ["a cat", "a dog", "a bird"]}),
    ((), {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 3}),
    ((), {"prompt": "a cat", "num_images_per_prompt": 2}),
    ((), {"prompt_embeds": "3 prompts"}),
    ((), {"prompt_embeds": "2 prompts", "num_images_per_prompt": 2}),
])
def test_the_batch_is_the_number_of_images_the_pipeline_returns(sd, args, kwargs):
    """mutants: engine.preflight.x_batch_of__mutmut_*"""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("prompt_embeds"), str):
        n = int(kwargs["prompt_embeds"].split()[0])
        kwargs["prompt_embeds"] = torch.randn(n, 77, 32, generator=torch.Generator().manual_seed(1))
        kwargs["negative_prompt_embeds"] = torch.zeros(n, 77, 32)
    planned = batch_of(args, kwargs)
    images = sd(*args, **kwargs, num_inference_steps=1, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert planned == images.shape[0]
    assert workload(sd, args, kwargs).batch == images.shape[0]


def _pil(h, w):
    return PIL.Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8))


@pytest.mark.parametrize("make, n", [
    (lambda: _pil(48, 40), 1),  # PIL: .size is (width, height)
    (lambda: [_pil(40, 48), _pil(40, 48)], 2),
    (lambda: np.full((48, 40, 3), 0.5, dtype=np.float32), 1),  # an array: (H, W, C)
    (lambda: np.full((2, 40, 48, 3), 0.5, dtype=np.float32), 2),
    (lambda: torch.full((2, 3, 48, 40), 0.5), 2),  # a tensor: (N, C, H, W)
    (lambda: torch.full((1, 3, 40, 48), 0.5), 1),
])
def test_an_image_to_image_call_is_planned_at_the_size_and_count_of_what_it_makes(img2img, make, n):
    """No height/width: the size of the input image, which the pipeline keeps; no prompt list:
    the images given.
    mutants: engine.preflight.x__image_hw__mutmut_*, x__count__mutmut_*, x_workload__mutmut_*"""
    image = make()
    prompt = ["a cat"] * n
    wl = workload(img2img, (), {"prompt": prompt, "image": image, "strength": 1.0})
    out = _run(img2img, prompt=prompt, image=image, strength=1.0)
    assert (wl.batch, wl.height, wl.width) == (out.shape[0], *out.shape[-2:])
    assert workload(img2img, (), {"prompt": None, "image": image}).batch == n  # counted from the images


def test_a_video_given_as_frames_is_planned_at_its_frames_size():
    """A video input is a list of frames (PIL images), or a batch of such lists; its size is a
    frame's (PIL's own width and height).
    mutants: engine.preflight.x__image_hw__mutmut_*"""
    from autofit.engine.preflight import _image_hw

    frame = _pil(24, 56)
    assert _image_hw([frame, frame]) == (frame.height, frame.width) == (24, 56)
    assert _image_hw([[frame, frame]]) == (24, 56)
    assert _image_hw([]) is None and _image_hw([[]]) is None and _image_hw(None) is None
    assert _image_hw(torch.zeros(3, 24, 56)) == (24, 56)
    assert _image_hw(np.zeros((24, 56, 3))) == (24, 56)
    assert _image_hw(np.zeros((24, 56))) is None  # no channels: not an image autofit can size


def test_a_call_without_a_size_is_planned_at_the_size_the_pipeline_makes(sd):
    """mutants: engine.preflight.x__config_size__mutmut_*, x_workload__mutmut_*"""
    wl = workload(sd, (), {"prompt": "a cat"})
    out = _run(sd, prompt="a cat")
    assert (wl.height, wl.width) == tuple(out.shape[-2:])
    wl = workload(sd, (), {"prompt": "a cat", "height": 48, "width": 40})
    out = _run(sd, prompt="a cat", height=48, width=40)
    assert (wl.height, wl.width) == tuple(out.shape[-2:])


def test_steps_and_guidance_are_what_the_pipeline_runs(sd):
    """The defaults of ``__call__`` when the call leaves them out or passes None (50 steps for
    SD 1.5, guidance 7.5: classifier-free guidance on); the call's own values otherwise.
    mutants: engine.preflight.x_workload__mutmut_*, x_call_defaults__mutmut_*"""
    for kwargs in ({}, {"num_inference_steps": 3}, {"guidance_scale": 1.0}, {"guidance_scale": 3.0},
                   {"num_inference_steps": None, "guidance_scale": None}):
        wl = workload(sd, (), {"prompt": "a cat", **kwargs})
        sd(prompt="a cat", **{k: v for k, v in kwargs.items() if v is not None}, output_type="latent")
        assert wl.steps == len(sd.scheduler.timesteps), kwargs
        assert wl.cfg == sd.do_classifier_free_guidance, kwargs


def test_a_video_call_is_planned_at_the_frames_it_makes():
    """AnimateDiff makes 16 frames when ``num_frames`` is left out (its ``__call__`` default).
    mutants: engine.preflight.x_workload__mutmut_*"""
    pipe, kwargs = animatediff()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_frames", "num_inference_steps", "output_type")}
    wl = workload(pipe, (), kwargs)
    video = _run(pipe, **kwargs)
    assert (wl.frames, wl.height, wl.width) == (video.shape[1], *video.shape[-2:])
    assert wl.frames == 16
