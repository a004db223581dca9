"""autofit's version, read from the installed distribution's metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "autofit-diffusers"  # the name in pyproject.toml's [project]
_FALLBACK = "0.0.0+unknown"  # running from a source tree that was never installed


def _read() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return _FALLBACK


__version__ = _read()
