"""Structured log events, all named ``autofit.<what>`` with flat fields.

A library must not print to the application's stdout. structlog's own default (before anyone
configures it) is a ``PrintLogger`` on stdout, so autofit only hands its events to structlog when
the application configured structlog itself (or a test captures them with
``structlog.testing.capture_logs``). Otherwise each event goes to the standard library logger
``autofit`` as one short ``key=value`` line, with the fields also in the record's ``autofit``
attribute: with no logging configured at all, Python prints WARNING and above to stderr and
nothing else. autofit never configures structlog or logging itself (the CLI does, for its own
process). Recipes for JSON, stdlib routing and silencing: docs/logging.md.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

LOGGER_NAME = "autofit"
_log = structlog.get_logger(LOGGER_NAME)
_stdlib = logging.getLogger(LOGGER_NAME)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# What an operator filtering on WARNING must see: memory ran out and autofit changed the plan,
# a switch to a lossy rung (weights changed), giving up. Per-rung skips are detail (DEBUG).
LEVELS = {
    "escalate": "warning",
    "recovered": "warning",
    "exhausted": "warning",
    "fp8_cast": "warning",
    "quantized": "warning",
    "rolled_back": "warning",
    "batch_item_failed": "warning",
    "retry_same_plan": "warning",
    "rung_skipped": "debug",
    "probe_skipped": "debug",
    "retry": "debug",
}


def _structlog_configured() -> bool:
    """True when the application (or a test's ``capture_logs``) set structlog up: anything other
    than structlog's built-in defaults, which print to stdout."""
    if not structlog.is_configured():
        return False
    from structlog import _config  # the built-in defaults have no public name

    config = structlog.get_config()
    default_processors = getattr(_config, "_BUILTIN_DEFAULT_PROCESSORS", None)
    if default_processors is None:
        return True  # cannot tell: trust the application's configuration
    processors = config["processors"]
    same_processors = len(processors) == len(default_processors) and all(
        a is b for a, b in zip(processors, default_processors))
    return not (same_processors
                and config["logger_factory"] is getattr(_config, "_BUILTIN_DEFAULT_LOGGER_FACTORY", None)
                and config["wrapper_class"] is getattr(_config, "_BUILTIN_DEFAULT_WRAPPER_CLASS", None))


def informative(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that carry information: no None, no empty text or collection, no placeholder
    ``action="none"`` or ``attempt=0``."""
    out = {}
    for key, value in fields.items():
        if value is None or (isinstance(value, (str, tuple, list, dict, set, frozenset)) and not value):
            continue
        if (key == "action" and value == "none") or (key == "attempt" and value == 0 and not isinstance(value, bool)):
            continue
        out[key] = value
    return out


def _line(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
    return " ".join(parts)


def emit(event: str, *, level: str | None = None, **fields: Any) -> None:
    """Log ``autofit.<event>`` at ``level`` (debug, info, warning, error; default: the event's
    level in :data:`LEVELS`, else info) with the fields that carry information."""
    level = level or LEVELS.get(event, "info")
    name = f"autofit.{event}"
    fields = informative(fields)
    if _structlog_configured():
        getattr(_log, level)(name, **fields)
        return
    number = _LEVELS[level]
    if _stdlib.isEnabledFor(number):
        _stdlib.log(number, _line(name, fields), extra={"autofit": {"event": name, **fields}})
