"""autofit: diffusers pipelines that recover from out-of-memory at the stage that failed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autofit._version import __version__

if TYPE_CHECKING:
    from autofit.errors import AutoFitExhausted, AutoFitUsageError, CheckpointChanged
    from autofit.plan import Plan
    from autofit.proxy import AutoFitControl, AutoFitPipeline, autofit
    from autofit.records import EscalationRecord

__all__ = [
    "AutoFitControl",
    "AutoFitExhausted",
    "AutoFitPipeline",
    "AutoFitUsageError",
    "CheckpointChanged",
    "EscalationRecord",
    "Plan",
    "__version__",
    "autofit",
]

# Imported on first use (PEP 562), so `autofit --help` and `autofit.cli` do not pay for torch.
_HOME = {"AutoFitExhausted": "errors", "AutoFitUsageError": "errors", "CheckpointChanged": "errors",
         "Plan": "plan", "AutoFitControl": "proxy", "AutoFitPipeline": "proxy", "autofit": "proxy",
         "EscalationRecord": "records"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autofit' has no attribute {name!r}")
