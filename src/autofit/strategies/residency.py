"""Moving whole components on and off the device every call, cheaply.

``offload_encoders`` and ``offload_for_decode`` move the same weights back and forth on every
call. ``module.to("cpu")`` allocates fresh pageable host memory each time (page faults, then
~9 GB/s copies measured on an H200) and ``.to("cuda")`` copies from it at pageable speed. Here
each component gets one reusable host buffer per tensor, pinned when the device is CUDA (55 GB/s
measured), and moves copy into / out of those buffers. The copy back to the host is made on
every offload, so weights the user changed on the device (a fused LoRA) are never lost.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from autofit import _diffusers
from autofit.facts.devices import memory_of
from autofit.events import emit
from autofit.strategies.quantize import quantized_level


def _slots(module: torch.nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    seen: set[int] = set()
    for sub in module.modules():
        for table in _diffusers.tensor_tables(sub):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                yield table, name, t


class HostShadows:
    """Reusable (pinned when possible) host copies of the components autofit moves each call."""

    def __init__(self, device: torch.device):
        self.device = device
        self._memory = memory_of(device)
        self._pin = self._memory.can_pin
        self._buffers: dict[int, dict[tuple[int, str], torch.Tensor]] = {}

    def _host_like(self, t: torch.Tensor) -> torch.Tensor:
        if self._pin:
            try:
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError as exc:  # pinned memory exhausted: pageable still works
                emit("pin_failed", level="warning", stage="load", action="pageable", error=str(exc)[:120])
                self._pin = False
        return torch.empty(t.shape, dtype=t.dtype)

    def offload(self, module: torch.nn.Module) -> None:
        # bitsandbytes keeps its scales beside the weight tensor, outside the parameter tables:
        # only its own .to() moves both.
        if quantized_level(module):
            module.to("cpu")
            return
        store = self._buffers.setdefault(id(module), {})
        moved = []
        for table, name, t in _slots(module):
            if t.device.type == "cpu":
                continue
            key = (id(table), name)
            host = store.get(key)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = store[key] = self._host_like(t)
            host.copy_(t.detach(), non_blocking=self._pin)
            moved.append((table, name, t, host))
        if moved and self._pin:
            self._memory.synchronize()
        for table, name, t, host in moved:
            if isinstance(t, torch.nn.Parameter):
                t.data = host
            else:
                table[name] = host

    def onload(self, module: torch.nn.Module) -> None:
        if quantized_level(module):
            module.to(self.device)
            return
        for table, name, t in _slots(module):
            if t.device == self.device:
                continue
            moved = t.detach().to(self.device, non_blocking=t.is_pinned())
            if isinstance(t, torch.nn.Parameter):
                t.data = moved
            else:
                table[name] = moved

    def tensors(self) -> list[torch.Tensor]:
        """The host buffers (a plan switch drops them)."""
        return [t for store in self._buffers.values() for t in store.values()]

    def drop(self) -> None:
        self._buffers.clear()
