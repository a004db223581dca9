"""Structured log events, all named ``autofit.<what>`` with flat fields."""

from __future__ import annotations

from typing import Any

import structlog

_log = structlog.get_logger("autofit")


def emit(event: str, *, level: str = "info", **fields: Any) -> None:
    getattr(_log, level)(f"autofit.{event}", **fields)
