"""The exceptions autofit raises itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from autofit.records import EscalationRecord


class AutoFitExhausted(torch.OutOfMemoryError):
    """Every rung the policy allows was tried and the stage still ran out of memory.

    A subclass of ``torch.OutOfMemoryError``, so ``except torch.OutOfMemoryError`` keeps working.
    The pipeline stays usable: the next call starts from the last plan.
    """

    def __init__(self, message: str, *, stage: str, history: Sequence[EscalationRecord]):
        super().__init__(message)
        self.stage = stage
        self.history = tuple(history)


def exhausted_message(*, stage: str, why: str, tried: Sequence[str], plan: Sequence[str], policy: str,
                      error: str) -> str:
    """What :class:`AutoFitExhausted` says: what was tried (or the plan that was in force when
    nothing was), and advice that fits the policy (no "allow lossy rungs" where they are allowed)."""
    in_force = "+".join(plan) or "everything on the device"
    if tried:
        done = f"Tried: {', '.join(tried)}; the plan in force was {in_force}."
    else:
        done = f"Nothing was left to try: the plan in force was {in_force}."
    if policy == "quality":
        advice = "allow lossy rungs (fp8, nf4/int8 weights) with autofit(pipe, policy='balanced'), "
    elif policy != "memory":
        advice = "plan for the least device memory with autofit(pipe, policy='memory'), "
    else:
        advice = ""
    return (f"autofit could not fit the {stage} stage ({why}). {done} Last error: {error}. What to do: {advice}"
            f"lower the resolution or batch size, or free device memory held by other processes. "
            f"The pipeline is still usable.")


class AutoFitUsageError(ValueError):
    """autofit was called with something it cannot work with; the message says what to do."""


class CheckpointChanged(RuntimeError):
    """A one-way rung (fp8, nf4, int8) could not be undone: the checkpoint file autofit compared the
    original weights with changed or vanished since. The component keeps its current, working
    weights and the rung stays applied; reload the pipeline to get the originals back."""
