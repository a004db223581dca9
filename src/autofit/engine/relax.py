"""The way back: after OOMs pushed the plan up the ladder, probe it back down once calls succeed.

A plan's life is a path: the planned plan first, each escalation appended, the plan in force
last. After ``wait`` successful calls in a row, one call runs on the plan one step back down
(a probe). If the probe call completes, that step is undone for good and the wait starts again;
if it runs out of memory, the stage-local retry puts the plan it came from back, and the wait
doubles, up to a cap. Failed probes may take at most ``probe_share`` of the time this wrapper has
run, so a machine that never has the memory pays little for asking. Successes alone drive it:
it works where no memory figure exists (the CPU, injected OOMs). Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")

FIRST_WAIT = 4  # successful calls before the first probe
MAX_WAIT = 16  # the wait doubles after each failed probe, up to this
PROBE_SHARE = 0.03  # failed probes' share of the run time, at most


@dataclass(slots=True)
class Relaxation(Generic[P]):
    first_wait: int = FIRST_WAIT
    max_wait: int = MAX_WAIT
    probe_share: float = PROBE_SHARE
    path: list[P] = field(default_factory=list)
    wait: int = FIRST_WAIT
    successes: int = 0
    probing: P | None = None  # the plan a probe came down from, while the probe runs
    failed_probes: int = 0
    probe_seconds_lost: float = 0.0

    def __post_init__(self) -> None:
        if self.first_wait < 1 or self.max_wait < self.first_wait:
            raise ValueError("need 1 <= first_wait <= max_wait")
        self.wait = self.first_wait

    @property
    def escalated(self) -> bool:
        return len(self.path) > 1

    @property
    def planned(self) -> P | None:
        return self.path[0] if self.path else None

    def plan_chosen(self, plan: P) -> None:
        """The planner (or the user) chose ``plan``: the path starts again from it."""
        self.path = [plan]
        self.wait, self.successes, self.probing = self.first_wait, 0, None

    def escalated_to(self, plan: P) -> None:
        """An OOM moved the plan to ``plan``. Going back to a plan already on the path cuts the
        path there (no cycles); the count of successes starts again."""
        if plan in self.path:
            del self.path[self.path.index(plan) + 1:]
        else:
            self.path.append(plan)
        self.successes = 0

    def call_succeeded(self) -> None:
        if self.probing is not None:
            self.probing = None  # the step down held for a whole call: keep it
            self.wait = self.first_wait
            self.successes = 0
            return
        self.successes += 1

    def probe(self, elapsed_seconds: float) -> P | None:
        """The plan to try on the next call, one step back down, or None to stay."""
        if not self.escalated or self.probing is not None or self.successes < self.wait:
            return None
        if self.probe_seconds_lost > self.probe_share * elapsed_seconds:
            return None
        self.probing = self.path[-1]
        del self.path[-1]
        return self.path[-1]

    def probe_refused(self) -> None:
        """The plan one step down cannot run here now (it needs host RAM or disk the machine does
        not have): no probe; the count of successes starts again, the wait unchanged."""
        assert self.probing is not None, "no probe is running"
        self.path.append(self.probing)
        self.probing = None
        self.successes = 0

    def probe_failed(self, seconds_lost: float) -> P:
        """The probe ran out of memory: the plan it came down from, to go back to."""
        assert self.probing is not None, "no probe is running"
        back, self.probing = self.probing, None
        self.path.append(back)
        self.wait = min(2 * self.wait, self.max_wait)
        self.successes = 0
        self.failed_probes += 1
        self.probe_seconds_lost += seconds_lost
        return back
