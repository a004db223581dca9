"""Tests that kill the mutants mutmut found alive in oom.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). Every one asserts something a user or a caller can observe, against a
reference the test does not make up: the module's documented rule, the real library's behaviour,
or a second path to the same answer. The survivors that no test can kill (equivalent mutants) are
listed with their reasons in docs/testing.md.

Fast by design (real exceptions, real files, no pipeline): the whole file runs in a few seconds.
"""

import re

import pytest
import torch

from autofit.engine import oom
from autofit.engine.oom import OOMKind, classify
from autofit.testing import OOM_MESSAGES, oom_error


# ---- oom.py ------------------------------------------------------------------------------------
def test_spelled_patterns_match_at_the_start_after_an_optional_enforce_prefix():
    """``_spelled(*patterns)`` matches a message that starts with any one of the patterns, bare or
    after c10's ``[enforce fail at ...] <condition>. `` prefix, and nothing that merely contains one.
    DEVICE_SPELLINGS and HOST_SPELLINGS are built by it when the module is imported, where mutmut
    cannot reach; this calls it as they do, with real allocator wordings.
    mutants: oom.x__spelled__mutmut_1..8"""
    cuda = r"CUDA error: out of memory(?:\n|$)"
    cpu = r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate \d+ bytes"
    pattern = oom._spelled(cuda, cpu)
    assert isinstance(pattern, re.Pattern)
    cuda_text = OOM_MESSAGES["cuda_runtime"][1]
    with pytest.raises(RuntimeError) as host:  # the real CPU allocator's message, with its enforce prefix
        torch.empty(1 << 60, dtype=torch.uint8)
    assert str(host.value).startswith("[enforce fail at ")
    for text in (cuda_text, str(host.value), "DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"):
        assert pattern.match(text), text
    for text in ("Job failed: " + cuda_text, "CUDA error: out of memory on the other node"):
        assert not pattern.match(text), text
    # The built module patterns agree with a fresh build from the same wordings.
    assert oom.HOST_SPELLINGS.match(str(host.value)) and oom.DEVICE_SPELLINGS.match(cuda_text)


def test_the_head_is_the_first_two_sentences_of_the_first_line_at_most_200_characters():
    """What the history and the events show of an OOM (``EscalationRecord.error``) is short: the
    first line's first two sentences, cut at 200 characters.
    mutants: oom.x__head__mutmut_14"""
    long_line = "CUDA out of memory. Tried to allocate " + "9" * 400 + " GiB. GPU 0 has 8 GiB."
    info = classify(torch.OutOfMemoryError(long_line + "\nsecond line"))
    assert info.head == long_line[:200]
    assert len(info.head) == 200


def test_the_kept_message_is_the_first_2000_characters():
    """``OOMInfo.message`` keeps the message "up to 2,000 characters" (its documented limit).
    mutants: oom.x__info__mutmut_11"""
    text = OOM_MESSAGES["cuda"][1] + " " + "x" * 3000
    info = classify(torch.OutOfMemoryError(text))
    assert info.message == text[:2000]


def _oom_from(depth: int):
    """Raises the real CUDA runtime OOM ``depth`` Python frames below the caller."""
    if depth <= 1:
        raise oom_error("cuda_runtime")
    _oom_from(depth - 1)


class _CopyFailingBelow:
    """A weight whose host copy (``.data.cpu()``) fails ``depth`` frames below diffusers' call."""

    def __init__(self, depth: int):
        self.depth = depth

    @property
    def data(self):
        return self

    def cpu(self):
        if self.depth <= 1:
            raise oom_error("cuda_runtime")
        _oom_from(self.depth - 1)


@pytest.mark.parametrize("depth, kind", [(1, OOMKind.HOST), (2, OOMKind.HOST), (3, OOMKind.DEVICE)])
def test_only_an_oom_raised_by_the_pinning_call_itself_is_the_hosts(depth, kind):
    """An OOM raised within diffusers' pinning function's last frames (the copy it makes, up to
    two frames below it) is a host OOM; one raised deeper, by whatever that copy called, is the
    device's error as its wording says.
    mutants: oom.x__raised_while_pinning__mutmut_10"""
    from diffusers.hooks.group_offloading import ModuleGroup

    with pytest.raises(RuntimeError) as info:
        ModuleGroup._to_cpu(_CopyFailingBelow(depth), False)  # the real diffusers function, its real frame
    assert classify(info.value).kind is kind


@pytest.mark.parametrize("quoted, found", [("cannot alloc", True), ("cannot allo", False)])
def test_a_wrapper_quoting_a_first_line_of_12_characters_or_more_wraps_that_oom(quoted, found):
    """A context counts as the cause when the raised error quotes the context's first line, and
    that line is at least 12 characters (a shorter one could appear by chance).
    mutants: oom.x__quotes__mutmut_6, oom.x__quotes__mutmut_7"""
    assert len(quoted) in (11, 12)
    try:
        try:
            raise MemoryError(quoted)
        except MemoryError:
            raise RuntimeError(f"loading failed: {quoted}")  # noqa: B904 - a context, quoted
    except RuntimeError as outer:
        info = classify(outer)
    assert (info is not None and info.kind is OOMKind.HOST) is found


def _chain(length: int) -> BaseException:
    """``length`` ValueErrors, each raised ``from`` the next, the last one from a real CUDA OOM."""
    exc: BaseException = oom_error("cuda")
    for k in range(length):
        outer = ValueError(f"step {k}")
        outer.__cause__ = exc
        exc = outer
    return exc


def test_the_cause_chain_is_followed_16_exceptions_deep_and_no_further():
    """The walk down ``__cause__`` is bounded (16 exceptions) so that a pathological chain costs
    nothing: the OOM as the 16th exception is found, as the 17th it is not.
    mutants: oom.x_classify__mutmut_9, oom.x_classify__mutmut_10"""
    assert classify(_chain(15)).kind is OOMKind.DEVICE
    assert classify(_chain(16)) is None


def test_freeing_memory_on_an_accelerator_empties_its_caches(monkeypatch):
    """After an OOM on an accelerator, ``free_memory`` returns its cached blocks and the pinned
    host blocks (torch.accelerator's calls, reached through autofit's device layer), on the
    simulated accelerator as on a GPU.
    mutants: oom.x_free_memory__mutmut_3"""
    from autofit.testing import simdev

    device = simdev.require()
    calls = []
    for name in ("synchronize", "empty_cache", "empty_host_cache"):
        real = getattr(torch.accelerator, name)
        monkeypatch.setattr(torch.accelerator, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    oom.free_memory(device)
    assert calls == ["synchronize", "empty_cache", "empty_host_cache"]
