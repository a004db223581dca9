"""The plan's course over calls: the plan to start from, its way up and back down
(:class:`autofit.engine.relax.Relaxation`), the plan the plan cache steers the next process to,
and the device budget at the last escalation. :class:`Course` alone changes them."""

from __future__ import annotations

import time

from autofit.plan import Plan
from autofit.engine.relax import Relaxation


class Course:
    def __init__(self, start: Plan, relaxation: Relaxation[Plan] | None = None):
        self._start = start  # the plan autofit started with (explicit, adopted, or plain)
        # The plan's way back down: the planned plan, each escalation, the plan in force last;
        # probed back down after a run of successful calls.
        self._relax: Relaxation[Plan] = relaxation if relaxation is not None else Relaxation()
        # The plan the plan cache steers the next process to: the planned plan, raised only by
        # escalations the OOM's own figures explain, lowered by successful probes.
        self._steering: Plan | None = None
        self._budget_at_escalation: int | None = None  # the device budget when the plan was last escalated
        self._started = time.perf_counter()

    # ---- read-only -----------------------------------------------------------------------------
    @property
    def start(self) -> Plan:
        return self._start

    @property
    def steering(self) -> Plan | None:
        return self._steering

    @property
    def path(self) -> tuple[Plan, ...]:
        """The planned plan, each escalation since, the plan in force last."""
        return tuple(self._relax.path)

    @property
    def planned(self) -> Plan | None:
        return self._relax.planned

    @property
    def escalated(self) -> bool:
        return self._relax.escalated

    @property
    def probing(self) -> Plan | None:
        """The plan a probe came down from, while the probe runs."""
        return self._relax.probing

    @property
    def wait(self) -> int:
        """Successful calls before the next probe."""
        return self._relax.wait

    @property
    def probe_seconds_lost(self) -> float:
        return self._relax.probe_seconds_lost

    @property
    def budget_at_escalation(self) -> int | None:
        return self._budget_at_escalation

    # ---- changes -------------------------------------------------------------------------------
    def chosen(self, plan: Plan) -> None:
        """The planner (or the user) chose ``plan``: the path starts again from it, and it steers."""
        self._relax.plan_chosen(plan)
        self._steering = plan

    def adopted(self, plan: Plan) -> None:
        """The user placed the weights as ``plan`` says: it is also the plan to start from."""
        self._start = plan
        self.chosen(plan)

    def probe(self) -> Plan | None:
        """The plan one step back down to try on this call, or None to stay."""
        return self._relax.probe(time.perf_counter() - self._started)

    def probe_refused(self) -> None:
        self._relax.probe_refused()

    def probe_failed(self, seconds_lost: float) -> Plan:
        """The probe ran out of memory: the plan it came down from, to go back to."""
        return self._relax.probe_failed(seconds_lost)

    def escalated_to(self, plan: Plan, *, steer: bool, budget: int | None) -> None:
        """An OOM moved the plan to ``plan``; ``steer``: the next process starts there too."""
        self._relax.escalated_to(plan)
        if steer or self._steering is None:
            self._steering = plan
        self._budget_at_escalation = budget

    def budget_seen(self) -> None:
        """The memory came back: no escalation is waiting for it any more."""
        self._budget_at_escalation = None

    def succeeded(self, plan: Plan) -> bool:
        """A call succeeded on ``plan``. True when it was a probe: the step down stays."""
        if self._relax.probing is None:
            self._relax.call_succeeded()
            return False
        self._relax.call_succeeded()
        if self._steering not in self._relax.path:
            self._steering = plan
        return True
