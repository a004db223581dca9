"""Test helpers that ship with autofit: tiny offline pipelines and fault injection.

``inject_oom`` raises the real exception type with the real message text from *inside* a real
component (a forward pre-hook on one of its first layers), so the OOM travels through the same
frames a real one would. Use it in your own tests of code that runs autofit.

    with inject_oom(pipe, stage="decode") as fault:
        image = proxy(prompt, ...).images[0]
    assert fault.fired == 1 and fault.freed_before_retry == [True]

Compiled components (``torch.compile(pipe.unet)``, ``compile_repeated_blocks``, a compiled
``vae.decode``) are injected into too: the raising hook is ``torch.compiler.disable``d, so dynamo
breaks the graph to run it, and the component's compiled code is dropped when the injection is
set up and removed, so it is traced again with (then without) the hook. An injection that could
not see its target is an error: leaving the ``with`` block raises ``AssertionError`` when the
target's call number ``at`` was reached and nothing fired (``expect_fire=True``: whenever nothing
fired; ``expect_fire=False``: never).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from autofit.testing.tiny import make_tokenizer, tiny_flux, tiny_sdxl
from autofit.facts import compiled
from autofit.facts.components import roles
from autofit._diffusers import module_components

__all__ = ["inject_oom", "oom_error", "FaultInjection", "tiny_sdxl", "tiny_flux", "make_tokenizer", "OOM_MESSAGES"]

OOM_MESSAGES: dict[str, tuple[type[BaseException], str]] = {
    "cuda": (
        torch.OutOfMemoryError,
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
        "512.00 MiB is free. Including non-PyTorch memory, this process has 7.50 GiB memory in use. Of the "
        "allocated memory 6.90 GiB is allocated by PyTorch, and 400.00 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
    ),
    # Another process's spike: this process held 1.2 of 8 GiB when the device ran out.
    "cuda_spike": (
        torch.OutOfMemoryError,
        "CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity of 8.00 GiB of which "
        "40.00 MiB is free. Process 31337 has 6.70 GiB memory in use. Including non-PyTorch memory, this process "
        "has 1.20 GiB memory in use. Of the allocated memory 1.05 GiB is allocated by PyTorch, and 20.00 MiB is "
        "reserved by PyTorch but unallocated.",
    ),
    # A fragmented cache: more reserved but unallocated than the request.
    "cuda_fragmented": (
        torch.OutOfMemoryError,
        "CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
        "100.00 MiB is free. Including non-PyTorch memory, this process has 7.80 GiB memory in use. Of the "
        "allocated memory 5.90 GiB is allocated by PyTorch, and 1.70 GiB is reserved by PyTorch but unallocated. "
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
        "to avoid fragmentation.",
    ),
    "cuda_runtime": (
        RuntimeError,
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
        "call, so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1",
    ),
    "cudnn": (RuntimeError, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cublas": (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "hip": (
        torch.OutOfMemoryError,
        "HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.98 GiB of which "
        "1.02 GiB is free.",
    ),
    "xpu": (
        torch.OutOfMemoryError,
        "XPU out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.11 GiB.",
    ),
    "mps": (
        RuntimeError,
        "MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB, max allowed: 9.07 GB). "
        "Tried to allocate 256.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable "
        "upper limit for memory allocations (may cause system failure).",
    ),
    "cpu": (
        RuntimeError,
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)",
    ),
}


def oom_error(kind: str = "cuda") -> BaseException:
    """A fresh OOM exception of the real type with the real message for ``kind``."""
    try:
        cls, msg = OOM_MESSAGES[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(OOM_MESSAGES)}, got {kind!r}") from None
    return cls(msg)


@dataclass
class FaultInjection:
    """What an injection did: how many OOMs it raised and whether each failed attempt's tensors
    were gone by the time the component ran again."""

    stage: str
    component: str
    calls: int = 0
    fired: int = 0
    freed_before_retry: list[bool] = field(default_factory=list)
    _ballast: list[weakref.ref] = field(default_factory=list, repr=False)
    _remove: Callable[[], None] | None = field(default=None, repr=False)
    # None: fail on exit when the target was reached (``_reached``) and nothing fired.
    expect_fire: bool | None = field(default=None, repr=False)
    _reached: Callable[[], bool] = field(default=lambda: False, repr=False)

    def _check_ballast(self) -> None:
        while len(self.freed_before_retry) < len(self._ballast):
            self.freed_before_retry.append(self._ballast[len(self.freed_before_retry)]() is None)

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        self._check_ballast()

    def __enter__(self) -> "FaultInjection":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.remove()
        if exc_type is not None or self.fired or self.expect_fire is False:
            return
        if self.expect_fire or self._reached():
            raise AssertionError(
                f"inject_oom(stage={self.stage!r}, component={self.component!r}) never fired "
                f"({self.calls} calls seen): the injection did not reach the component's code "
                "(pass expect_fire=False if that is expected)")


def _leaves(module: torch.nn.Module) -> list[torch.nn.Module]:
    found = [
        sub
        for sub in module.modules()
        if next(sub.children(), None) is None and any(True for _ in sub.parameters(recurse=False))
    ]
    return found or [module]


def _pick(pipe: Any, stage: str, component: str | None) -> tuple[str, torch.nn.Module]:
    real = getattr(pipe, "__wrapped__", pipe)
    comps = module_components(real)
    if component is not None:
        if component not in comps:
            raise ValueError(f"component {component!r} not in pipeline; have {sorted(comps)}")
        return component, comps[component]
    role = "denoise" if stage == "load" else stage  # a load fault defaults to the denoiser's move
    stage_of = roles(real)
    if role == "vae_encode":
        role = "decode"
    for name, module in comps.items():
        if stage_of[name] == role:
            return name, module
    raise ValueError(f"pipeline has no component for stage {stage!r}")


def inject_oom(
    pipe: Any,
    *,
    stage: str,
    at: int = 1,
    times: int = 1,
    kind: str = "cuda",
    component: str | None = None,
    when: Callable[[int], bool] | None = None,
    ballast_bytes: int = 1 << 20,
    expect_fire: bool | None = None,
) -> FaultInjection:
    """Raise a real OOM from inside a real component.

    Args:
        stage: ``"encode"``, ``"vae_encode"`` (the VAE's encoder), ``"denoise"``, ``"decode"``
            (from the component's first layer),
            ``"load"`` (while the component's weights are moved: half of its children are moved,
            then it raises), or ``"glue"`` (from ``scheduler.step``, pipeline code outside any component).
        at: the 1-based call of the target that fails first (for ``denoise``, step ``k`` is call ``k+1``).
        times: how many consecutive calls fail.
        kind: which exception to raise (a key of ``OOM_MESSAGES``).
        when: optional predicate on the call number, instead of ``at``/``times``.
        ballast_bytes: a tensor of this size is alive in the raising frame, to check it is freed.
        expect_fire: leaving the ``with`` block with nothing fired raises ``AssertionError``:
            ``True`` always, ``None`` (default) when the target ran its ``at``-th call (an
            injection that could not see into the component), ``False`` never.
    """
    oom_error(kind)  # validate early
    fire = _Firing(at, times, when, kind, ballast_bytes)
    if stage == "glue":
        return _inject_glue(pipe, fire, expect_fire)
    name, module = _pick(pipe, stage, component)
    fault = FaultInjection(stage, name, expect_fire=expect_fire)
    if stage == "load":
        return _inject_load(module, fault, fire)
    if stage not in ("encode", "vae_encode", "denoise", "decode"):
        raise ValueError(f"stage must be load, encode, vae_encode, denoise, decode or glue; got {stage!r}")
    return _inject_forward(module, stage, fault, fire)


@dataclass(frozen=True)
class _Firing:
    """Which calls fail, and what they raise."""

    at: int
    times: int
    when: Callable[[int], bool] | None
    kind: str
    ballast_bytes: int

    def fires(self, n: int) -> bool:
        return self.when(n) if self.when is not None else self.at <= n < self.at + self.times

    def reached(self, calls: int) -> bool:
        return self.when is None and calls >= self.at

    def raise_oom(self, fault: FaultInjection, device: torch.device = torch.device("cpu")) -> None:
        """Count the firing, leave a ballast tensor alive in this frame, raise."""
        fault.fired += 1
        ballast = torch.empty(self.ballast_bytes, dtype=torch.uint8, device=device)
        fault._ballast.append(weakref.ref(ballast))
        raise oom_error(self.kind)


def _inject_glue(pipe: Any, fire: _Firing, expect_fire: bool | None) -> FaultInjection:
    """From ``scheduler.step``: pipeline code outside any component."""
    scheduler = getattr(pipe, "__wrapped__", pipe).scheduler
    fault = FaultInjection("glue", "scheduler", expect_fire=expect_fire)
    original_step = scheduler.step

    def failing_step(*args: Any, **kwargs: Any) -> Any:
        fault.calls += 1
        fault._check_ballast()
        if fire.fires(fault.calls):
            fire.raise_oom(fault)
        return original_step(*args, **kwargs)

    scheduler.step = failing_step
    fault._remove = lambda: scheduler.__dict__.pop("step", None)
    fault._reached = lambda: fire.reached(fault.calls)
    return fault


def _inject_load(module: torch.nn.Module, fault: FaultInjection, fire: _Firing) -> FaultInjection:
    """While ``module``'s weights move: half of its children are moved, then it raises."""
    fault._reached = lambda: fire.reached(fault.calls)
    had = "_apply" in module.__dict__

    def failing_apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        fault.calls += 1
        if fire.fires(fault.calls):
            fault.fired += 1
            children = list(module.children())
            for child in children[: max(1, len(children) // 2)]:
                child._apply(fn)  # a real half-moved module, as a failed .to() leaves it
            raise oom_error(fire.kind)
        return type(module)._apply(module, fn, *args, **kwargs)

    module._apply = failing_apply  # type: ignore[method-assign]

    def remove_apply() -> None:
        if not had:
            module.__dict__.pop("_apply", None)

    fault._remove = remove_apply
    return fault


def _inject_forward(module: torch.nn.Module, stage: str, fault: FaultInjection, fire: _Firing) -> FaultInjection:
    """From the first layer that runs inside the component (its decoder or encoder for the VAE)."""
    part = {"decode": "decoder", "vae_encode": "encoder"}.get(stage)
    top = getattr(module, part, module) if part else module
    leaves = _leaves(top)
    in_call, removed = [False], [False]
    # The component's own calls, seen outside any compiled code (torch.compile(module) runs the
    # module's hooks eagerly): an injection that sees fewer could not see into it.
    entered = [0]

    # An attempt starts at the first layer that runs inside the component, whichever it is;
    # retries made by autofit re-enter forward directly, so they count as attempts too.
    # Disabled for dynamo: inside a compiled component the graph breaks and this runs eagerly.
    @torch.compiler.disable
    def pre_hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if in_call[0] or removed[0]:
            return
        in_call[0] = True
        fault.calls += 1
        fault._check_ballast()
        if fire.fires(fault.calls):
            in_call[0] = False
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            fire.raise_oom(fault, x.device if x is not None else torch.device("cpu"))

    @torch.compiler.disable
    def done(*_: Any) -> None:
        in_call[0] = False

    def enter(*_: Any) -> None:
        entered[0] += 1

    remove = _hook(module, top, leaves, pre_hook, done, enter, removed)

    def reached() -> bool:
        seen = max(fault.calls, entered[0])
        return (entered[0] > 0 and fault.calls == 0) or fire.reached(seen)

    fault._remove = remove
    fault._reached = reached
    return fault


def _hook(module: torch.nn.Module, top: torch.nn.Module, leaves: list[torch.nn.Module], pre_hook: Callable[..., Any],
          done: Callable[..., Any], enter: Callable[..., Any], removed: list[bool]) -> Callable[[], None]:
    """Register the injection's hooks; returns what removes them. Compiled: one hook on the eager
    module itself, not one per layer (each would break the graph). torch.compile(module) runs the
    inner module's hooks outside the graph; a compiled method (vae.decode) traces them, and
    breaks the graph once to run this one."""
    regions = compiled.regions(module)
    own = compiled.dispatcher_of(module)
    outside = compiled.outside_blocks(top, leaves) if regions and all(r.kind == "block" for r in regions) else []
    if own is not None:
        leaves = []  # compile= compiled forward in place: the hook runs in it, before the compiled code
    elif outside:
        leaves = outside  # regional: the first layers outside the compiled blocks run eagerly
    elif regions:
        leaves = [compiled.eager_module(top)]
        top = leaves[0]
    handles = [leaf.register_forward_pre_hook(pre_hook) for leaf in leaves]
    if own is not None:
        handles.append(own.add_pre_hook(pre_hook))
    handles.append(top.register_forward_hook(done))
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        handles.append(module.register_forward_pre_hook(enter))
    retrace = any(r.kind == "method" for r in regions)
    if retrace:
        compiled.invalidate(module)  # traced again, with the hook (dynamo does not guard on hooks)

    def remove_hooks() -> None:
        removed[0] = True
        for h in handles:
            h.remove()
        if retrace:
            compiled.invalidate(module)  # and again without them: no graph break left behind

    return remove_hooks
