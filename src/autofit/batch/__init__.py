"""Prompt files run as resumable, kill-safe batch jobs (``autofit batch``): ``items`` reads and
checks a prompts file, ``runner`` runs it."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BatchError", "BatchItem", "BatchReport", "RejectedItem", "item_key", "iter_manifest", "pending",
           "read_items", "run_batch"]
_HOME = {"BatchItem": "items", "RejectedItem": "items", "read_items": "items"}


def __getattr__(name: str) -> Any:  # PEP 562: reading a prompts file does not import torch
    if name in __all__:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME.get(name, 'runner')}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
