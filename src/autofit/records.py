"""Frozen records of what happened, each turned into one log event."""

from __future__ import annotations

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
