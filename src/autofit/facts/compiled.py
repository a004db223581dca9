"""Compiled components: ``torch.compile(module)``, ``compile_repeated_blocks()`` /
``module.compile()`` on blocks, and a compiled ``vae.decode`` / ``vae.encode``.

A compiled component is the same module tree as an eager one (an ``OptimizedModule`` holds the
eager module as ``_orig_mod`` and shares its parameters), so its role, footprint and residency
units are found on the eager module, and every placement, cast and quantization acts on that
tree. What compiled code reads is settled by dynamo's guards: with nn modules inlined (always on
since torch 2.5), parameters and buffers are graph inputs read from the module at each call and
guarded on device, dtype and shape, so a graph never reads a stale tensor; a plan change that
moves or casts weights recompiles each compiled region at most once, and calls under an
unchanged plan recompile nothing.

Two cases do not work compiled, and run eager instead (a WARNING event, ``compiled_eager``, says
which component, which plan and why):

* hooks on every layer *inside* a compiled region (``sequential``, ``group_leaf*``,
  ``group_disk``, and ``resident_stream``'s on its streamed layers): dynamo traces them with a graph break per layer, hits its recompile limit and
  runs slower than eager;
* CUDA graphs (``mode="reduce-overhead"``, or ``triton.cudagraphs``) under a plan that moves
  weights between calls: a graph replays fixed weight addresses.

Eager here is ``torch.compiler.set_stance("force_eager")`` for the call of that component only:
the compiled code is kept and used again as soon as the plan is one it works under.

A denoiser autofit compiled itself (``autofit(pipe, compile=...)``, see
:mod:`autofit.strategies.compiling`) is registered here with :func:`manage`: its regions run eager
under the plans listed in :func:`managed_eager_reason` too (they were compiled with
``fullgraph=True``, which a hook or a quantized layer inside the region breaks).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from autofit.events import emit
from autofit.plan import placing

__all__ = ["Region", "regions", "is_compiled", "eager_module", "uses_cuda_graphs", "eager_reason", "run_context",
           "invalidate", "compiled_frames", "versions", "CompiledForward", "manage", "managed", "managed_eager_reason",
           "compile_seconds", "dispatcher_of", "outside_blocks"]



@dataclass(frozen=True)
class Region:
    """One compiled region of a component: ``kind`` is ``module`` (``torch.compile(module)``),
    ``block`` (``module.compile()``, as ``compile_repeated_blocks`` does) or ``method``
    (a compiled ``decode`` / ``encode`` / ``forward`` set on the instance); ``path`` the
    submodule or attribute; ``code`` the code objects dynamo compiles for it."""

    kind: str
    path: str
    code: tuple[types.CodeType, ...]
    config: dict[str, Any] | None


def _code_of(fn: Any) -> types.CodeType | None:
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__code__", None)


def _config_of(obj: Any) -> dict[str, Any] | None:
    get = getattr(obj, "get_compiler_config", None)
    if callable(get):
        try:
            cfg = get()
        except Exception:
            cfg = None
        if isinstance(cfg, dict):
            return cfg
        return _backend_config(get)
    return None


def _backend_config(get: Any) -> dict[str, Any] | None:
    """Inductor's options (``triton.cudagraphs`` under ``mode="reduce-overhead"``) read from the
    backend itself: with ``fullgraph=True`` torch.compile keeps no compiler config to return."""
    cells = getattr(get, "__closure__", None) or ()
    obj = getattr(cells[0].cell_contents, "callback", None) if cells else None
    for _ in range(8):
        nxt = getattr(obj, "_torchdynamo_orig_backend", None)
        if nxt is None:
            break
        obj = nxt
    cfg = getattr(obj, "config", None)
    return dict(cfg) if isinstance(cfg, dict) else None


def eager_module(module: Any) -> Any:
    """The eager module under any number of ``torch.compile`` wrappers (``module`` itself when
    it is not compiled)."""
    seen = 0
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule) and seen < 8:
        module = module._orig_mod
        seen += 1
    return module


def _compiled_fn(fn: Any) -> Any:
    """The callable a compiled function wraps, or None when ``fn`` is not compiled."""
    return getattr(fn, "_torchdynamo_orig_callable", None)


def regions(module: Any) -> list[Region]:
    """The compiled regions of a component (empty: an eager component)."""
    if not isinstance(module, torch.nn.Module):
        return []
    found: list[Region] = []
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        inner = eager_module(module)
        code = _code_of(type(inner).forward)
        found.append(Region("module", "", (code,) if code else (), _config_of(module)))
        module = inner
    own = _dispatcher_of(module)
    if own is not None:
        code = _code_of(own.eager)
        found.append(Region("module", "", (code,) if code else (), own.get_compiler_config()))
    for attr in ("forward", "decode", "encode"):
        fn = module.__dict__.get(attr)
        if own is not None and attr == "forward":
            continue
        orig = _compiled_fn(fn) if fn is not None else None
        if orig is None:
            orig = _compiled_fn(getattr(fn, "__wrapped__", None)) if fn is not None else None
        if orig is not None:
            code = _code_of(orig)
            found.append(Region("method", attr, (code,) if code else (), _config_of(fn)))
    for path, sub in module.named_modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            code = _code_of(torch.nn.Module._call_impl)
            found.append(Region("block", path, (code,) if code else (), _config_of(sub._compiled_call_impl)))
    return found


def is_compiled(module: Any) -> bool:
    return bool(regions(module))


def uses_cuda_graphs(region: Region) -> bool:
    """The region was compiled to replay CUDA graphs (``mode="reduce-overhead"``)."""
    return bool((region.config or {}).get("triton.cudagraphs"))


def eager_reason(module: Any, placement: str | None, found: list[Region] | None = None) -> str | None:
    """Why ``module``'s compiled code must not run under ``placement`` (None: it may).
    ``found``: its :func:`regions`, when already known. For a denoiser autofit compiled, the
    plan in force is read from its registration (storage rungs count too)."""
    own = _MANAGED.get(eager_module(module))
    if own is not None:
        plan = own.plan()
        if plan is not None:
            reason = managed_eager_reason(own.how, plan)
            if reason is not None:
                return reason
            placement = plan.placement
    if placement is None:
        return None
    found = regions(module) if found is None else found
    if not found:
        return None
    terms = placing(placement)
    if terms.hooks_in_blocks and any(r.kind != "block" for r in found):
        return "hooks_every_layer"  # resident_stream's hooks too: traced, a graph break per streamed layer
    if terms.offloads and any(uses_cuda_graphs(r) for r in found):  # weights move between calls
        return "cuda_graphs_with_moving_weights"
    return None


_warned: set[tuple[int, str, str]] = set()


def run_context(name: str, module: Any, placement: str | None, stage: str,
                found: list[Region] | None = None) -> ContextManager[Any]:
    """The context a component's call runs in under ``placement``: eager (with a WARNING event,
    once per component and plan) where its compiled code does not work, else nothing."""
    found = regions(module) if found is None else found
    reason = eager_reason(module, placement, found)
    if reason is None:
        return nullcontext()
    key = (id(module), str(placement), reason)
    if key not in _warned:
        _warned.add(key)
        modes = sorted({"reduce-overhead" if uses_cuda_graphs(r) else "default" for r in found})
        emit("compiled_eager", level="warning", stage=stage, component=name, action="force_eager",
             plan=str(placement), reason=reason, mode=",".join(modes))
    return _force_eager()


@contextmanager
def _force_eager() -> Iterator[None]:
    with torch.compiler.set_stance("force_eager"):
        yield


def invalidate(module: Any) -> None:
    """Drop the compiled code of ``module``'s regions, so their next call traces again (sees
    hooks added since). For tests: dynamo does not guard on per-module hooks."""
    from torch._C._dynamo.eval_frame import reset_code

    for region in regions(module):
        if region.kind == "block":
            continue  # Module._call_impl's code is every module's: leave the others' code alone
        for code in region.code:
            reset_code(code)


def compiled_frames() -> int:
    """How many graphs dynamo has compiled so far in this process (a recompile is one more):
    its ``stats.unique_graphs`` counter (torch 2.13 keeps no ``frames`` counter any more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]) or int(counters["frames"]["ok"])


def versions(module: Any) -> int:
    """How many compiled versions of ``module``'s top compiled code dynamo holds now (one per
    compile of that region: a recompile is one more). Blocks compiled with ``module.compile()``
    share ``Module._call_impl``'s code with every other module and are left out."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return sum(len(_debug_get_cache_entry_list(code)) for r in regions(module) if r.kind != "block" for code in r.code)


# ---- what autofit's compile= registers (autofit.strategies.compiling applies it) ------------
class CompiledForward:
    """``module.forward`` of a denoiser autofit compiles whole: calls the compiled forward of the
    variant in force (``mode`` as asked, or its fallback without CUDA graphs). The module keeps
    its identity (``torch.compile(module)`` would replace the pipeline's component), and offload
    hooks placed later wrap this forward, so they run outside the compiled code."""

    def __init__(self, eager: Callable[..., Any]):
        self.eager = eager
        # Read through any wrapper that copies this one's __dict__ (accelerate's, diffusers' hooks).
        self._autofit_dispatcher = self
        self._torchdynamo_orig_callable = eager
        self.variants: dict[str | None, Callable[..., Any]] = {}
        self.mode: str | None = None
        self.pre_hooks: list[Callable[[Any, tuple[Any, ...]], None]] = []  # run eagerly, before the compiled code

    def use(self, mode: str | None, make: Callable[[], Callable[..., Any]]) -> None:
        """Run the variant compiled for ``mode`` from now on (``make`` compiles it, lazily, once)."""
        if mode not in self.variants:
            self.variants[mode] = make()
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for hook in tuple(self.pre_hooks):
            hook(getattr(self.eager, "__self__", None), args)
        return self.variants[self.mode](*args, **kwargs)

    def add_pre_hook(self, hook: Callable[[Any, tuple[Any, ...]], None]) -> Any:
        """Run ``hook(module, args)`` eagerly at each call, inside ``forward`` (so inside the stage
        wrapper) and before the compiled code: where ``inject_oom`` raises. Returns a handle with
        ``remove()``."""
        self.pre_hooks.append(hook)
        hooks = self.pre_hooks

        class _Handle:
            @staticmethod
            def remove() -> None:
                if hook in hooks:
                    hooks.remove(hook)

        return _Handle()

    def get_compiler_config(self) -> dict[str, Any] | None:
        return _config_of(self.variants.get(self.mode))


def dispatcher_of(module: Any) -> CompiledForward | None:
    """The forward ``compile=`` compiled in place on ``module`` (None: none)."""
    return _dispatcher_of(module)


def outside_blocks(top: Any, modules: list[Any]) -> list[Any]:
    """Those of ``modules`` not inside a block of ``top`` compiled with ``module.compile()``
    (they run eagerly: hooks on them are not traced into compiled code)."""
    inside = {id(m) for block in top.modules() if getattr(block, "_compiled_call_impl", None) is not None
              for m in block.modules()}
    return [m for m in modules if id(m) not in inside]


def _dispatcher_of(module: Any) -> CompiledForward | None:
    for holder in (module.__dict__.get("forward"), module.__dict__.get("_old_forward")):
        own = getattr(holder, "_autofit_dispatcher", None)
        if isinstance(own, CompiledForward):
            return own
    return None


@dataclass(frozen=True)
class Managed:
    """A denoiser compiled by ``compile=``: ``how`` (``regional`` or ``full``) and where to read
    the plan in force."""

    how: str
    plan: Callable[[], Any]


_MANAGED: "weakref.WeakKeyDictionary[Any, Managed]" = weakref.WeakKeyDictionary()


def manage(module: Any, how: str, plan: Callable[[], Any]) -> None:
    _MANAGED[eager_module(module)] = Managed(how, plan)


def managed(module: Any) -> Managed | None:
    return _MANAGED.get(eager_module(module))


def managed_eager_reason(how: str, plan: Any) -> str | None:
    """Why a denoiser compiled by ``compile=`` (``fullgraph=True``) runs eager under ``plan``:
    a storage rung puts casting hooks (fp8) or quantized layers (int8, nf4) in every layer;
    regional: the placement hooks layers inside the blocks (dynamo cannot trace past their
    ``torch.compiler.disable``d transfers, and blocks hooked differently recompile one another);
    whole module: the placement hooks anything below the module itself. None: it runs compiled."""
    if plan.storage:
        return f"storage_{plan.storage}"
    if how == "regional" and plan.placing.hooks_in_blocks:
        return "hooks_in_blocks"
    if how == "full" and not plan.placing.hooks_outside_forward:
        return "hooks_in_module"
    return None


def compile_seconds() -> float:
    """Seconds dynamo has spent compiling frames so far in this process (its own timer)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))
