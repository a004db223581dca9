"""What reaches the terminal: results on stdout, autofit's log lines on stderr (through tqdm while a
bar is drawn), dependencies' notices silenced, a closed stdout ended quietly.

Every command runs with dependencies quiet (:func:`quiet_dependencies`): transformers' torchvision
fallbacks, bitsandbytes' kernel notices and diffusers' loading bars say nothing a user of the
command can act on. ``--debug`` shows them; ``--quiet`` also drops autofit's own INFO lines and
every progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record; while a tqdm progress bar
    is on the terminal, through ``tqdm.write``, which clears the bar, writes the line and draws
    the bar again below it (a log line never lands in the middle of a bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        tqdm_std = sys.modules.get("tqdm.std")
        bars = getattr(getattr(tqdm_std, "tqdm", None), "_instances", None)
        if not bars:
            super().emit(record)
            return
        try:
            tqdm_std.tqdm.write(self.format(record), file=sys.stderr)  # type: ignore[union-attr]
        except Exception:
            self.handleError(record)


# Loggers of dependencies that write warnings and notices on import or load (transformers'
# torchvision fallbacks, bitsandbytes' kernel downloads...): raised to ERROR.
_NOISY = ("transformers", "diffusers", "accelerate", "bitsandbytes", "huggingface_hub", "torchao", "torch",
          "kernels")
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_BAR_MODULES = ("diffusers.utils.logging", "transformers.utils.logging")
# The libraries' loading bars turned off by the quiet context now in force, with whether they were
# on (None: no quiet context): a library imported inside the context is hushed by hush_loading_bars.
_hushed: list[tuple[ModuleType, bool]] | None = None


def hush_loading_bars() -> None:
    """Turn off the loading bars of diffusers and transformers if they are imported by now (they
    read their setting at import, so a command calls this after importing them). Nothing outside
    :func:`quiet_dependencies`; undone when it ends."""
    if _hushed is None:
        return
    seen = {id(module) for module, _ in _hushed}
    for name in _BAR_MODULES:
        module = sys.modules.get(name)
        if module is not None and id(module) not in seen and hasattr(module, "is_progress_bar_enabled"):
            _hushed.append((module, module.is_progress_bar_enabled()))
            module.disable_progress_bar()


@contextmanager
def quiet_dependencies(on: bool = True, *, bars: bool = True) -> Iterator[None]:
    """Dependencies' warnings, notices and loading bars silenced (their errors still show) for the
    command's duration; ``bars=False`` (--quiet) turns off every tqdm bar too. Environment,
    loggers, warning filters and bars are restored afterwards."""
    global _hushed
    if not on or _hushed is not None:  # off (--debug), or already inside one
        yield
        return
    import warnings

    env = {**_QUIET_ENV, **({} if bars else {"TQDM_DISABLE": "1"})}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    loggers = {name: logging.getLogger(name) for name in _NOISY}
    levels = {name: log.level for name, log in loggers.items()}
    for log in loggers.values():
        log.setLevel(logging.ERROR)
    _hushed = []
    hush_loading_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars:  # autofit's own warnings still show, except under --quiet
                warnings.filterwarnings("default", module=r"autofit(\.|$)")
            yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, log in loggers.items():
            log.setLevel(levels[name])
        for module, enabled in _hushed:
            if enabled:
                module.enable_progress_bar()
        _hushed = None


@contextmanager
def logs_to_stderr(quiet: bool = False) -> Iterator[None]:
    """Results go to stdout, logs to stderr, always (``autofit batch --json | jq`` works); INFO
    and up, WARNING and up under --quiet. The logger is left as it was afterwards: ``main()``
    called in-process configures nothing for good."""
    log = logging.getLogger("autofit")
    level = log.level
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the first line, at most 300 characters)."""
    text = " ".join(str(exc).split("\n")[0].split())[:300]
    return text or type(exc).__name__


def stdout_gone() -> None:
    """stdout's reader went away (``| head``): point stdout at /dev/null so that the flush at exit
    does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
        pass
