"""``torch.sim``: the device module of autofit's simulated accelerator, what
``torch.get_device_module("sim")`` returns (diffusers' and accelerate's device-generic code reaches
streams, memory figures and seeding through it).

Everything here reads the extension's own ops, not ``torch.accelerator``, so it works whichever
accelerator the process has. Registered by :func:`autofit.testing.simdev.install`; import it only there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

NAME = "sim"


def _ops() -> Any:
    return torch.ops.autofit_simdev


def _check(device: Any = None) -> None:
    if device is None:
        return
    index = device if isinstance(device, int) else torch.device(device).index
    if index not in (None, 0):
        raise ValueError(f"sim has one device, sim:0; got {device!r}")


# -- devices
def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device: Any) -> None:
    _check(device)


def is_initialized() -> bool:
    return True


def init() -> None:
    pass


def _lazy_init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def get_device_name(device: Any = None) -> str:
    _check(device)
    return "autofit simulated accelerator"


@contextlib.contextmanager
def device(device: Any) -> Iterator[None]:  # noqa: F811 - torch.cuda.device's spelling
    _check(device)
    yield


def synchronize(device: Any = None) -> None:
    """Every op has finished when it returns: nothing to wait for."""
    _check(device)


# -- streams and events (ids and timestamps; all work is synchronous)
def _stream_type() -> int:
    return torch.Stream(device=torch.device(NAME, 0)).device_type


# Factories rather than subclasses: torch's C++ side checks for torch.Stream / torch.Event exactly
# (Event.elapsed_time refuses a subclass).
def Stream(device: Any = None, priority: int = 0, **kwargs: Any) -> torch.Stream:  # noqa: N802 - torch.cuda.Stream's spelling
    _check(device)
    return torch.Stream(device=torch.device(NAME, 0), priority=priority)


def Event(enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> torch.Event:  # noqa: N802
    return torch.Event(device=torch.device(NAME, 0), enable_timing=enable_timing, blocking=blocking,
                       interprocess=interprocess)


def current_stream(device: Any = None) -> torch.Stream:
    _check(device)
    return torch.Stream(stream_id=int(_ops().current_stream()), device_index=0, device_type=_stream_type())


def default_stream(device: Any = None) -> torch.Stream:
    _check(device)
    return torch.Stream(stream_id=0, device_index=0, device_type=_stream_type())


def set_stream(stream: torch.Stream) -> None:
    _ops().set_stream(int(stream.stream_id))


@contextlib.contextmanager
def stream(stream: torch.Stream | None) -> Iterator[None]:  # noqa: F811 - torch.cuda.stream's spelling
    if stream is None:
        yield
        return
    before = int(_ops().current_stream())
    set_stream(stream)
    try:
        yield
    finally:
        _ops().set_stream(before)


# -- memory
def empty_cache() -> None:
    """Nothing is cached: freed device memory is returned at once."""


def memory_allocated(device: Any = None) -> int:
    _check(device)
    return int(_ops().device_summary()[0])


def max_memory_allocated(device: Any = None) -> int:
    _check(device)
    return int(_ops().device_summary()[1])


# No caching allocator: everything reserved is allocated.
memory_reserved = memory_allocated
max_memory_reserved = max_memory_allocated


def reset_peak_memory_stats(device: Any = None) -> None:
    _check(device)
    _ops().reset_peak()


reset_max_memory_allocated = reset_peak_memory_stats


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) bytes: the cap less what is allocated, and the cap."""
    _check(device)
    allocated, _, cap = (int(v) for v in _ops().device_summary())
    return max(cap - allocated, 0), cap


def memory_stats(device: Any = None) -> dict[str, int]:
    _check(device)
    allocated, peak, _ = (int(v) for v in _ops().device_summary())
    counters = dict(zip(_ops().counter_names(), (int(v) for v in _ops().counters())))
    return {"allocated_bytes.all.current": allocated, "allocated_bytes.all.peak": peak,
            "reserved_bytes.all.current": allocated, "reserved_bytes.all.peak": peak,
            "num_ooms": counters["device_ooms"]}


# -- random numbers: the device's kernels are the CPU's, and so is its generator
def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: it calls back here


manual_seed_all = manual_seed


def seed() -> None:
    torch.default_generator.seed()


seed_all = seed


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


def get_rng_state(device: Any = None) -> torch.Tensor:
    _check(device)
    return torch.get_rng_state()


def set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
    _check(device)
    torch.set_rng_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [torch.get_rng_state()]


def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
    torch.set_rng_state(new_states[0])
