"""Which stage each pipeline component belongs to, from what the component *is* (its class), then
where the pipeline's ``model_cpu_offload_seq`` puts it, and only last from its name (logged).

Stages: ``encode`` (text and image encoders, language models, T2I adapters, depth estimators:
what turns the inputs into conditioning once per call), ``denoise`` (UNets, diffusion
transformers, priors, ControlNets, latent upsamplers: latent-space networks), ``decode`` (VAEs,
VQ models, vocoders, safety checkers: what runs on the final latents). A VAE's ``encode`` method
is its own stage, ``vae_encode`` (img2img, inpaint, video-to-video). Moving weights onto the
device or applying a rung is ``load`` (the plan switch).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from autofit.facts.compiled import eager_module
from autofit._diffusers import module_components
from autofit.events import emit

STAGES = ("load", "encode", "vae_encode", "denoise", "decode")

__all__ = ["STAGES", "CALL_ORDER", "role_of", "roles", "entry_points", "is_vae", "next_stage"]
# The order in which a pipeline calls its stages, when it has not been seen yet.
CALL_ORDER = ("encode", "vae_encode", "denoise", "decode")

# Class-name markers, matched against every class of the component's MRO, first rule wins.
_VAE = ("Autoencoder", "VQModel", "VAE", "VQGAN")
_AFTER_DECODE = ("HifiGan", "Vocoder", "Vocos", "SafetyChecker", "Renderer", "Watermark")
_DENOISER_FIRST = ("MotionAdapter",)  # merged into the UNet in AnimateDiff: part of the denoiser
_CONDITION = ("Adapter", "DepthEstimation", "ForDepth", "Projection", "ImageNormalizer", "ImageEncoder",
              "TextEncoder", "Redux")
_DENOISER = ("UNet", "Transformer", "Prior", "ControlNet", "UVit", "Upsampler", "DiT")

# Name fallback (the old rule), for modules whose class says nothing.
_DENOISER_PREFIXES = ("unet", "transformer", "prior", "controlnet", "decoder_unet", "decoder")
_VAE_PREFIXES = ("vae", "movq", "vqvae", "vqgan")
_ENCODER_MARKERS = ("text_encoder", "image_encoder", "bert", "language_model", "adapter", "depth_estimator")

# Methods that are a component's entry points besides forward (transformers' CLIPModel/ClapModel).
_ENCODER_METHODS = ("get_text_features", "get_image_features")

_guessed: set[tuple[str, str]] = set()


def _named_class(class_name: str) -> type | None:
    """A class named in a model_index.json, from diffusers or transformers, without building it."""
    import importlib

    for lib in ("diffusers", "transformers"):
        try:
            found = getattr(importlib.import_module(lib), class_name, None)
        except Exception:  # a broken install must not break `autofit plan`
            found = None
        if isinstance(found, type):
            return found
    return None


def _mro_names(module: Any = None, class_name: str | None = None) -> list[str]:
    # A compiled component (torch.compile(module)) is what the module under it is.
    cls = type(eager_module(module)) if module is not None else _named_class(class_name) if class_name else None
    if cls is None:
        return [class_name] if class_name else []
    # Mixins say what a class can do, not what it is (every diffusers model is a PeftAdapterMixin).
    return [c.__name__ for c in cls.__mro__ if not c.__name__.endswith("Mixin")]


def _has(names: list[str], markers: tuple[str, ...]) -> bool:
    return any(m in n for n in names for m in markers)


def role_from_class(module: Any = None, class_name: str | None = None) -> str | None:
    """The stage a component's class says it belongs to, or None when it says nothing."""
    names = _mro_names(module, class_name)
    if not names:
        return None
    if _has(names, _VAE):
        return "decode"
    if _has(names, _AFTER_DECODE):
        return "decode"
    if _has(names, _DENOISER_FIRST):
        return "denoise"
    if _has(names, _CONDITION):
        return "encode"
    transformers_model = "PreTrainedModel" in names
    if not transformers_model and _has(names, _DENOISER):
        return "denoise"
    if transformers_model:
        return "encode"  # text, image and language models (CLIP, T5, GPT-2, LDM's BERT, Llama...)
    return None


def role_from_offload_seq(name: str, seq: str | None) -> str | None:
    """From where ``model_cpu_offload_seq`` (the pipeline's call order) puts ``name``: before its
    first denoiser-named entry -> encode, after the last -> decode."""
    if not seq:
        return None
    order = [s.strip() for s in seq.split("->") if s.strip()]
    if name not in order:
        return None
    den = [i for i, n in enumerate(order) if n.startswith(_DENOISER_PREFIXES[:-1])]
    if not den:
        return None
    i = order.index(name)
    return "encode" if i < den[0] else "decode" if i > den[-1] else "denoise"


def role_from_name(name: str) -> str | None:
    if any(m in name for m in _ENCODER_MARKERS):
        return "encode"
    if name.startswith(_VAE_PREFIXES):
        return "decode"
    if name.startswith(_DENOISER_PREFIXES):
        return "denoise"
    return None


def role_of(name: str, module: Any = None, *, class_name: str | None = None, offload_seq: str | None = None) -> str | None:
    """The stage a pipeline component belongs to: from its class (``module`` or ``class_name``),
    else from the pipeline's ``model_cpu_offload_seq``, else (logged) from its name."""
    role = role_from_class(module, class_name)
    if role is None:
        role = role_from_offload_seq(name, offload_seq)
    if role is None:
        role = role_from_name(name)
        cls = type(module).__name__ if module is not None else class_name or "?"
        if (name, cls) not in _guessed:
            _guessed.add((name, cls))
            emit("role_from_name", stage="load", action=role or "none", component=name, class_name=cls)
    return role


def is_vae(module: Any) -> bool:
    """A VAE or VQ model: it encodes images to latents and decodes them back."""
    return _has(_mro_names(module), _VAE) and callable(getattr(module, "decode", None))


def entry_points(name: str, module: torch.nn.Module, role: str | None) -> list[tuple[str, str]]:
    """(method, stage) of each call of ``module`` a pipeline makes, to be wrapped."""
    if role is None:
        return []
    if is_vae(eager_module(module)):
        out = [("decode", "decode")]
        if callable(getattr(module, "encode", None)):
            out.append(("encode", "vae_encode"))
        return out
    out = [("forward", role)]
    if role == "encode":
        out += [(m, role) for m in _ENCODER_METHODS if callable(getattr(type(module), m, None))]
    return out


_ROLES: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], dict[str, str | None]]]" = weakref.WeakKeyDictionary()


def roles(pipe: Any) -> dict[str, str | None]:
    """name -> stage for every module of ``pipe`` (cached per pipeline while its modules stay)."""
    comps = module_components(pipe)
    ident = tuple(id(m) for m in comps.values())
    try:
        cached = _ROLES.get(pipe)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == ident:
        return cached[1]
    seq = getattr(pipe, "model_cpu_offload_seq", None)
    found = {n: role_of(n, m, offload_seq=seq) for n, m in comps.items()}
    try:
        _ROLES[pipe] = (ident, found)
    except TypeError:
        pass
    return found


def next_stage(entered: list[str], known: list[str] | None) -> str:
    """The stage an OOM between component calls is blamed on: the stage of the next component
    call. ``entered`` is this attempt's stage of each component call so far; ``known`` the
    same list from the pipeline's last successful call. When this attempt is a prefix of it, the
    next call is known. Else: the first stage before any call, the denoiser after the encoders
    (preparing latents), and otherwise the stage being run (the scheduler's step between two
    denoiser calls works on the denoiser's latents)."""
    if known and len(known) > len(entered) and known[:len(entered)] == entered:
        return known[len(entered)]
    if not entered:
        return known[0] if known else CALL_ORDER[0]
    return "denoise" if entered[-1] == "encode" else entered[-1]
