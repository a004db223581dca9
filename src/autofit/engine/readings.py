"""What the engine reads of the machine it runs on, in one object: the device's budget now, the
host RAM a plan may hold, the memory figures logged with events, and the device type plans are
judged for. One seam, as httpx has its transport: everything else asks this object, so a test
(or an embedder) passes a subclass that reports another machine."""

from __future__ import annotations

import torch

from autofit.facts.hardware import MachineReading, read_machine
from autofit.facts.memory import host_available_bytes, snapshot


class Readings:
    def __init__(self, device: torch.device, *, max_vram: int | None = None, max_ram: int | None = None):
        self._device, self._max_vram, self._max_ram = device, max_vram, max_ram

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_vram(self) -> int | None:
        return self._max_vram

    @property
    def max_ram(self) -> int | None:
        """The host RAM cap (``max_ram=``): what a plan may hold at most."""
        return self._max_ram

    @property
    def judged_type(self) -> str:
        """The device type the rung table, the ladder and the planner judge plans for."""
        return self._device.type

    def hardware(self) -> MachineReading:
        """The machine now: the device budget (honouring ``max_vram``), host RAM (``max_ram``)."""
        return read_machine(self._device, max_vram=self._max_vram, max_ram=self.max_ram)

    def host_room(self, held: int) -> int:
        """Host RAM a plan may hold: available now plus ``held`` (weights already in host RAM,
        which a plan switch releases or reuses), capped by ``max_ram``."""
        room = host_available_bytes() + held
        return room if self.max_ram is None else min(room, self.max_ram)

    def memory(self) -> dict[str, float | None]:
        """The memory fields logged with an event (:func:`autofit.facts.memory.snapshot`)."""
        return snapshot(self._device, self._max_vram)
