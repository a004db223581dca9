"""autofit: diffusers pipelines that recover from out-of-memory at the stage that failed."""

from .errors import AutoFitExhausted, AutoFitUsageError, CheckpointChanged
from .plan import Plan
from .proxy import AutoFitControl, AutoFitPipeline, autofit
from .runtime import EscalationRecord

__all__ = [
    "AutoFitControl",
    "AutoFitExhausted",
    "AutoFitPipeline",
    "AutoFitUsageError",
    "CheckpointChanged",
    "EscalationRecord",
    "Plan",
    "autofit",
]
__version__ = "0.1.0"
