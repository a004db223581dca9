"""The wrappers that retry a failed component call in place, and the split calls of the
split_batch rungs.

The wrappers are instance attributes (``module.forward`` / ``vae.decode``) installed only for the
duration of a call, always *outermost*: rungs are applied while the wrappers are suspended, so
accelerate / diffusers hooks sit inside them and an OOM raised while a hook moves weights is
caught here too. Which stage a component belongs to is :func:`autofit.facts.components.roles`; a VAE's
``encode`` is the ``vae_encode`` stage, its ``decode`` the ``decode`` stage.

Each component's ``to`` is wrapped too, for pipeline code between component calls that moves or
casts a component (SDXL's ``upcast_vae`` casts the VAE to fp32 before decoding): an OOM there is
the stage of that component's next call (a VAE's: ``decode`` once the denoiser has run, else
``vae_encode``), and the cast is retried in place after that stage's rung. A wrapper called while
another one is running (accelerate's hooks calling ``to`` inside ``forward``, ``forward`` inside
``get_text_features``) passes through: the outer one retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import weakref

from autofit.facts import compiled
from autofit.facts.components import entry_points, next_stage, roles
from autofit.engine.oom import OOMInfo, classify
from autofit.plan import Plan


# The order in which each pipeline entered its stages in its longest call seen.
_ORDER: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class _Slot:
    name: str
    module: torch.nn.Module
    attr: str
    stage: str
    inner: Callable[..., Any] | None = None
    wrapper: Callable[..., Any] | None = None
    had_instance_attr: bool = False
    compiled: list[compiled.Region] | None = None  # the component's compiled regions (empty: eager)


class StageHooks(Protocol):
    """What the stage wrappers need from whoever runs the call (the runtime)."""

    @property
    def plan(self) -> Plan:
        """The plan in force (compiled components run eager under some plans)."""
        ...

    @property
    def denoise_chunks(self) -> int:
        """How many pieces the denoiser's batch is cut into (1: not split)."""
        ...

    def before(self, name: str, stage: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A component of ``stage`` is about to run: the arguments to run it with."""
        ...

    def after(self, name: str, stage: str) -> None:
        """A component of ``stage`` produced its output."""
        ...

    def on_oom(self, stage: str, component: str, failure: OOMInfo, seconds: float) -> None:
        """A component ran out of memory (called outside ``except``): make the retry possible,
        or raise when nothing is left to try."""
        ...

    def can_roll_back(self, name: str) -> bool:
        """Whether a one-way rung not yet seen to work is applied to ``name``."""
        ...

    def roll_back(self, stage: str, name: str, error: str) -> None:
        """``name`` failed (not with an OOM) under such a rung: undo it."""
        ...


class StageWrappers:
    """Installs the retrying wrappers on a pipeline's components, for each attempt of a call,
    and talks to ``hooks`` (a :class:`StageHooks`)."""

    def __init__(self, pipe: Any, hooks: StageHooks):
        self._pipe = pipe
        self._hooks = hooks
        self._slots: list[_Slot] = []
        self._running = 0  # wrappers in progress (an inner one passes through)
        self._entered: list[str] = []  # the stage of each component call of this attempt, in order

    def new_attempt(self) -> None:
        """An attempt starts: no stage entered yet."""
        self._entered = []

    def _targets(self) -> Iterator[_Slot]:
        for name, role in roles(self._pipe).items():
            module = getattr(self._pipe, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            for attr, stage in entry_points(name, module, role):
                yield _Slot(name, module, attr, stage)
            if role is not None:
                yield _Slot(name, module, "to", role)

    def _stage_of_cast(self, slot: _Slot) -> str:
        """The stage of the next call of the component ``slot.module`` is cast or moved for."""
        if slot.stage == "decode" and any(a == "encode" for a, _ in entry_points(slot.name, slot.module, "decode")):
            return "decode" if "denoise" in self._entered else "vae_encode"
        return slot.stage

    def _enter(self, stage: str) -> None:
        self._entered.append(stage)

    @property
    def installed(self) -> bool:
        return bool(self._slots)

    def install(self) -> None:
        if self._slots:
            return
        for slot in self._targets():
            slot.had_instance_attr = slot.attr in slot.module.__dict__
            slot.compiled = compiled.regions(slot.module) if slot.attr != "to" else []
            slot.inner = getattr(slot.module, slot.attr)
            slot.wrapper = self._make_wrapper(slot)
            setattr(slot.module, slot.attr, slot.wrapper)
            self._slots.append(slot)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Take the wrappers off while rungs are applied (they go *under* the wrappers)."""
        reinstall = self.installed
        if reinstall:
            self.uninstall()
        try:
            yield
        finally:
            if reinstall:
                self.install()

    def glue_stage(self) -> str:
        """The stage an OOM raised between component calls is blamed on: the stage of the next
        component call (known from the pipeline's last successful call, see
        :func:`autofit.facts.components.next_stage`)."""
        return next_stage(self._entered, _ORDER.get(self._pipe))

    def remember(self) -> None:
        """The call succeeded: its sequence of stages is what the next call will do."""
        _ORDER[self._pipe] = list(self._entered)

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
        wrappers = self
        hooks = self._hooks

        def autofit_stage_call(*args: Any, **kwargs: Any) -> Any:
            if wrappers._running:
                return wrappers._inner_of(slot)(*args, **kwargs)  # the outer wrapper retries
            cast = slot.attr == "to"
            if not cast:
                wrappers._enter(slot.stage)
            retried = False
            while True:
                stage = wrappers._stage_of_cast(slot) if cast else slot.stage
                home = _device_of(args, kwargs) if stage == "vae_encode" else None
                if not cast:
                    args, kwargs = hooks.before(slot.name, stage, args, kwargs)
                elif retried:
                    # A cast retried after a rung: the stage's moves first (the rung may be
                    # "the other components off the device"); the cast's own arguments stay.
                    hooks.before(slot.name, stage, args, kwargs)
                started = time.perf_counter()
                failure: OOMInfo | None = None
                broken: str | None = None
                wrappers._running += 1
                try:
                    # Re-read the inner callable: recovery may have re-hooked the module.
                    inner = wrappers._inner_of(slot)
                    chunks = hooks.denoise_chunks if stage == "denoise" else 1
                    with wrappers._mode(slot, stage):
                        out = inner(*args, **kwargs) if chunks == 1 else split_call(inner, args, kwargs, chunks)
                except BaseException as exc:
                    failure = classify(exc)
                    if failure is None:
                        # A one-way rung applied to this component and not yet seen to work is
                        # the likely cause: undo it and retry. Anything else passes through.
                        if cast or not (isinstance(exc, Exception) and hooks.can_roll_back(slot.name)):
                            raise
                        broken = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    wrappers._running -= 1
                # Outside the except block: the exception and the frames it held are gone.
                if broken is not None:
                    hooks.roll_back(stage, slot.name, broken)
                    continue
                if failure is None:
                    if not cast:
                        hooks.after(slot.name, stage)
                    if home is not None:
                        out = _move_output(out, home)  # the latents go where the image came from
                    return out
                if cast and not retried:
                    hooks.before(slot.name, stage, args, kwargs)  # the stage's peak starts here
                retried = cast
                hooks.on_oom(stage, slot.name, failure, time.perf_counter() - started)

        autofit_stage_call.__wrapped__ = slot.inner  # type: ignore[attr-defined]
        return autofit_stage_call

    def _mode(self, slot: _Slot, stage: str) -> Any:
        """Compiled components run eager under a plan their compiled code does not work with
        (see :mod:`autofit.facts.compiled`); everything else runs as it is."""
        if not slot.compiled:
            return _NOTHING
        return compiled.run_context(slot.name, slot.module, self._hooks.plan.placement, stage, slot.compiled)

    def _inner_of(self, slot: _Slot) -> Callable[..., Any]:
        for live in self._slots:
            if live.name == slot.name and live.attr == slot.attr:
                return live.inner  # type: ignore[return-value]
        # Suspended (between uninstall and install): call whatever the module has now.
        return getattr(slot.module, slot.attr)


_NOTHING = nullcontext()


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _move_output(obj: Any, device: torch.device) -> Any:
    """A VAE encode's output (a tensor, a diffusers output, a latent distribution) moved to
    ``device`` when a plan ran the VAE elsewhere (``vae_cpu``); unchanged when it is there."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, dict):  # includes diffusers' BaseOutput
        for k in list(obj.keys()):
            obj[k] = _move_output(obj[k], device)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move_output(v, device) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor) and v.device != device:
                setattr(obj, k, v.to(device))
    return obj


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
    """Call ``fn`` on ``chunks`` slices of the batch and join the outputs: the result of one call
    to float rounding (not bit for bit), with a fraction of the activation memory. Tensors whose first dimension is not the
    batch (ids, scalar timesteps) are passed whole."""
    n = _batch_of(args, kwargs)
    if n is None or n < 2:
        return fn(*args, **kwargs)
    size = -(-n // min(chunks, n))
    parts = [fn(*_take(args, s, s + size, n), **_take(kwargs, s, s + size, n)) for s in range(0, n, size)]
    return _join(parts)
