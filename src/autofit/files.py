"""Files written whole or not at all: a temporary file beside the target, renamed over it.

The temporary's name (``.<name>.<token>.<pid>.tmp<suffix>``) is one no user file has: removing it
on failure removes only what this write made, and :func:`stale_temporary` tells a crashed write's
leftover (its process gone) from a user's file.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

# What temporary_name makes; also the older ".<stem>.<pid>.tmp<suffix>" of autofit's batch runner.
_TEMPORARY = re.compile(r"\..+?\.(?:[0-9a-f]{8}\.)?(?P<pid>\d+)\.tmp(?:\.[^.]*)?")


def temporary_name(path: Path) -> Path:
    """A fresh name beside ``path`` for writing it (same suffix, so writers that pick the format
    from the suffix, as PIL does, write the right one)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}.tmp{path.suffix}")


def write_atomically(path: Path, write: Callable[[Path], object], *, fsync: bool = False) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: a reader (or a crash) sees the old file or
    the whole new one. ``fsync``: the bytes are on disk before the rename (a batch manifest records
    the file as done right after). Whatever fails, the temporary is removed and the error raised."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def stale_temporary(path: Path, alive: Callable[[int], bool]) -> bool:
    """``path`` is a temporary of :func:`write_atomically` whose process is gone (``alive(pid)``
    is False) or is this one (a write that failed without cleaning up)."""
    m = _TEMPORARY.fullmatch(path.name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    return pid == os.getpid() or not alive(pid)
