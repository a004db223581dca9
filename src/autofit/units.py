"""Sizes as people write them (``8GiB``, ``512MiB``, ``16GB``, ``1.5gib`` or a number of bytes),
and the one table of byte units that the options, the CLI, simdev and the OOM-message reader use."""

from __future__ import annotations

import re

GIB = 2**30
MIB = 2**20
# Lower-case unit -> bytes: binary (KiB, MiB...) and decimal (KB, MB...); "" and "b" are bytes.
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: int | float | str, *, allow_zero: bool = False) -> int:
    """The bytes ``text`` names; a ValueError that says how to write one otherwise."""
    if isinstance(text, bool):
        raise ValueError("a size, not a bool")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"{text!r} is not a size; write e.g. 8GiB, 512MiB or 16GB")
        value = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def gib(n: int | float, digits: int = 2) -> float:
    """``n`` bytes in GiB, rounded (how reports and JSON documents show sizes)."""
    return round(n / GIB, digits)
