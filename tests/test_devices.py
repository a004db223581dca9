"""The device layer (autofit.facts.devices): one reader of device memory for CUDA, any other
torch.accelerator device and the CPU; the log never names the host's RSS device memory."""

import psutil
import torch

from autofit.facts.devices import memory_of
from autofit.facts.memory import snapshot


def test_the_cpu_is_read_as_the_host():
    """On the CPU nothing counts a process's device bytes: no peaks, no pinning, RSS by name."""
    mem = memory_of("cpu")
    assert mem.kind == "host" and not mem.measures_peaks and not mem.can_pin
    assert mem.allocated() is None and mem.peak() is None
    what, value = mem.process_bytes()
    rss = psutil.Process().memory_info().rss
    assert what == "rss" and abs(value - rss) < 256 << 20
    free, total = mem.free_and_total()
    assert total == psutil.virtual_memory().total and 0 < free <= total


def test_a_cuda_device_without_cuda_is_the_host():
    """A cuda device asked for on a machine without CUDA reads nothing from torch.cuda."""
    if torch.cuda.is_available():
        assert memory_of("cuda").kind == "cuda"
    else:
        assert memory_of("cuda").kind == "host"


def test_the_cpu_log_says_rss_not_allocated():
    """The CPU's memory fields name the resident set as such (it is not device memory)."""
    fields = snapshot(torch.device("cpu"))
    assert "allocated_gib" not in fields and "reserved_gib" not in fields
    assert fields["rss_gib"] > 0 and fields["budget_gib"] > 0
