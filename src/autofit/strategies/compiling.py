"""``autofit(pipe, compile=...)``: autofit compiles the denoiser for the user (off by default).

What it compiles, as the diffusers optimization guide recommends: the denoiser's repeated blocks
(``compile_repeated_blocks``, regional compilation: the same steady speed-up for a fraction of
the compile time, and offload hooks on whole blocks stay outside the compiled code) where the
denoiser declares ``_repeated_blocks``, else the whole denoiser. Whole-module compilation here
compiles the module's ``forward`` in place (:class:`autofit.facts.compiled.CompiledForward`),
so the pipeline keeps its component and offload hooks wrap the compiled forward.

``torch.compile`` is lazy: nothing is traced until the first call, which runs after the first
plan is placed, so the code is compiled for the plan that settled. A plan change recompiles each
region at most once (dynamo's guards on the weights' device and dtype); calls under an unchanged
plan compile nothing. Under plans whose hooks or quantized layers sit inside a compiled region,
the denoiser runs eager for that plan (:func:`autofit.facts.compiled.managed_eager_reason`, a
WARNING event ``compiled_eager``). CUDA graphs (``mode="reduce-overhead"``, ``"max-autotune"``)
replay fixed weight addresses: under a plan that moves the denoiser's weights, the regions use
the same mode without CUDA graphs (a WARNING event ``compile_fallback``), and the asked mode
again once the weights stay on the device.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from autofit.errors import AutoFitUsageError
from autofit.events import emit
from autofit.facts import compiled
from autofit.facts.components import roles
from autofit.plan import Plan

__all__ = ["CompileOptions", "parse_compile", "attach", "settle", "report", "compiler_of", "HOWS", "MODES"]

HOWS = ("auto", "regional", "full")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The same mode without CUDA graphs, for a plan that moves weights.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# Extras that move the denoiser's weights off the device between calls.
MOVES_DENOISER = frozenset({"offload_for_decode"})


@dataclass(frozen=True)
class CompileOptions:
    """How ``compile=`` compiles. ``how``: ``"auto"`` (regional where the denoiser declares
    ``_repeated_blocks``, else the whole module), ``"regional"`` or ``"full"``; ``backend``,
    ``mode``, ``fullgraph``, ``dynamic``: passed to ``torch.compile`` (``mode`` is inductor's:
    None, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
    ``"max-autotune-no-cudagraphs"``)."""

    how: str = "auto"
    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    fullgraph: bool = True
    dynamic: bool | None = None

    def kwargs(self, mode: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if mode is not None:
            kw["mode"] = mode
        return kw


_KEYS = tuple(f.name for f in fields(CompileOptions))
_FORMS = ("compile=True, \"auto\", \"regional\", \"full\", False, a dict of "
          f"{', '.join(_KEYS)} (e.g. {{\"backend\": \"eager\"}}) or a CompileOptions")


def parse_compile(value: Any) -> CompileOptions | None:
    """``compile=`` as options (None: off). Raises AutoFitUsageError saying what is accepted."""
    if value is None or value is False:
        return None
    if value is True:
        options = CompileOptions()
    elif isinstance(value, str):
        options = CompileOptions(how=value)
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise AutoFitUsageError(f"compile={value!r}: unknown key(s) {unknown}; give {_FORMS}")
        options = CompileOptions(**value)
    elif isinstance(value, CompileOptions):
        options = value
    else:
        raise AutoFitUsageError(f"compile={value!r}: give {_FORMS}")
    if options.how not in HOWS:
        raise AutoFitUsageError(f"compile={value!r}: how must be one of {HOWS}, got {options.how!r}")
    if options.mode not in MODES:
        raise AutoFitUsageError(f"compile={value!r}: mode must be one of {MODES}, got {options.mode!r}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not (isinstance(options.backend, str) and options.backend in backends or callable(options.backend)):
        raise AutoFitUsageError(f"compile={value!r}: backend must be a torch.compile backend name (one of "
                                f"{backends}) or a callable, got {options.backend!r}")
    if options.mode is not None and options.backend != "inductor":
        raise AutoFitUsageError(f"compile={value!r}: mode={options.mode!r} is the inductor backend's; with "
                                f"backend={options.backend!r} leave mode out")
    if not isinstance(options.fullgraph, bool) or options.dynamic not in (None, True, False):
        raise AutoFitUsageError(f"compile={value!r}: fullgraph is True or False, dynamic None, True or False")
    return options


def _uses_cuda_graphs(mode: str | None) -> bool:
    return mode in WITHOUT_CUDA_GRAPHS


def moves_weights(plan: Plan) -> bool:
    """The plan takes the denoiser's weights off the device between (or during) calls."""
    return plan.offloads or bool(MOVES_DENOISER & plan.extras)


_UNSET = object()


@dataclass
class Target:
    """One denoiser compiled by ``compile=``: ``how`` it is (``regional``, ``full``), its blocks
    and the compiled ``_call_impl`` of each for each mode (regional), or its compiled forward."""

    name: str
    module: torch.nn.Module
    how: str
    blocks: list[torch.nn.Module] = field(default_factory=list)
    block_classes: tuple[str, ...] = ()
    variants: dict[str | None, list[Any]] = field(default_factory=dict)
    forward: compiled.CompiledForward | None = None
    mode: Any = _UNSET  # the mode in force (_UNSET: none yet)
    announced: bool = False


class Compiler:
    """``compile=`` for one wrapped pipeline: what it compiled, the mode in force, and the compile
    seconds of the call in progress."""

    def __init__(self, options: CompileOptions, targets: list[Target], plan: Callable[[], Plan | None]):
        self.options = options
        self.targets = targets
        self._settled: Plan | None = None
        self._call_started = compiled.compile_seconds()
        for t in targets:
            compiled.manage(t.module, t.how, plan)

    def settle(self, plan: Plan) -> None:
        """The call's plan is placed: use the mode that works under it, and say once what was
        compiled. Cheap when the plan is the one settled last (every call)."""
        self._call_started = compiled.compile_seconds()
        if plan == self._settled:
            return
        self._settled = plan
        asked = self.options.mode
        want = WITHOUT_CUDA_GRAPHS[asked] if _uses_cuda_graphs(asked) and moves_weights(plan) else asked
        for t in self.targets:
            if want != asked and t.mode != want:
                emit("compile_fallback", level="warning", stage="load", component=t.name, action="mode",
                     plan=",".join(plan.names) or "device", asked=asked, mode=want,
                     reason="cuda graphs replay fixed weight addresses; this plan moves the weights")
            self._use(t, want)
            if not t.announced:
                t.announced = True
                eager = compiled.managed_eager_reason(t.how, plan)
                emit("compiled", stage="load", component=t.name, action="compile", how=t.how,
                     blocks=len(t.blocks) if t.how == "regional" else None,
                     block_classes=",".join(t.block_classes) or None, backend=_backend_name(self.options.backend),
                     mode=want or "default", fullgraph=self.options.fullgraph, plan=",".join(plan.names) or "device",
                     runs=f"eager ({eager})" if eager else "compiled")

    def _use(self, t: Target, mode: str | None) -> None:
        if t.mode is not _UNSET and t.mode == mode:
            return
        kw = self.options.kwargs(mode)
        if t.how == "regional":
            if mode not in t.variants:
                t.module.compile_repeated_blocks(**kw)  # as diffusers offers it: module.compile() on each block
                t.variants[mode] = [b._compiled_call_impl for b in t.blocks]
            else:
                for block, fn in zip(t.blocks, t.variants[mode]):
                    block._compiled_call_impl = fn
        else:
            assert t.forward is not None
            forward = t.forward
            forward.use(mode, lambda: torch.compile(forward.eager, **kw))
        t.mode = mode

    def call_compile_seconds(self) -> float:
        return round(max(0.0, compiled.compile_seconds() - self._call_started), 3)


def _backend_name(backend: Any) -> str:
    return backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)


def _repeated_blocks(module: torch.nn.Module) -> tuple[tuple[str, ...], list[torch.nn.Module]]:
    names = tuple(getattr(module, "_repeated_blocks", None) or ())
    return names, [m for m in module.modules() if type(m).__name__ in names]


def _holds_diffusers_hooks(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return bool(getattr(registry, "hooks", None))


def _target(name: str, module: torch.nn.Module, options: CompileOptions, value: Any) -> Target | None:
    if compiled.is_compiled(module):
        emit("compiled", stage="load", component=name, action="kept",
             how=",".join(sorted({r.kind for r in compiled.regions(module)})),
             reason="already compiled by the caller: compile= leaves it as it is")
        return None
    classes, blocks = _repeated_blocks(module)
    how = options.how
    if how == "auto":
        how = "regional" if blocks else "full"
    if how == "regional" and not blocks:
        raise AutoFitUsageError(
            f"compile={value!r}: {type(module).__name__} ({name}) declares no repeated blocks "
            f"(_repeated_blocks={list(classes)}), so it cannot be compiled by region; pass compile=True or "
            "compile='full' to compile the whole module")
    if how == "regional":
        return Target(name, module, "regional", blocks=blocks,
                      block_classes=tuple(sorted({type(b).__name__ for b in blocks})))
    if _holds_diffusers_hooks(module):
        # Their forward chain was built before ours and would drop it when taken down.
        emit("compile_skipped", level="warning", stage="load", component=name, action="none",
             reason="the denoiser holds diffusers hooks (offloading enabled before autofit()); compile it "
                    "before enabling offloading, or pass compile='regional' where it declares repeated blocks")
        return None
    hooked = "_old_forward" in module.__dict__  # accelerate's hook: compile what it calls
    eager = module.__dict__["_old_forward"] if hooked else types.MethodType(type(module).forward, module)
    if not hooked and "forward" in module.__dict__:
        eager = module.__dict__["forward"]  # the user's own instance forward
    forward = compiled.CompiledForward(eager)
    setattr(module, "_old_forward" if hooked else "forward", forward)
    return Target(name, module, "full", forward=forward)


_COMPILERS: "weakref.WeakKeyDictionary[Any, Compiler]" = weakref.WeakKeyDictionary()


def attach(pipe: Any, value: Any, plan: Callable[[], Plan | None]) -> Compiler | None:
    """Set up ``compile=`` (parsed by :func:`parse_compile`) on ``pipe``'s denoisers. Nothing is
    traced yet: :func:`settle` picks the mode once the call's plan is placed, and the first call
    compiles. ``plan`` reads the plan in force. None: ``compile=`` is off."""
    options = parse_compile(value)
    if options is None:
        return None
    targets = []
    for name, role in roles(pipe).items():
        module = getattr(pipe, name, None)
        if role == "denoise" and isinstance(module, torch.nn.Module):
            target = _target(name, module, options, value)
            if target is not None:
                targets.append(target)
    if not targets:
        return None
    compiler = _COMPILERS[pipe] = Compiler(options, targets, plan)
    return compiler


def compiler_of(pipe: Any) -> Compiler | None:
    return _COMPILERS.get(pipe)


def settle(pipe: Any, plan: Plan) -> None:
    """The call's plan is placed (the runtime calls this once per call, after the placement)."""
    compiler = _COMPILERS.get(pipe)
    if compiler is not None:
        compiler.settle(plan)


def report(pipe: Any) -> dict[str, Any]:
    """What ``last_call`` adds under ``compile=``: the seconds dynamo spent compiling in the call."""
    compiler = _COMPILERS.get(pipe)
    return {} if compiler is None else {"compile_seconds": compiler.call_compile_seconds()}


# ---- what `autofit plan` says compiling gains ------------------------------------------------
# Measured steady-call speed-ups of compile= over the eager denoiser: (pipeline class, device
# type) -> (eager seconds / compiled seconds, where it was measured). Only measured figures go
# here; none has been measured on an accelerator yet (shared/reference/gpu-facts.md has none).
MEASURED_GAINS: dict[tuple[str, str], tuple[float, str]] = {}


def gain_note(pipeline: str, device_type: str) -> str:
    """One line for ``autofit plan``: the measured gain of ``compile=`` for this pipeline class on
    this kind of device, or that none was measured (no figure is made up)."""
    found = MEASURED_GAINS.get((pipeline, device_type))
    if found is not None:
        ratio, where = found
        return (f"compile=True: steady calls measured {ratio:.2f}x as fast ({where}); the first call also "
                "compiles (see last_call['compile_seconds'])")
    return (f"compile=True: no measured gain for {pipeline} on {device_type} (autofit has no figure to predict "
            "from; the diffusers guide's own, unmeasured here: 20-50% faster steps after a first call that "
            "compiles)")
