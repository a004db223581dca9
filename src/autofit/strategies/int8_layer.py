"""autofit's LLM.int8 layer: bitsandbytes' ``Linear8bitLt`` whose quantization state moves with its
weight, whoever moves it. A module of its own (importing bitsandbytes) so that the class has an
importable name: quantized modules pickle and ``torch.save`` as bitsandbytes' own do."""

from __future__ import annotations

import bitsandbytes as bnb

from autofit import _diffusers


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes keeps an LLM.int8 layer's weight and scales twice, on the parameter
    (``CB``/``SCB``) and, after the first forward, in ``self.state``; only ``Linear8bitLt.to()``
    moves them. A parent's ``.to()`` (model offload, ``pipe.to``) reaches layers through
    ``_apply``, which moves the parameter's data alone: the old references kept the int8 weights
    on the GPU after the module went to the CPU (bitsandbytes issue #1332, open; the 6.5 GiB
    int8 + model offload peaks on the H100, run 4). Same forward, same state dict, and the same
    class name: accelerate's offload hooks recognise 8-bit layers by it."""

    def _apply(self, fn, recurse=True):  # torch calls _apply for every move (.to, .cpu, .cuda)
        super()._apply(fn, recurse)
        self.follow_weight()
        return self

    def follow_weight(self) -> None:
        """Point the quantization state at the weight's current storage and device."""
        _diffusers.int8_state_follow_weight(self)
