"""Frozen records of what happened, each turned into one log event, and the one serialiser of a
plan with its history (:func:`plan_record`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    """One escalation step: what failed where, and which rung was applied (``action``)."""

    stage: str
    action: str
    error: str
    attempt: int
    component: str | None
    oom_kind: str  # "device", "host", or "none" for a roll back after a non-OOM failure
    scope: str  # "stage": retried in place; "call": whole call rerun; "load": while placing weights
    plan: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    # Why the OOM happened (autofit.planning.explain): "plan" (explained by the plan's own memory), "others",
    # "fragmentation", "unknown", "host" (host RAM); "" where no OOM was judged (roll backs, probes).
    cause: str = ""

    def event_fields(self) -> dict[str, Any]:
        """The flat fields of the ``autofit.escalate`` event for this step."""
        return dict(stage=self.stage, action=self.action, attempt=self.attempt, component=self.component,
                    scope=self.scope, oom=self.oom_kind, cause=self.cause or None, error=self.error,
                    plan=",".join(self.plan))

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists): how files and documents record this step."""
        return {"stage": self.stage, "action": self.action, "error": self.error, "attempt": self.attempt,
                "component": self.component, "oom_kind": self.oom_kind, "scope": self.scope,
                "plan": list(self.plan), "skipped": [list(s) for s in self.skipped], "cause": self.cause}


def plan_record(plan: Iterable[str], history: Iterable[EscalationRecord],
                last_call: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON-ready form of a plan and its history (``autofit run``'s plan file and
    ``--json``, the batch manifest's rows, the demo): ``plan`` (rung names, empty for all on the
    device), ``escalations`` (one :meth:`EscalationRecord.as_dict` per step) and, when given, the
    ``last_call`` figures."""
    record: dict[str, Any] = {"plan": list(plan), "escalations": [r.as_dict() for r in history]}
    if last_call is not None:
        record["last_call"] = {k: list(v) if isinstance(v, tuple) else v for k, v in last_call.items()}
    return record
