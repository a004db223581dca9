"""``autofit(pipe)`` and the proxy it returns: delegation, nothing clever."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import wrapt

from . import _diffusers
from .errors import AutoFitUsageError
from .events import emit
from .ladder import POLICIES, DEFAULT_POLICY
from .cache import PlanCache
from .plan import Plan
from .runtime import EscalationRecord, Runtime
from .stages import module_components


class AutoFitControl:
    """What ``proxy.autofit`` exposes: the plan in force, the escalation history, options."""

    def __init__(self, runtime: Runtime):
        self._rt = runtime

    @property
    def plan(self) -> tuple[str, ...]:
        """The strategies applied now, in application order (empty: everything on the device)."""
        return self._rt.plan.names

    @property
    def history(self) -> tuple[EscalationRecord, ...]:
        """One record per escalation step, oldest first, across all calls."""
        return tuple(self._rt.history)

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def policy(self) -> str:
        return self._rt.policy

    @property
    def last_call(self) -> dict[str, Any]:
        """Seconds, attempts, seconds lost and plan of the last successful call."""
        return dict(self._rt.last_call)

    @property
    def footprint(self):
        return self._rt.footprint

    def reset(self) -> None:
        """Go back to the plan autofit started with (applied at the next call)."""
        with self._rt.lock:
            self._rt.plan = self._rt.initial_plan
            self._rt._signature = None  # plan again at the next call

    def __repr__(self) -> str:
        return f"AutoFitControl(device={self.device}, policy={self.policy!r}, plan={self.plan})"


class AutoFitPipeline(wrapt.ObjectProxy):
    """A drop-in proxy: attribute reads and writes reach the pipeline, ``isinstance`` holds, and a
    call runs the pipeline with out-of-memory recovery."""

    def __init__(self, pipe: Any, runtime: Runtime):
        super().__init__(pipe)
        self._self_control = AutoFitControl(runtime)
        self._self_runtime = runtime

    @property
    def autofit(self) -> AutoFitControl:
        return self._self_control

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_runtime.call(args, kwargs)

    def __repr__(self) -> str:
        return f"<AutoFitPipeline plan={self._self_control.plan} wrapping {self.__wrapped__!r}>"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: int | str) -> int:
    """``8GiB``, ``512MiB``, ``16GB``, ``1.5gib`` or a plain number of bytes."""
    if isinstance(text, bool):
        raise ValueError("a size, not a bool")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{text!r} is not a size; write e.g. 8GiB, 512MiB or 16GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


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


def autofit(
    pipe: Any,
    *,
    device: str | torch.device | None = None,
    policy: str = DEFAULT_POLICY,
    max_retries: int = 8,
    plan: tuple[str, ...] | list[str] | None = None,
    preflight: bool = True,
    cache: bool | str | os.PathLike = True,
    max_vram: int | str | None = None,
    max_ram: int | str | None = None,
) -> AutoFitPipeline:
    """Wrap a diffusers pipeline so that out-of-memory errors are recovered at the failing stage.

    Args:
        pipe: any ``diffusers.DiffusionPipeline``, on the CPU or on the device.
        device: where to run; default: the device the pipeline is on, else the first accelerator,
            else the CPU.
        policy: which rungs are allowed. ``"quality"`` (default): lossless rungs and VAE tiling;
            ``"balanced"``, ``"speed"``, ``"memory"``: also lossy ones (fp8 weight storage).
        max_retries: escalations allowed within one call before giving up.
        plan: strategy names to start from (see ``proxy.autofit.plan``), e.g. ``("model_offload",)``;
            turns preflight off.
        preflight: at the first call of a workload, start from the plan predicted fastest among
            those that fit (or the cached plan that worked before), instead of from everything on
            the device.
        cache: the plan cache: True (``$AUTOFIT_CACHE_DIR`` or ``~/.cache/autofit``), a folder, or
            False for none.
        max_vram, max_ram: cap the device / host memory autofit plans for (bytes or "8GiB").
    """
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
    if policy not in POLICIES:
        raise AutoFitUsageError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise AutoFitUsageError(f"max_retries must be an int >= 0, got {max_retries!r}")
    try:
        dev = torch.device(device) if device is not None else _default_device(pipe)
    except (RuntimeError, TypeError) as exc:
        raise AutoFitUsageError(f"device={device!r} is not a torch device ({exc}); try 'cuda' or 'cpu'") from None
    if dev.type == "cpu":
        dev = torch.device("cpu")  # "cpu:0" (accelerate's name for it) is the same device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)

    vram_cap = _parse_bytes("max_vram", max_vram)
    ram_cap = _parse_bytes("max_ram", max_ram)
    if cache is True:
        plan_cache: PlanCache | None = PlanCache()
    elif cache is False or cache is None:
        plan_cache = None
    else:
        plan_cache = PlanCache(cache)
    adopted = _diffusers.detect_placement(pipe)
    if plan is not None:
        try:
            start = Plan.from_names(tuple(plan))
        except ValueError as exc:
            raise AutoFitUsageError(f"plan={plan!r}: {exc}") from None
        if start.storage in ("int8", "nf4"):
            from .strategies.quantize import missing

            why = missing(dev.type)
            if why:
                raise AutoFitUsageError(f"plan={plan!r} quantizes with bitsandbytes, which cannot run here: {why}")
        applied = None
    elif adopted is not None:
        start, applied = Plan(adopted), Plan(adopted)  # keep the user's offloading as it is
    else:
        start, applied = Plan(), None
    runtime = Runtime(
        pipe, device=dev, policy=policy, max_retries=max_retries, plan=start, applied=applied,
        preflight=preflight and plan is None and adopted is None, cache=plan_cache,
        max_vram=vram_cap, max_ram=ram_cap,
    )
    emit(
        "wrapped",
        stage="load",
        action="none",
        attempt=0,
        pipeline=type(pipe).__name__,
        device=str(dev),
        policy=policy,
        plan=",".join(start.names),
        adopted=adopted,
        weights_gib=round(runtime.footprint.total / 2**30, 3),
        **runtime.memory(),
    )
    return AutoFitPipeline(pipe, runtime)
