"""A call's tries so far, handed to recovery's policy (tenacity's retry state): how many
attempts, how many retries of the same plan per stage, how many backoffs once no rung was left,
and the escalation records of the call. Only its own methods change it."""

from __future__ import annotations

from dataclasses import dataclass, field

from autofit.records import EscalationRecord

# An OOM the plan does not explain is retried this many times on the same plan, per stage and call.
SAME_PLAN_RETRIES = 1
# With no rung left, the same plan is retried after these waits (seconds) before giving up.
LAST_RUNG_BACKOFF = (0.5, 1.0, 2.0)


@dataclass(slots=True)
class Retries:
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
