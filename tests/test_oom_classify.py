import pytest
import torch

from autofit.engine.oom import OOMKind, classify
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


def test_oom_found_through_cause_and_through_a_context_it_quotes():
    """An OOM re-raised with ``from``, or by a wrapper that quotes its message, is still an OOM."""
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
        except RuntimeError as inner:
            raise KeyError(f"during handling: {inner}")
    except KeyError as outer:
        assert classify(outer).kind is OOMKind.DEVICE


def test_error_raised_while_handling_an_oom_is_not_an_oom():
    """A user's error raised in an OOM fallback path (context only, not quoted) is that error."""
    try:
        try:
            raise oom_error("cuda")
        except torch.OutOfMemoryError:
            raise ValueError("fallback needs a smaller prompt")
    except ValueError as outer:
        assert outer.__context__ is not None
        assert classify(outer) is None


def test_keyboard_interrupt_in_an_oom_handler_is_not_an_oom():
    """A KeyboardInterrupt raised inside ``except torch.OutOfMemoryError`` is never an OOM, even chained."""
    for chain in ("context", "cause"):
        try:
            try:
                raise oom_error("cuda")
            except torch.OutOfMemoryError as inner:
                if chain == "cause":
                    raise KeyboardInterrupt() from inner
                raise KeyboardInterrupt()
        except KeyboardInterrupt as outer:
            assert classify(outer) is None


@pytest.mark.parametrize("msg", [
    "Pinned memory requires CUDA.",
    "pin_memory=True requires a CUDA or other accelerator backend; no pinned memory allocator is available on this system.",
])
def test_pinned_memory_text_alone_is_not_a_host_oom(msg):
    """torch's own non-OOM errors that mention pinned memory are not host OOMs."""
    assert classify(RuntimeError(msg)) is None


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


class _FailingCopy:
    """Stands in for a weight whose host copy runs out of memory (``.data.cpu()`` raises)."""

    @property
    def data(self):
        return self

    def cpu(self):
        raise oom_error("cuda_runtime")


def _to_cpu():  # the name of diffusers' pinning function, on a function of ours
    raise oom_error("cuda_runtime")


def test_pinned_memory_failure_is_host_oom():
    """'CUDA error: out of memory' raised inside diffusers' group offloading while it makes its
    pinned host copies is a host-RAM OOM; the same error elsewhere is the device's."""
    from diffusers.hooks.group_offloading import ModuleGroup

    try:
        ModuleGroup._to_cpu(_FailingCopy(), False)  # the real diffusers function, its real frame
    except RuntimeError as exc:
        assert classify(exc).kind is OOMKind.HOST
    else:
        pytest.fail("the copy did not fail")


def test_a_function_named_like_a_pinning_one_is_not_mistaken_for_it():
    """Classification goes by diffusers' code objects, not by frame names."""
    try:
        _to_cpu()
    except RuntimeError as exc:
        assert classify(exc).kind is OOMKind.DEVICE


# ---- what counts as an OOM: the type first, then the spellings real libraries use ----------
@pytest.mark.parametrize("msg", [
    "Validation failed: CUDA out of memory was reported by the worker",
    "my_model: out of memory on device cuda:0 while loading LoRA",
    "cannot continue: DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes",
    "Job 17 failed (CUDA error: out of memory)",
    "retrying after MPS backend out of memory (MPS allocated: 1 GB)",
    "cuda out of memory. tried to allocate 2.00 GiB",  # lower case: not how torch writes it
])
def test_a_message_that_merely_mentions_out_of_memory_is_not_an_oom(msg):
    """A plain RuntimeError whose text contains an OOM phrase somewhere is the user's error."""
    assert classify(RuntimeError(msg)) is None


def test_a_user_error_type_is_never_an_oom_whatever_it_says():
    """Exceptions of other types pass, even quoting the allocator's words at the start."""
    class JobFailed(Exception):
        pass

    assert classify(JobFailed(OOM_MESSAGES["cuda"][1])) is None
    assert classify(ValueError(OOM_MESSAGES["cpu"][1])) is None


def test_the_cpu_allocator_running_out_is_a_host_oom():
    """The real CPU allocator's failure (a plain RuntimeError from c10) is classified as host."""
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 60, dtype=torch.uint8)
    assert type(info.value) is RuntimeError and "DefaultCPUAllocator" in str(info.value)
    assert classify(info.value).kind is OOMKind.HOST


def test_mmap_enomem_is_a_host_oom_and_other_os_errors_are_not():
    """An OSError is an OOM only by its errno (ENOMEM), never by its text."""
    import errno as errno_mod

    assert classify(OSError(errno_mod.ENOMEM, "Cannot allocate memory")).kind is OOMKind.HOST
    assert classify(OSError(errno_mod.ENOSPC, "out of memory on device")) is None


def test_the_kept_error_has_the_type_and_message_but_no_frames():
    """What is kept of the OOM for reporting holds no traceback (no failed attempt's frames)."""
    def raising():
        ballast = torch.zeros(16)  # noqa: F841 - a local the traceback would keep alive
        raise oom_error("cuda")

    try:
        raising()
    except torch.OutOfMemoryError as exc:
        info = classify(exc)
    assert type(info.error) is torch.OutOfMemoryError
    assert str(info.error) == OOM_MESSAGES["cuda"][1]
    assert info.error.__traceback__ is None
