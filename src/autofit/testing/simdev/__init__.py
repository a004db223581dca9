"""A simulated accelerator with capped memory: test out-of-memory behaviour without a GPU.

``install(cap="4GiB")`` gives torch a device ``sim`` (``torch.device("sim")``, module ``torch.sim``)
whose memory really runs out: compute runs on the CPU, but every byte placed on the device counts
against the cap, and the allocation that does not fit raises ``torch.OutOfMemoryError`` with the
CUDA caching allocator's wording, at the point where a GPU would raise it. Pinned host memory has
a cap of its own. Bytes moved between host and device are counted. See docs/simdev.md.

The device is a C++ extension (``simdev.cpp``, torch's PrivateUse1 backend) built on first use
with torch.utils.cpp_extension (a C++ compiler and ninja) into a cached folder:
``$AUTOFIT_SIMDEV_BUILD_DIR`` or ``~/.cache/autofit``, one subfolder per torch version and source.

Registering the backend is process-wide and cannot be undone; installing again only sets caps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autofit.units import parse_bytes

__all__ = [
    "NAME", "SimDevUnavailable", "available", "build_dir", "counters", "get_cap", "get_pinned_cap", "install",
    "is_installed", "max_memory_allocated", "memory_allocated", "require", "reset_counters",
    "reset_peak_memory_stats", "set_cap", "set_pinned_cap",
]

NAME = "sim"
MIN_TORCH = (2, 13)  # the version it is built and tested against; older ones lack APIs it uses
_EXTENSION = "autofit_simdev_ext"
_SOURCE = Path(__file__).with_name("simdev.cpp")
# -O1: the extension is glue (allocator, copies, dispatch); the kernels are torch's own, so more
# optimisation buys nothing but build time.
_CFLAGS = ("-O1",)
_READY = "READY"

_lock = threading.RLock()
_installed = False


class SimDevUnavailable(RuntimeError):
    """The sim device cannot be built or registered here; the message says what to install."""


# ------------------------------------------------------------------------------ sizes
def _parse_size(value: int | str) -> int:
    """``4GiB``, ``512MiB``, ``16GB``, ``1.5gib`` or a number of bytes (as autofit's max_vram); 0 is a cap too."""
    return parse_bytes(value, allow_zero=True)


def _host_ram() -> int:
    """Physical memory: the device's size when no cap is set (its bytes are host memory)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 40


_NO_PINNED_CAP = (1 << 63) - 1  # the extension's "unlimited"


# ------------------------------------------------------------------------------ building
def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def build_dir() -> Path:
    """Where the extension is built: a subfolder of ``$AUTOFIT_SIMDEV_BUILD_DIR`` (default
    ``$XDG_CACHE_HOME/autofit`` or ``~/.cache/autofit``) named by the torch version, the Python
    version and a hash of the source and flags, so a change to any of them builds afresh."""
    base = os.environ.get("AUTOFIT_SIMDEV_BUILD_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "autofit")
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(repr((_CFLAGS, sys.platform)).encode())
    tag = f"simdev-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"
    return Path(base) / tag


def _library(folder: Path) -> Path:
    return folder / f"{_EXTENSION}.so"


def _built(folder: Path) -> bool:
    return (folder / _READY).is_file() and _library(folder).is_file()


def _ninja_dir() -> str | None:
    """The folder holding ninja: on PATH, else the ``ninja`` package's (``pip install ninja``
    into a virtualenv that is not activated puts it off PATH), else None."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    folders = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for folder in folders:
        if folder and shutil.which("ninja", path=folder):
            return folder
    return None


@contextlib.contextmanager
def _ninja_on_path(folder: str) -> Iterator[None]:
    """cpp_extension runs ``ninja`` from PATH: put its folder there for the build only."""
    before = os.environ.get("PATH", "")
    if folder in before.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = folder + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _toolchain() -> tuple[bool, str]:
    """(True, "") where a C++ compiler and ninja are found, else (False, what is missing)."""
    missing = []
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not found: install g++ or clang, or set CXX)")
    if _ninja_dir() is None:
        missing.append("ninja (pip install ninja)")
    return (not missing, "; ".join(missing))


def _backend_taken() -> str | None:
    """The name another PrivateUse1 backend already took in this process, if one did."""
    name = torch._C._get_privateuse1_backend_name()
    return None if name in ("privateuseone", NAME) else name


def available() -> tuple[bool, str]:
    """(True, how) where the sim device is installed, built, or can be built here; else
    (False, why not)."""
    if _installed:
        return True, "installed"
    if sys.platform == "win32":
        return False, "autofit.testing.simdev is not supported on Windows"
    if _torch_version() < MIN_TORCH:
        return False, f"autofit.testing.simdev needs torch >= {'.'.join(map(str, MIN_TORCH))}; this is {torch.__version__}"
    taken = _backend_taken()
    if taken:
        return False, f"torch's PrivateUse1 backend is already {taken!r} in this process"
    folder = build_dir()
    if _built(folder):
        return True, f"built in {folder}"
    ok, missing = _toolchain()
    return (True, "a C++ compiler and ninja are present") if ok else (False, f"cannot build: needs {missing}")


def _load(verbose: bool) -> None:
    folder = build_dir()
    if _built(folder):
        torch.ops.load_library(str(_library(folder)))
        return
    ok, missing = _toolchain()
    if not ok:
        raise SimDevUnavailable(
            f"autofit.testing.simdev builds a small C++ extension on first use and needs {missing}. On Debian/Ubuntu: "
            "`apt-get install g++` and `pip install ninja`; on macOS: `xcode-select --install` and "
            "`pip install ninja`. The build is cached in " + str(folder.parent) + " ($AUTOFIT_SIMDEV_BUILD_DIR).")
    from torch.utils import cpp_extension

    ninja = _ninja_dir()
    assert ninja is not None  # _toolchain found it
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimDevUnavailable(f"autofit.testing.simdev cannot create its build folder ({exc}); point "
                                "$AUTOFIT_SIMDEV_BUILD_DIR at a writable folder") from exc
    print(f"autofit.testing.simdev: building the sim device into {folder} (once; 10-30 s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        # Builds under a lock in the folder (concurrent processes wait for one build) and loads
        # the library into this process.
        with _ninja_on_path(ninja):
            cpp_extension.load(name=_EXTENSION, sources=[str(_SOURCE)], extra_cflags=list(_CFLAGS),
                               build_directory=str(folder), is_python_module=False, verbose=verbose)
    except Exception as exc:
        raise SimDevUnavailable(f"autofit.testing.simdev: building the extension in {folder} failed: {exc}") from exc
    (folder / _READY).write_text(f"torch {torch.__version__}, built in {time.monotonic() - started:.1f} s\n")
    print(f"autofit.testing.simdev: built in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def _register() -> None:
    from autofit.testing.simdev import _module

    taken = _backend_taken()
    if taken:
        raise SimDevUnavailable(f"torch's PrivateUse1 backend is already {taken!r} in this process: "
                                "autofit.testing.simdev cannot register 'sim' beside it")
    if torch._C._get_privateuse1_backend_name() != NAME:
        torch.utils.rename_privateuse1_backend(NAME)
    torch.ops.autofit_simdev.init()
    if not hasattr(torch, NAME):
        torch._register_device_module(NAME, _module)
    if not hasattr(torch.Tensor, NAME):
        torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)


# ------------------------------------------------------------------------------ public API
def install(cap: int | str | None = None, pinned_cap: int | str | None = None, *,
            verbose: bool = False) -> torch.device:
    """Build (first time, cached) and register the ``sim`` device, set its caps, and return
    ``torch.device("sim", 0)``.

    ``cap``: device memory in bytes or as ``"4GiB"``; None: as much as the host's RAM.
    ``pinned_cap``: pinned (page-locked) host memory; None: no cap. Installing again in the same
    process only sets the caps. Raises :class:`SimDevUnavailable` (what to install) where the
    extension cannot be built."""
    global _installed
    with _lock:
        if not _installed:
            if _torch_version() < MIN_TORCH:
                raise SimDevUnavailable(available()[1])
            _load(verbose)
            _register()
            _installed = True
        set_cap(cap)
        set_pinned_cap(pinned_cap)
    return torch.device(NAME, 0)


def require(cap: int | str | None = None, pinned_cap: int | str | None = None) -> torch.device:
    """:func:`install` for tests: ``pytest.skip`` with the reason where the device cannot be
    built here (no compiler, no ninja, an old torch). A build that fails is an error, not a skip."""
    ok, reason = available()
    if not ok:
        import pytest

        pytest.skip(f"autofit.testing.simdev: {reason}")
    return install(cap, pinned_cap)


def is_installed() -> bool:
    return _installed


def _ops() -> Any:
    if not _installed:
        raise RuntimeError("autofit.testing.simdev is not installed: call autofit.testing.simdev.install() first")
    return torch.ops.autofit_simdev


def set_cap(cap: int | str | None) -> None:
    """Device memory cap in bytes (or ``"4GiB"``); None: the host's RAM. Lowering it below what
    is allocated makes the next allocation fail; nothing is freed."""
    _ops().set_cap(_host_ram() if cap is None else _parse_size(cap))


def get_cap() -> int:
    return int(_ops().device_summary()[2])


def set_pinned_cap(cap: int | str | None) -> None:
    """Pinned host memory cap in bytes (or ``"1GiB"``); None: no cap. Applies where ``sim`` is
    the process's accelerator (a CPU-only torch build): elsewhere pinning is the real
    accelerator's."""
    _ops().set_pinned_cap(_NO_PINNED_CAP if cap is None else _parse_size(cap))


def get_pinned_cap() -> int | None:
    cap = int(_ops().pinned_summary()[2])
    return None if cap == _NO_PINNED_CAP else cap


def counters() -> dict[str, int]:
    """Since the last :func:`reset_counters`: ``h2d_bytes`` (host to device, of which
    ``h2d_pinned_bytes`` from pinned memory and ``h2d_pageable_bytes`` from pageable),
    ``d2h_bytes``, ``d2d_bytes``, ``device_ooms`` and ``pinned_ooms`` (OOMs raised); and now:
    ``pinned_bytes`` held, ``pinned_peak_bytes`` (since :func:`reset_peak_memory_stats`)."""
    ops = _ops()
    out = dict(zip(ops.counter_names(), (int(v) for v in ops.counters())))
    out["h2d_bytes"] = out["h2d_pinned_bytes"] + out["h2d_pageable_bytes"]
    pinned, pinned_peak, _ = (int(v) for v in ops.pinned_summary())
    out["pinned_bytes"], out["pinned_peak_bytes"] = pinned, pinned_peak
    return out


def reset_counters() -> None:
    _ops().reset_counters()


def memory_allocated() -> int:
    """Bytes allocated on the device now (``torch.sim.memory_allocated()``)."""
    return int(_ops().device_summary()[0])


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device since :func:`reset_peak_memory_stats`."""
    return int(_ops().device_summary()[1])


def reset_peak_memory_stats() -> None:
    """Restart the device's and the pinned memory's peaks from what is held now."""
    _ops().reset_peak()
