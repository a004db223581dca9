import pytest
import torch

from autofit.oom import OOMKind, classify
from autofit.testing import OOM_MESSAGES, oom_error


@pytest.mark.parametrize("kind", sorted(OOM_MESSAGES))
def test_every_known_wording_is_an_oom(kind):
    """Each real OOM message/type is recognised, with the right memory kind."""
    info = classify(oom_error(kind))
    assert info is not None
    assert info.kind is (OOMKind.HOST if kind == "cpu" else OOMKind.DEVICE)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("expected mat1 and mat2 to have the same dtype, but got: c10::Float8_e4m3fn != c10::BFloat16"),
        ValueError("out of memory"),  # wrong type: only RuntimeError/MemoryError carry allocator failures
        RuntimeError("CUDA error: device-side assert triggered"),
        KeyboardInterrupt(),
        TypeError("bad"),
    ],
)
def test_other_errors_are_not_oom(exc):
    """Errors that are not allocation failures are left alone."""
    assert classify(exc) is None


def test_oom_found_through_cause_and_context():
    """An OOM re-raised as another exception is still found via __cause__ / __context__."""
    try:
        try:
            raise oom_error("cuda")
        except torch.OutOfMemoryError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert classify(outer).kind is OOMKind.DEVICE
    try:
        try:
            raise oom_error("cublas")
        except RuntimeError:
            raise KeyError("during handling")
    except KeyError as outer:
        assert classify(outer).kind is OOMKind.DEVICE


def test_python_memoryerror_is_host_oom():
    """Python's own MemoryError means the host ran out."""
    assert classify(MemoryError()).kind is OOMKind.HOST


def test_head_is_short_and_keeps_the_size():
    """The recorded message head is the first sentences, not the whole advice text."""
    head = classify(oom_error("cuda")).head
    assert head.startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in head


def test_cycle_in_context_chain_terminates():
    """A self-referencing context chain does not loop forever."""
    a = RuntimeError("a")
    b = RuntimeError("b")
    a.__context__ = b
    b.__context__ = a
    assert classify(a) is None


def _to_cpu():  # the name of diffusers' group-offloading function that pins host copies
    raise oom_error("cuda_runtime")


def _unrelated_kernel():
    raise oom_error("cuda_runtime")


def test_pinned_memory_failure_is_host_oom():
    """'CUDA error: out of memory' raised while pinning host copies is a host-RAM OOM."""
    try:
        _to_cpu()
    except RuntimeError as exc:
        assert classify(exc).kind is OOMKind.HOST
    try:
        _unrelated_kernel()
    except RuntimeError as exc:
        assert classify(exc).kind is OOMKind.DEVICE
