"""The wrapper's state across calls, and one object for the call in progress.

The plan in force is read-only here: :mod:`autofit.engine.switch` is its only writer (it assigns
``WrapperState._plan`` after the weights are where the plan says).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from autofit.planning.context import Machine, Workload
from autofit.plan import Plan
from autofit.records import EscalationRecord
from autofit.engine.relax import Relaxation


def _generators(kwargs: dict[str, Any]) -> list[torch.Generator]:
    gen = kwargs.get("generator")
    if isinstance(gen, torch.Generator):
        return [gen]
    if isinstance(gen, (list, tuple)):
        return [g for g in gen if isinstance(g, torch.Generator)]
    return []


class RngSnapshot:
    """The caller's generators and the global RNGs at the start of a call."""

    def __init__(self, kwargs: dict[str, Any]):
        self._gens = [(g, g.get_state()) for g in _generators(kwargs)]
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        for g, state in self._gens:
            g.set_state(state)
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)


@dataclass(slots=True)
class CallState:
    """The call in progress: its shape, attempts, time lost, escalations, the stage running, the
    peak of each stage with the plan it ran under, and the RNG state to rerun it from."""

    shape: Workload  # what the call makes; the latent size is learned at decode
    rng: RngSnapshot
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    seconds_lost: float = 0.0
    records: list[EscalationRecord] = field(default_factory=list)
    stage: str | None = None  # the stage whose peak is being measured
    entered: str | None = None  # the last stage entered in this attempt (None: none yet)
    stage_peaks: dict[str, int] = field(default_factory=dict)
    stage_plans: dict[str, Plan] = field(default_factory=dict)
    applied_at_start: bool = False  # the call started by placing a plan (something to remember)
    same_plan_retries: dict[str, int] = field(default_factory=dict)  # stage -> retries on the plan in force
    last_rung_retries: int = 0  # retries with backoff once no rung was left


@dataclass(slots=True)
class Choice:
    """What preflight chose for a workload (see :mod:`autofit.engine.preflight`); ``plan`` None: keep
    the plan in force."""

    signature: tuple[int, ...]
    plan: Plan | None = None
    key: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    machine: Machine | None = None  # what preflight probed for this workload
    workload: Workload | None = None
    predicted: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] | None = None  # activations stored in the plan cache
    unusable: dict[str, set[str]] = field(default_factory=dict)  # broken rungs stored in the cache
    device_total: int | None = None  # the device's memory: bounds what a stored measurement can be


class WrapperState:
    """Everything a wrapped pipeline remembers between calls."""

    def __init__(self, *, plan: Plan, applied: Plan | None, initial_plan: Plan):
        self.lock = threading.RLock()
        self._plan = plan  # written by autofit.engine.switch only
        self.applied: Plan | None = applied  # the plan the weights are placed for; None: to place
        self.initial_plan = initial_plan
        self.history: list[EscalationRecord] = []
        self.unusable: dict[str, set[str]] = {}  # rung -> components it broke (plan cache too)
        self.measured: dict[str, dict[str, int]] = {}  # cache key -> stage -> activation bytes
        self.last_call: dict[str, Any] = {}
        self.calls = 0  # calls that succeeded (proxy.autofit.summary())
        self.calls_recovered = 0  # of which recovered from at least one failure
        self.call: CallState | None = None
        self.wrappers: Any = None  # the StageWrappers of the call in progress
        self.denoise_chunks = 1
        self.choice: Choice | None = None  # the last workload preflight saw; None: plan afresh
        self.predicted: dict[str, int] = {}
        self.predicted_plan: Plan | None = None
        self.dirty = False  # something learned that the plan cache should hear
        # The plan's way back down (autofit.engine.relax): the planned plan, each escalation, the plan in
        # force last; probed back down after a run of successful calls.
        self.relax: Relaxation[Plan] = Relaxation()
        # The plan the plan cache steers the next process to: the planned plan, raised only by
        # escalations the OOM's own figures explain, lowered by successful probes.
        self.steering: Plan | None = None
        self.started = time.perf_counter()
        self.budget_at_escalation: int | None = None  # the device budget when the plan was last escalated

    @property
    def plan(self) -> Plan:
        """The plan in force."""
        return self._plan

    @property
    def key(self) -> str | None:
        return self.choice.key if self.choice is not None else None
