"""The call in progress (its workload, time lost, the RNG state to rerun it from, and its tries
so far: :class:`Retries`), what preflight chose for a workload, and the escalation history
across calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from autofit.planning.context import Machine, Workload
from autofit.plan import Plan
from autofit.records import EscalationRecord


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


# An OOM the plan does not explain is retried this many times on the same plan, per stage and call.
SAME_PLAN_RETRIES = 1
# With no rung left, the same plan is retried after these waits (seconds) before giving up.
LAST_RUNG_BACKOFF = (0.5, 1.0, 2.0)


@dataclass(slots=True)
class Retries:
    """A call's tries so far, handed to recovery's policy (tenacity's retry state): attempts,
    retries of the same plan per stage, backoffs once no rung was left, the call's escalation
    records. Only its own methods change it."""

    _attempts: int = 0
    _same_plan: dict[str, int] = field(default_factory=dict)  # stage -> retries on the plan in force
    _backoffs: int = 0  # retries with backoff once no rung was left
    _records: list[EscalationRecord] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return self._attempts

    @property
    def records(self) -> tuple[EscalationRecord, ...]:
        return tuple(self._records)

    def same_plan_left(self, stage: str) -> bool:
        """Whether an OOM the plan does not explain may still be retried on the same plan."""
        return self._same_plan.get(stage, 0) < SAME_PLAN_RETRIES

    def backoff(self) -> float | None:
        """The wait before the next retry of the plan in force with no rung left; None: none left."""
        return LAST_RUNG_BACKOFF[self._backoffs] if self._backoffs < len(LAST_RUNG_BACKOFF) else None

    def attempt(self) -> int:
        """One more attempt; returns how many so far."""
        self._attempts += 1
        return self._attempts

    def retried_same_plan(self, stage: str) -> None:
        self._same_plan[stage] = self._same_plan.get(stage, 0) + 1

    def backed_off(self) -> None:
        self._backoffs += 1

    def add(self, record: EscalationRecord) -> None:
        self._records.append(record)


@dataclass(slots=True)
class CallState:
    """The call in progress: its shape (the latent size is learned at decode), the time it
    started and lost, the stage last entered, and the RNG state to rerun it from. Written by the
    runtime only, but for ``retries`` (changed by its own methods, from recovery)."""

    shape: Workload
    rng: RngSnapshot
    started: float = field(default_factory=time.perf_counter)
    seconds_lost: float = 0.0
    entered: str | None = None  # the last stage entered in this attempt (None: none yet)
    applied_at_start: bool = False  # the call started by placing a plan (something to remember)
    retries: Retries = field(default_factory=Retries)  # recovery's count of this call's tries


@dataclass(frozen=True, slots=True)
class Choice:
    """What preflight chose for a workload (see :mod:`autofit.engine.preflight`); ``plan`` None: keep
    the plan in force. Frozen: preflight is its only writer."""

    signature: tuple[int, ...]
    plan: Plan | None = None
    key: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    machine: Machine | None = None  # what preflight probed for this workload
    workload: Workload | None = None
    predicted: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] | None = None  # activations stored in the plan cache
    broken: dict[str, set[str]] = field(default_factory=dict)  # broken rungs stored in the cache
    device_total: int | None = None  # the device's memory: bounds what a stored measurement can be

    @property
    def budget(self) -> int | None:
        """The device budget preflight probed for this workload (None: not probed)."""
        return self.machine.budget_bytes if self.machine is not None else None


class History:
    """One record per escalation step (and probe, relaxation, roll back), oldest first, across calls."""

    def __init__(self) -> None:
        self._records: list[EscalationRecord] = []

    def add(self, record: EscalationRecord) -> None:
        self._records.append(record)

    @property
    def records(self) -> tuple[EscalationRecord, ...]:
        return tuple(self._records)
