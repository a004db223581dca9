"""``autofit(pipe)`` and the proxy it returns: delegation, nothing clever."""

from __future__ import annotations

import functools
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import wrapt

from autofit import _diffusers
from autofit.units import gib, parse_bytes
from autofit.errors import AutoFitUsageError
from autofit.events import emit
from autofit.planning.context import DEFAULT_POLICY, POLICIES
from autofit.facts.cache import PlanCache
from autofit.plan import Plan
from autofit._diffusers import module_components
from autofit.records import EscalationRecord
from autofit.engine.readings import Readings
from autofit.engine.relax import Relaxation
from autofit.engine.runtime import Runtime
from autofit.strategies import compiling, quantize


class AutoFitControl:
    """What ``proxy.autofit`` exposes: the plan in force, the escalation history, options."""

    def __init__(self, runtime: Runtime):
        self._rt = runtime

    @property
    def plan(self) -> tuple[str, ...]:
        """The rungs applied now, in application order (empty: everything on the device)."""
        return self._rt.plan.names

    @property
    def history(self) -> tuple[EscalationRecord, ...]:
        """One record per escalation step, oldest first, across all calls."""
        return self._rt.history.records

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def policy(self) -> str:
        return self._rt.policy

    @property
    def last_call(self) -> dict[str, Any]:
        """Seconds, attempts, seconds lost and plan of the last successful call."""
        return self._rt.last_call

    @property
    def footprint(self):
        return self._rt.footprint

    def reset(self) -> None:
        """Plan again at the next call, as at the first: preflight's pick (or the cached plan),
        or the plan autofit started with when preflight is off."""
        self._rt.reset()

    def _counts(self) -> str:
        rt, history = self._rt, self.history
        ooms = sum(r.oom_kind != "none" for r in history)
        return (f"{rt.calls} call(s), {rt.calls_recovered} recovered, {ooms} OOM(s), "
                f"{len(history)} escalation record(s)")

    def _rows(self) -> list[tuple[str, ...]]:
        return [(str(i), r.stage, r.component or "-", r.action, r.scope, r.oom_kind, r.cause or "-",
                 "+".join(r.plan) or "device") for i, r in enumerate(self.history, 1)]

    def _last_call_lines(self) -> list[str]:
        last = self._rt.last_call
        if not last:
            return ["last call: none yet"]
        lines = [f"last call: {last.get('seconds', 0):.3f} s, {last.get('attempts', 0)} failed attempt(s), "
                 f"{last.get('seconds_lost', 0):.3f} s lost, plan {'+'.join(last.get('plan', ())) or 'device'}"]
        peaks = last.get("stage_peaks_gib") or {}
        lines.append("stage peaks: " + (", ".join(f"{k} {v:.3f} GiB" for k, v in peaks.items())
                                        or "not measured (the CPU has no device allocator to count them)"))
        return lines

    def summary(self) -> str:
        """What autofit did, as plain text: the plan and counts, one row per :attr:`history`
        record (stage, component, action, scope, OOM kind, cause, plan after), then the last
        call's seconds, seconds lost and stage peaks."""
        lines = [f"autofit on {self.device} (policy {self.policy}): plan {'+'.join(self.plan) or 'device'}",
                 self._counts()]
        rows = self._rows()
        if rows:
            table = [_SUMMARY_COLUMNS, *rows]
            widths = [max(len(row[i]) for row in table) for i in range(len(_SUMMARY_COLUMNS))]
            lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        else:
            lines.append("no escalations")
        return "\n".join(lines + self._last_call_lines())

    def _repr_html_(self) -> str:
        """:meth:`summary` as an HTML table, for notebooks."""
        from html import escape

        head = "".join(f"<th>{escape(c)}</th>" for c in _SUMMARY_COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in self._rows())
        table = (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if body
                 else "<p>no escalations</p>")
        tail = "".join(f"<p>{escape(line)}</p>" for line in self._last_call_lines())
        return (f"<div><p><b>autofit</b> on {escape(str(self.device))} (policy {escape(self.policy)}): plan "
                f"<code>{escape('+'.join(self.plan) or 'device')}</code>; {escape(self._counts())}</p>"
                f"{table}{tail}</div>")

    def __repr__(self) -> str:
        return f"AutoFitControl(device={self.device}, policy={self.policy!r}, plan={self.plan}): {self._counts()}"


_SUMMARY_COLUMNS = ("#", "stage", "component", "action", "scope", "oom", "cause", "plan after")


# Methods the user may call after wrapping to offload the pipeline: autofit adopts the result as
# the plan to start from (and takes its own placement down first, so the two do not fight).
OFFLOAD_METHODS = frozenset({"enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload"})
# Methods that add, remove or rewrite weights (LoRA, IP-Adapter, textual inversion): they run on
# plain modules, and the plan in force is placed again, with the new modules, at the next call.
_RESHAPES = re.compile(r"(load|unload)_(lora_weights|ip_adapter|textual_inversion)|(un)?fuse_lora|delete_adapters")
# Public pipeline methods that run a component on their own: they run under recovery.
_RUNS_COMPONENTS = re.compile(r"(encode|decode)_\w+|prepare_ip_adapter_image_embeds")

_NO_COPY = ("an autofit proxy cannot be {what}: it holds the pipeline's live placement (hooks, weights on "
            "the device) and a lock. {todo}")


class AutoFitPipeline(wrapt.ObjectProxy):
    """A drop-in proxy: attribute reads and writes reach the pipeline, ``isinstance`` holds, and a
    call runs the pipeline with out-of-memory recovery.

    Methods that return the pipeline (``.to()``...) return the proxy; public methods that run a
    component (``encode_prompt``, ``encode_image``, ``decode_latents``...) run under recovery;
    offloading enabled through the proxy becomes autofit's starting plan; LoRA, IP-Adapter and
    textual-inversion loading and fusing run on plain modules, placed again at the next call.
    """

    def __init__(self, pipe: Any, runtime: Runtime):
        super().__init__(pipe)
        self._self_control = AutoFitControl(runtime)
        self._self_runtime = runtime

    @property
    def autofit(self) -> AutoFitControl:
        return self._self_control

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_runtime.call(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name.startswith("_") or not inspect.ismethod(value) or value.__self__ is not self.__wrapped__:
            return value
        return self._method(name, value)

    def _method(self, name: str, method: Any) -> Any:
        runtime, wrapped = self._self_runtime, self.__wrapped__
        if name in OFFLOAD_METHODS:
            def run(*args: Any, **kwargs: Any) -> Any:
                return runtime.adopt(lambda: method(*args, **kwargs))
        elif _RESHAPES.fullmatch(name):
            def run(*args: Any, **kwargs: Any) -> Any:
                return runtime.reshape(lambda: method(*args, **kwargs))
        elif _RUNS_COMPONENTS.fullmatch(name):
            def run(*args: Any, **kwargs: Any) -> Any:
                return runtime.call(args, kwargs, fn=method)
        else:
            run = method

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            out = run(*args, **kwargs)
            return self if out is wrapped else out  # ``pipe = autofit(pipe).to(...)`` keeps autofit

        return call

    def __copy__(self) -> Any:
        raise TypeError(_NO_COPY.format(what="copied", todo=(
            "Share the proxy itself, or wrap another pipeline: autofit(Pipeline.from_pipe(proxy.__wrapped__))"
            " makes a pipeline sharing the weights (see README, 'After wrapping').")))

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(_NO_COPY.format(what="deep-copied", todo=(
            "Deep-copy the pipeline before wrapping (copy.deepcopy(pipe), then autofit() the copy), "
            "or load a second one with from_pretrained.")))

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(_NO_COPY.format(what="pickled", todo=(
            "Pickle or save the pipeline instead (proxy.save_pretrained(folder), or pickle "
            "proxy.__wrapped__), and call autofit() again after loading it.")))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __repr__(self) -> str:
        return f"<AutoFitPipeline plan={self._self_control.plan} wrapping {self.__wrapped__!r}>"


def _parse_bytes(option: str, value: int | str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise AutoFitUsageError(f"{option}={value!r}: {exc}") from None


def _default_device(pipe: Any) -> torch.device:
    for module in module_components(pipe).values():
        for p in module.parameters():
            if p.device.type not in ("cpu", "meta"):
                return torch.device(p.device.type, p.device.index or 0)
            break
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", 0)
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(dev: torch.device) -> None:
    """Refuse a device this torch cannot use now, at wrap time rather than at the first call."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                     else f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA device")
            raise AutoFitUsageError(
                f"device={str(dev)!r}, but {build}. Install a CUDA build of torch (README, 'Install'), check "
                "nvidia-smi and CUDA_VISIBLE_DEVICES, or pass device='cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AutoFitUsageError(
                f"device={str(dev)!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES.")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise AutoFitUsageError(f"device={str(dev)!r}, but this torch sees no XPU; pass device='cpu' or install "
                                "an XPU build of torch.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise AutoFitUsageError(f"device={str(dev)!r}, but MPS is not available here; pass device='cpu'.")


def valid_plan_names() -> str:
    """Every name ``plan=`` accepts, placements first, as an error message lists them."""
    from autofit.plan import EXTRAS, PLACEMENTS, QUANTIFIED, RESIDENT_MAX, RESIDENT_MIN

    places = [f"{p}:N (N = {RESIDENT_MIN}..{RESIDENT_MAX}, % of the denoiser kept on the device; "
              f"bare: {QUANTIFIED[p]})" if p in QUANTIFIED else p for p in PLACEMENTS]
    return (f"one placement of {', '.join(places)}; plus any of {', '.join(EXTRAS)} (what each one is and the "
            "diffusers call it corresponds to: docs/recipes.md, 'Rungs and the diffusers calls they stand for')")


def parse_plan(plan: Any) -> tuple[str, ...]:
    """``plan=`` as names: a string (``"model_offload"``, ``"model_offload+vae_tiling"``; ``,``
    also separates) or a sequence of strings. Raises AutoFitUsageError naming every valid name."""
    import difflib

    from autofit.planning.rungs import RUNGS

    from autofit.plan import PLACEMENTS, split_name

    if isinstance(plan, str):
        names = tuple(n.strip() for n in re.split(r"[+,]", plan) if n.strip())
    elif isinstance(plan, (list, tuple)) and all(isinstance(n, str) for n in plan):
        names = tuple(n.strip() for n in plan)
    else:
        raise AutoFitUsageError(f"plan={plan!r}: give rung names as a string (\"model_offload\", "
                                f"\"model_offload+vae_tiling\") or a list of strings; {valid_plan_names()}")
    known = {"device", *RUNGS}
    for name in names:
        family = name.partition(":")[0]
        if family not in known:
            close = difflib.get_close_matches(family, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AutoFitUsageError(f"plan={plan!r}: unknown rung {name!r}{hint}; {valid_plan_names()}")
        try:
            split_name(name)
        except ValueError as exc:
            raise AutoFitUsageError(f"plan={plan!r}: {exc}") from None
    placements = [n for n in names if n.partition(":")[0] in PLACEMENTS]
    if len(placements) > 1:
        raise AutoFitUsageError(f"plan={plan!r}: a plan has one placement, got {placements}; {valid_plan_names()}")
    return names


@dataclass(frozen=True, slots=True)
class Options:
    """:func:`autofit`'s options, checked and resolved: the device chosen, the byte caps parsed,
    the plan to start from (and whether it is already placed: adopted offloading)."""

    device: torch.device
    policy: str
    max_retries: int
    start: Plan
    applied: Plan | None  # the user's offloading, already in place, when it is the plan to start from
    adopted: str | None  # the offloading the pipeline came with (diffusers' placement name)
    preflight: bool
    cache: PlanCache | None
    max_vram: int | None
    max_ram: int | None
    compile: compiling.CompileOptions | None = None

    @classmethod
    def parse(cls, pipe: Any, *, device: str | torch.device | None = None, policy: str = DEFAULT_POLICY,
              max_retries: int = 8, plan: str | tuple[str, ...] | list[str] | None = None, preflight: bool = True,
              cache: bool | str | os.PathLike = True, max_vram: int | str | None = None,
              max_ram: int | str | None = None,
              compile: bool | str | dict[str, Any] | compiling.CompileOptions | None = False) -> Options:
        """Check every option (see :func:`autofit`); raises :class:`AutoFitUsageError` saying what to do."""
        _check_pipe(pipe)
        if policy not in POLICIES:
            raise AutoFitUsageError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise AutoFitUsageError(f"max_retries must be an int >= 0, got {max_retries!r}")
        dev = _resolve_device(pipe, device)
        compile_options = compiling.parse_compile(compile)
        vram_cap, ram_cap = _parse_bytes("max_vram", max_vram), _parse_bytes("max_ram", max_ram)
        if cache is True:
            plan_cache: PlanCache | None = PlanCache()
        elif cache is False or cache is None:
            plan_cache = None
        else:
            plan_cache = PlanCache(cache)
        adopted = _diffusers.detect_placement(pipe)
        start, applied = _start(plan, adopted, dev)
        return cls(dev, policy, max_retries, start, applied, adopted, preflight and plan is None and adopted is None,
                   plan_cache, vram_cap, ram_cap, compile_options)


def _check_pipe(pipe: Any) -> None:
    if isinstance(pipe, AutoFitPipeline):
        raise AutoFitUsageError(
            "this pipeline is already wrapped by autofit; use it as it is (its options are in "
            "`proxy.autofit`), or wrap the original `proxy.__wrapped__` again."
        )
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise AutoFitUsageError(
            f"autofit() expects a diffusers DiffusionPipeline, got {type(pipe).__name__}. "
            "Load one with e.g. DiffusionPipeline.from_pretrained(...) and pass it in."
        )


def _resolve_device(pipe: Any, device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(device) if device is not None else _default_device(pipe)
    except (RuntimeError, TypeError) as exc:
        raise AutoFitUsageError(f"device={device!r} is not a torch device ({exc}); try 'cuda' or 'cpu'") from None
    if dev.type == "cpu":
        dev = torch.device("cpu")  # "cpu:0" (accelerate's name for it) is the same device
    _check_available(dev)
    if dev.type != "cpu" and dev.index is None:
        # Weights report an indexed device ("sim:0", "xpu:0", "mps:0"): compared with a bare
        # "sim", a component on the device would never count as there.
        dev = torch.device(dev.type, _current_index(dev.type))
    return dev


def _current_index(device_type: str) -> int:
    """The index torch uses for ``device_type`` when none is given (its current device)."""
    if device_type == "cuda":
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and accelerator.type == device_type:
        return torch.accelerator.current_device_index()
    return 0


def _start(plan: Any, adopted: str | None, dev: torch.device) -> tuple[Plan, Plan | None]:
    """(the plan to start from, the plan the weights are already placed for: adopted offloading)."""
    if plan is not None:
        names = parse_plan(plan)
        try:
            start = Plan.from_names(names)
        except ValueError as exc:
            raise AutoFitUsageError(f"plan={plan!r}: {exc}; {valid_plan_names()}") from None
        if start.bitsandbytes:
            why = quantize.missing(dev.type)
            if why:
                raise AutoFitUsageError(f"plan={plan!r} quantizes with bitsandbytes, which cannot run here: {why}")
        return start, None
    if adopted is not None:
        return Plan(adopted), Plan(adopted)  # keep the user's offloading as it is
    return Plan(), None


def autofit(
    pipe: Any,
    *,
    device: str | torch.device | None = None,
    policy: str = DEFAULT_POLICY,
    max_retries: int = 8,
    plan: str | tuple[str, ...] | list[str] | None = None,
    preflight: bool = True,
    cache: bool | str | os.PathLike = True,
    max_vram: int | str | None = None,
    max_ram: int | str | None = None,
    compile: bool | str | dict[str, Any] | compiling.CompileOptions | None = False,
) -> AutoFitPipeline:
    """Wrap a diffusers pipeline so that out-of-memory errors are recovered at the failing stage.

    Args:
        pipe: any ``diffusers.DiffusionPipeline``, on the CPU or on the device.
        device: where to run; default: the device the pipeline is on, else the first accelerator,
            else the CPU.
        policy: which rungs are allowed. ``"quality"`` (default): lossless rungs and VAE tiling;
            ``"balanced"``, ``"speed"``, ``"memory"``: also lossy ones (fp8 weight storage).
        max_retries: escalations allowed within one call before giving up.
        plan: rung names to start from (see ``proxy.autofit.plan``): a string
            (``"model_offload"``, ``"model_offload+vae_tiling"``) or a sequence of names, e.g.
            ``("group_leaf_stream", "vae_tiling")``; turns preflight off. Every name, and the
            diffusers call each stands for: docs/recipes.md.
        preflight: at the first call of a workload, start from the plan predicted fastest among
            those that fit (or the cached plan that worked before), instead of from everything on
            the device.
        cache: the plan cache: True (``$AUTOFIT_CACHE_DIR`` or ``~/.cache/autofit``), a folder, or
            False for none.
        max_vram, max_ram: cap the device / host memory autofit plans for (bytes or "8GiB").
        compile: compile the denoiser once the first call's plan is placed (off by default):
            True or "auto" (regional where it declares ``_repeated_blocks``, else the whole
            module), "regional", "full", or a dict / :class:`~autofit.strategies.compiling.CompileOptions`
            with ``how``, ``backend``, ``mode``, ``fullgraph``, ``dynamic`` (e.g.
            ``{"backend": "eager"}``). A plan change recompiles at most once per compiled region;
            ``last_call["compile_seconds"]`` says what a call spent compiling. docs/recipes.md,
            "Compiled pipelines".
    """
    return wrap(pipe, Options.parse(pipe, device=device, policy=policy, max_retries=max_retries, plan=plan,
                                    preflight=preflight, cache=cache, max_vram=max_vram, max_ram=max_ram,
                                    compile=compile))


def wrap(pipe: Any, options: Options, *, readings: Readings | None = None,
         relaxation: Relaxation[Plan] | None = None) -> AutoFitPipeline:
    """:func:`autofit` with its options already checked, and the engine's two seams: what it
    reads of the machine (``readings``, a :class:`~autofit.engine.readings.Readings`) and how it
    paces probes back down (``relaxation``, a :class:`~autofit.engine.relax.Relaxation`)."""
    o = options
    runtime = Runtime(pipe, device=o.device, policy=o.policy, max_retries=o.max_retries, plan=o.start,
                      applied=o.applied, preflight=o.preflight, cache=o.cache, max_vram=o.max_vram,
                      max_ram=o.max_ram, readings=readings, relaxation=relaxation)
    compiling.attach(pipe, o.compile, plan=lambda: runtime.plan)
    emit("wrapped", stage="load", action="none", attempt=0, pipeline=type(pipe).__name__, device=str(o.device),
         policy=o.policy, plan=",".join(o.start.names), adopted=o.adopted,
         weights_gib=gib(runtime.footprint.total, 3), **runtime.memory())
    return AutoFitPipeline(pipe, runtime)
