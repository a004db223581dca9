"""Where autofit keeps its files: the plan cache and, under it, the disk-offload folders."""

from __future__ import annotations

import os
from pathlib import Path


def default_dir() -> Path:
    """``$AUTOFIT_CACHE_DIR``, else ``autofit/`` in the user's cache folder (``$XDG_CACHE_HOME``)."""
    env = os.environ.get("AUTOFIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autofit"
