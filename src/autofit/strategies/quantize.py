"""bitsandbytes weight quantization (nf4, LLM.int8) of already-loaded components, in place.

Every ``nn.Linear`` of a target component (the denoiser, large text encoders) that fp8 casting
would also treat (norms, embeddings and in/out projections are left alone) is swapped for a
bitsandbytes layer built around the same weight tensor; bitsandbytes quantizes it when the layer
is moved to its device, one layer at a time, so the full-precision component never has to fit on
the device. The original ``nn.Linear`` modules are kept to make this one-way rung undoable, bit
for bit. Their weights stay on the CPU (where they are after tear-down) unless the component was
loaded from a folder and the weight equals its file: then it is released and read back from the
file on undo (``checkpoint.py``).

Works on CUDA and, since bitsandbytes 0.48, on the CPU (its pure-torch backend), which is what the
tests use. A pipeline loaded quantized by the user is left as it is.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from autofit.facts.checkpoint import Checkpoint
from autofit.facts.footprint import Footprint, quant_targets
from autofit._diffusers import module_components
from autofit.strategies.casting import compute_dtype

LEVELS = ("nf4", "int8")
MIN_BNB = (0, 48)  # CPU backend, and int8 weights that can move between devices


def missing(device_type: str) -> str | None:
    """Why bitsandbytes quantization cannot run here, or None."""
    if device_type not in ("cuda", "cpu", "xpu"):
        return f"bitsandbytes has no backend for device type {device_type!r}"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising anything
        return f"bitsandbytes is not usable ({type(exc).__name__}); pip install 'autofit[quant]'"
    try:
        version = tuple(int(x) for x in bnb.__version__.split(".")[:2])
    except ValueError:
        return None
    if version < MIN_BNB:
        return f"bitsandbytes {bnb.__version__} is too old; need >= {'.'.join(map(str, MIN_BNB))}"
    return None


def quantized_level(module: torch.nn.Module) -> str | None:
    """'nf4' / 'int8' when ``module`` holds bitsandbytes weights (autofit's or the user's)."""
    for p in module.parameters():
        kind = type(p).__name__
        if kind == "Params4bit":
            return "nf4"
        if kind == "Int8Params":
            return "int8"
    return None


def _int8_linear() -> type:
    from autofit.strategies.int8_layer import Linear8bitLt  # imports bitsandbytes

    return Linear8bitLt


def holds_int8(module: torch.nn.Module) -> bool:
    """``module`` holds LLM.int8 weights (the user's loader's, to adopt with :func:`adopt_int8`)."""
    return quantized_level(module) == "int8"


def adopt_int8(module: torch.nn.Module) -> int:
    """Give the LLM.int8 layers of a pipeline quantized by the user's own loader (bitsandbytes'
    class) the same fix: their class becomes the subclass above (same forward, same state dict),
    and a state already left behind by an earlier move is pointed at the weight. Returns how many."""
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed or broken: there are no such layers to fix
        return 0
    following = _int8_linear()
    count = 0
    for sub in module.modules():
        if type(sub) is bnb.nn.Linear8bitLt:
            sub.__class__ = following
            sub.follow_weight()
            count += 1
    return count


def _bnb_layer(linear: torch.nn.Linear, level: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if level == "nf4":
        # Built on the meta device: its own (discarded) weight would cost a full-size allocation.
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=False, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=False,
                                         quant_type="nf4")
    else:
        # threshold 6.0: LLM.int8's outlier split, the default of transformers' BitsAndBytesConfig.
        layer = _int8_linear()(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                               threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


@dataclass(slots=True)
class _Swap:
    parent: torch.nn.Module
    attr: str
    original: torch.nn.Linear
    key: str | None = None  # set once the original weight was released: it comes back from the file
    stride: tuple[int, ...] | None = None  # its layout (the emptied weight keeps only its dtype)


class Restore:
    """The undo of one quantized component: the original Linear layers go back in, their weights
    from the CPU copy kept for them or, where the checkpoint on disk matched, from that file."""

    def __init__(self, source: Checkpoint | None):
        self.source = source
        self.done: list[_Swap] = []

    @property
    def held_bytes(self) -> int:
        """Host bytes held to undo (the original weights not backed by the checkpoint)."""
        return sum(s.original.weight.numel() * s.original.weight.element_size() for s in self.done if s.key is None)

    def __call__(self) -> None:
        from_disk = [s.key for s in self.done if s.key is not None]
        if from_disk:
            assert self.source is not None
            self.source.check_unchanged(from_disk)  # refuse before touching anything
        while self.done:  # pop as we go: an I/O error leaves a working mix, and a retry resumes
            swap = self.done[-1]
            if swap.key is not None:
                w = swap.original.weight
                w.data = self.source.load(swap.key, w.dtype, swap.stride)  # type: ignore[union-attr]
            current = getattr(swap.parent, swap.attr, None)
            if current is not None and isinstance(getattr(current, "base_layer", None), torch.nn.Module):
                # A LoRA loaded since (peft) wraps the quantized layer: the original goes back
                # under the wrapper, which keeps the LoRA; replacing the wrapper would drop it.
                current.base_layer = swap.original
            else:
                setattr(swap.parent, swap.attr, swap.original)
            self.done.pop()


def _same(source: Checkpoint, key: str, weight: torch.Tensor, cancel: threading.Event) -> bool:
    if cancel.is_set():  # the quantization failed or was interrupted: stop reading the files
        return False
    try:
        return source.same(key, weight)
    except Exception:  # whatever goes wrong here only means: keep the copy in RAM
        return False


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # a wrapper tensor subclass without a storage of its own
        return None


def _shared_storages(module: torch.nn.Module) -> set[int]:
    """Storages held by more than one parameter or buffer (tied weights): never released."""
    seen: set[int] = set()
    shared: set[int] = set()
    tensors = [p for _, p in module.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in module.named_buffers(remove_duplicate=False)]
    for t in tensors:
        ptr = _storage_ptr(t)
        if ptr is not None:
            (shared if ptr in seen else seen).add(ptr)
    return shared


def quantize_module(
    module: torch.nn.Module, level: str, device: torch.device, source: Checkpoint | None = None
) -> Restore:
    """Quantize ``module``'s Linear layers in place, each on ``device``; returns the undo.

    With ``source`` (the checkpoint the module was loaded from), each original weight that equals
    its file, and is not tied to another tensor, is released once every layer is quantized instead
    of being kept in host RAM. Transactional: if a layer fails (an OOM included) or the call is
    interrupted, the layers already swapped are put back and the error goes on up."""
    if level not in LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {LEVELS}")
    dtype = compute_dtype(module)
    restore = Restore(source)
    targets = quant_targets(module)
    tied = _shared_storages(module) if source is not None else set()
    pending: list[tuple[_Swap, str, Future[bool]]] = []
    # The comparison with the checkpoint (CPU and disk bound) runs in a thread beside the
    # quantization (device bound): together they take little more than the quantization alone.
    pool = ThreadPoolExecutor(1, thread_name_prefix="autofit-verify") if source is not None else None
    cancel = threading.Event()
    try:
        for name, linear in targets:
            owner, _, attr = name.rpartition(".")
            parent = module.get_submodule(owner) if owner else module
            layer = _bnb_layer(linear, level, dtype)
            setattr(parent, attr, layer)
            swap = _Swap(parent, attr, linear)
            restore.done.append(swap)
            ptr = _storage_ptr(linear.weight)
            if pool is not None and ptr is not None and ptr not in tied:
                key = f"{name}.weight"
                pending.append((swap, key, pool.submit(_same, source, key, linear.weight, cancel)))
            layer.to(device)  # bitsandbytes quantizes here
        if pool is not None:
            pool.shutdown(wait=True)
        released = [(swap, key) for swap, key, same in pending if same.result()]
    except BaseException:
        # Stop the comparisons and wait for the one in flight (one layer) before the layers it
        # reads are handed back.
        cancel.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        restore()
        raise
    for swap, key in released:
        w = swap.original.weight
        swap.key, swap.stride = key, w.stride()
        w.data = w.new_empty(0)  # same Parameter (and dtype), storage freed
    return restore


def apply_quantization(
    pipe: Any, footprint: Footprint, level: str, device: torch.device, *, skip: frozenset[str] = frozenset()
) -> dict[str, Restore]:
    """Quantize every target component (``quant_ok`` in the footprint) not in ``skip`` and not
    quantized already. Returns component -> undo. All or nothing: on failure the components done
    so far are restored before the error goes on up."""
    undos: dict[str, Restore] = {}
    try:
        for name, module in module_components(pipe).items():
            c = footprint.components.get(name)
            if c is None or not c.quant_ok or name in skip or quantized_level(module):
                continue
            undos[name] = quantize_module(module, level, device, Checkpoint.of(module))
    except BaseException:
        for undo in undos.values():
            undo()
        raise
    return undos
