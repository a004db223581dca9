"""Which component call belongs to which stage, and the wrappers that retry a failed call in place.

Stages are found by component role, not by pipeline class: text/image encoders -> ``encode``;
unet / transformer / prior / controlnet -> ``denoise``; ``vae.decode`` -> ``decode``. Moving
weights onto the device or applying a strategy is ``load`` (handled by the runtime, not here).

The wrappers are instance attributes (``module.forward`` / ``vae.decode``) installed only for the
duration of a call, always *outermost*: strategies are applied while the wrappers are suspended,
so accelerate / diffusers hooks sit inside them and an OOM raised while a hook moves weights is
caught here too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .oom import OOMInfo, classify

STAGES = ("load", "encode", "denoise", "decode")

_DENOISER_PREFIXES = ("unet", "transformer", "prior", "controlnet", "decoder_unet")
_VAE_PREFIXES = ("vae", "movq", "vqvae")
_ENCODER_MARKERS = ("text_encoder", "image_encoder")


def role_of(name: str) -> str | None:
    """The stage a pipeline component belongs to, from its name in ``pipe.components``."""
    if any(m in name for m in _ENCODER_MARKERS):
        return "encode"
    if name.startswith(_DENOISER_PREFIXES):
        return "denoise"
    if name.startswith(_VAE_PREFIXES):
        return "decode"
    return None


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@dataclass(slots=True)
class _Slot:
    name: str
    module: torch.nn.Module
    attr: str
    stage: str
    inner: Callable[..., Any] | None = None
    wrapper: Callable[..., Any] | None = None
    had_instance_attr: bool = False


class StageTracker:
    """Installs the retrying wrappers on a pipeline's components for one call.

    ``runtime`` provides ``before(slot_name, stage, args, kwargs) -> (args, kwargs)``,
    ``after(slot_name, stage)`` and ``recover(stage, component, failure, seconds) -> None``
    (which raises when nothing is left to try).
    """

    def __init__(self, pipe: Any, runtime: Any):
        self._pipe = pipe
        self._runtime = runtime
        self._slots: list[_Slot] = []
        self.last_stage: str | None = None

    def _targets(self) -> Iterator[_Slot]:
        for name, module in module_components(self._pipe).items():
            role = role_of(name)
            if role is None:
                continue
            if role == "decode":
                if callable(getattr(module, "decode", None)):
                    yield _Slot(name, module, "decode", "decode")
            else:
                yield _Slot(name, module, "forward", role)

    @property
    def installed(self) -> bool:
        return bool(self._slots)

    def install(self) -> None:
        if self._slots:
            return
        for slot in self._targets():
            slot.had_instance_attr = slot.attr in slot.module.__dict__
            slot.inner = getattr(slot.module, slot.attr)
            slot.wrapper = self._make_wrapper(slot)
            setattr(slot.module, slot.attr, slot.wrapper)
            self._slots.append(slot)

    def uninstall(self) -> None:
        for slot in reversed(self._slots):
            current = slot.module.__dict__.get(slot.attr)
            if current is not slot.wrapper:
                continue  # something (e.g. accelerate re-hooking at the end of a call) replaced us
            if slot.had_instance_attr:
                setattr(slot.module, slot.attr, slot.inner)
            else:
                delattr(slot.module, slot.attr)
        self._slots.clear()

    def _make_wrapper(self, slot: _Slot) -> Callable[..., Any]:
        tracker = self

        def autofit_stage_call(*args: Any, **kwargs: Any) -> Any:
            tracker.last_stage = slot.stage
            while True:
                args, kwargs = tracker._runtime.before(slot.name, slot.stage, args, kwargs)
                started = time.perf_counter()
                failure: OOMInfo | None = None
                broken: str | None = None
                try:
                    # Re-read the inner callable: recovery may have re-hooked the module.
                    inner = tracker._inner_of(slot)
                    chunks = tracker._runtime.denoise_chunks if slot.stage == "denoise" else 1
                    out = inner(*args, **kwargs) if chunks == 1 else split_call(inner, args, kwargs, chunks)
                except BaseException as exc:
                    failure = classify(exc)
                    if failure is None:
                        # A one-way rung applied to this component and not yet seen to work is
                        # the likely cause: undo it and retry. Anything else passes through.
                        if not (isinstance(exc, Exception) and tracker._runtime.can_roll_back(slot.name)):
                            raise
                        broken = f"{type(exc).__name__}: {str(exc)[:300]}"
                # Outside the except block: the exception and the frames it held are gone.
                if broken is not None:
                    tracker._runtime.roll_back(slot.stage, slot.name, broken)
                    continue
                if failure is None:
                    tracker._runtime.after(slot.name, slot.stage)
                    return out
                tracker._runtime.recover(slot.stage, slot.name, failure, time.perf_counter() - started)

        autofit_stage_call.__wrapped__ = slot.inner  # type: ignore[attr-defined]
        return autofit_stage_call

    def _inner_of(self, slot: _Slot) -> Callable[..., Any]:
        for live in self._slots:
            if live.name == slot.name:
                return live.inner  # type: ignore[return-value]
        # Suspended (between uninstall and install): call whatever the module has now.
        return getattr(slot.module, slot.attr)


# ---- batch splitting (the split_batch rungs) -----------------------------------------------
def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def _take(obj: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _take(v, start, stop, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, start, stop, n) for v in obj)
    return obj


def _join(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0) if first.dim() >= 1 else first
    if isinstance(first, dict):  # includes diffusers' BaseOutput (an OrderedDict dataclass)
        joined = {k: _join([p[k] for p in parts]) for k in first}
        return type(first)(**joined)
    if isinstance(first, (list, tuple)):
        return type(first)(_join(list(items)) for items in zip(*parts))
    return first


def split_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], chunks: int) -> Any:
    """Call ``fn`` on ``chunks`` slices of the batch and join the outputs: the same result as one
    call, with a fraction of the activation memory. Tensors whose first dimension is not the
    batch (ids, scalar timesteps) are passed whole."""
    n = _batch_of(args, kwargs)
    if n is None or n < 2:
        return fn(*args, **kwargs)
    size = -(-n // min(chunks, n))
    parts = [fn(*_take(args, s, s + size, n), **_take(kwargs, s, s + size, n)) for s in range(0, n, size)]
    return _join(parts)
