"""What the rung table, the ladder and the planner judge plans against now (a planning
:class:`~autofit.planning.context.Context`): the machine as :class:`~autofit.engine.readings.Readings`
reads it, the pipeline's facts as :class:`~autofit.engine.placement.Placement` holds them, a
workload and the policy. It reads; it changes nothing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from autofit import disk
from autofit.facts.memory import held_on_host, pinned_room
from autofit.engine.placement import Placement
from autofit.engine.readings import Readings
from autofit.planning.context import Context, Machine, PipelineFacts, Workload
from autofit.strategies import quantize
from autofit.strategies.vae import can_slice, can_tile


class Survey:
    def __init__(self, pipe: Any, placement: Placement, readings: Readings, policy: str):
        self._pipe, self._placement, self._readings, self._policy = pipe, placement, readings, policy

    def host_room(self) -> tuple[int, int]:
        """(host RAM, pinned host RAM) a plan may hold. The pipeline's weights already in host RAM
        count as room: a plan switch releases or reuses them (a pipeline loaded on the CPU that
        then goes to model offload needs no RAM beyond what it has). Capped by ``max_ram``."""
        placement = self._placement
        held, held_pinned = held_on_host(placement.components.values(), placement.shadows.tensors())
        room = self._readings.host_room(held)
        return room, pinned_room(room, held_pinned)

    def context(self, workload: Workload, *, machine: Machine | None = None,
                broken: dict[str, set[str]] | None = None) -> Context:
        """``machine``: what preflight probed (None: no budget known); ``broken`` adds broken
        rungs not yet in the placement's (the plan cache's)."""
        placement, readings = self._placement, self._readings
        vaes = list(placement.vaes.values())
        room, pinned = self.host_room()
        if machine is None:
            machine = Machine(0, room, readings.device.type, quant_missing=quantize.missing(readings.device.type))
        machine = replace(machine, host_available_bytes=room, pinned_available_bytes=pinned,
                          disk_available_bytes=disk.free_bytes(), disk_unusable=disk.unusable(),
                          device_type=readings.judged_type)
        pairs = {(r, n) for r, names in (*placement.broken.items(), *(broken or {}).items()) for n in names}
        pipeline = PipelineFacts(
            footprint=placement.footprint,
            has_offload_seq=getattr(self._pipe, "model_cpu_offload_seq", None) is not None,
            vae_can_tile=bool(vaes) and all(can_tile(v) for v in vaes),
            vae_can_slice=bool(vaes) and all(can_slice(v) for v in vaes),
            fp8_supported=hasattr(torch, "float8_e4m3fn"),
            broken=frozenset(pairs),
            storage_locked=placement.ledger.locked(),
            has_bnb=any(quantize.quantized_level(m) for m in placement.components.values()),
        )
        return Context(machine, pipeline, workload, self._policy)
