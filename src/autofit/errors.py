"""The exceptions autofit raises itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runtime import EscalationRecord


class AutoFitExhausted(torch.OutOfMemoryError):
    """Every strategy the policy allows was tried and the stage still ran out of memory.

    A subclass of ``torch.OutOfMemoryError``, so ``except torch.OutOfMemoryError`` keeps working.
    The pipeline stays usable: the next call starts from the last plan.
    """

    def __init__(self, message: str, *, stage: str, history: Sequence[EscalationRecord]):
        super().__init__(message)
        self.stage = stage
        self.history = tuple(history)


class AutoFitUsageError(ValueError):
    """autofit was called with something it cannot work with; the message says what to do."""


class CheckpointChanged(RuntimeError):
    """A one-way rung (fp8, nf4, int8) could not be undone: the checkpoint file autofit compared the
    original weights with changed or vanished since. The component keeps its current, working
    weights and the rung stays applied; reload the pipeline to get the originals back."""
