"""What a rung's rules and costs are judged against: the machine, the pipeline and the call.

Pure data: no torch, no I/O. The runtime builds a :class:`Context` from live measurements; the
CLI and tests build one by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from autofit.facts.footprint import Footprint

# Measured on an H200 (shared/reference/gpu-facts.md): 1 GiB host-to-device copies.
DEFAULT_PINNED_GBPS = 55.5
DEFAULT_PAGEABLE_GBPS = 8.9

POLICIES = {
    # policy: which quality classes of rungs it allows
    "quality": frozenset({"lossless", "near_lossless"}),
    "balanced": frozenset({"lossless", "near_lossless", "lossy"}),
    "speed": frozenset({"lossless", "near_lossless", "lossy"}),
    "memory": frozenset({"lossless", "near_lossless", "lossy"}),
}
DEFAULT_POLICY = "quality"


def uses_cfg(pipeline: str, guidance: float | None = 5.0) -> bool:
    """Whether a call runs classifier-free guidance, doubling the denoiser's batch: a guidance
    scale above 1, on a pipeline that has it (Flux's guidance is an embedding, not a second batch)."""
    return bool(guidance and guidance > 1) and "Flux" not in pipeline


@dataclass(frozen=True, slots=True)
class Workload:
    """What a call asks for, as far as memory and time go."""

    height: int = 1024
    width: int = 1024
    frames: int = 1
    batch: int = 1
    steps: int = 30
    cfg: bool = True
    temporal_factor: int = 4  # frames per latent frame of a video VAE (Wan, CogVideoX, HunyuanVideo)
    latent_hw: tuple[int, int] | None = None  # the latent the VAE decodes, once seen at decode time

    @property
    def megapixels(self) -> float:
        """Pixels decoded, all frames."""
        return self.height * self.width * self.frames / 1e6

    @property
    def latent_frames(self) -> int:
        return 1 if self.frames <= 1 else (self.frames - 1) // max(self.temporal_factor, 1) + 1

    @property
    def latent_megapixels(self) -> float:
        """What the denoiser's tokens scale with: one frame's megapixels x latent frames (a
        121-frame video is 31 latent frames, not 121 images)."""
        return self.height * self.width * self.latent_frames / 1e6


@dataclass(frozen=True, slots=True)
class Machine:
    """The memory and bandwidth a plan is judged against (see :func:`autofit.facts.hardware.read_machine`)."""

    budget_bytes: int
    # Host RAM a plan may hold: available now plus what the pipeline's weights already hold on the
    # host (a switch releases or reuses it), capped by max_ram.
    host_available_bytes: int
    device_type: str = "cuda"
    pinned_gbps: float = DEFAULT_PINNED_GBPS
    pageable_gbps: float = DEFAULT_PAGEABLE_GBPS
    quant_missing: str | None = None  # why bitsandbytes cannot quantize here (see quantize.missing)
    pinned_available_bytes: int | None = None  # what can be page-locked (None: all of host_available)
    disk_available_bytes: int | None = None  # free disk at the offload folder (None: not known)
    disk_unusable: str | None = None  # why no offload folder can be written there (None: it can, or not known)

    @property
    def pinned_room(self) -> int:
        if self.pinned_available_bytes is None:
            return self.host_available_bytes
        return min(self.pinned_available_bytes, self.host_available_bytes)

    @property
    def streams(self) -> bool:
        # diffusers' group offload takes its side stream from torch.accelerator: any accelerator
        # with streams (CUDA, ROCm, XPU, a PrivateUse1 backend such as autofit.testing.simdev); MPS has none.
        return self.device_type not in ("cpu", "mps", "meta")


@dataclass(frozen=True, slots=True)
class PipelineFacts:
    """What the rungs need to know about the pipeline beyond its weight sizes."""

    footprint: Footprint
    has_offload_seq: bool = True  # the class declares model_cpu_offload_seq
    vae_can_tile: bool = True
    vae_can_slice: bool = True
    fp8_supported: bool = True  # this torch build has float8_e4m3fn
    # (rung, component) pairs a one-way rung broke before (remembered in the plan cache).
    broken: frozenset[tuple[str, str]] = frozenset()
    # A storage rung applied with no copy of the original weights: it cannot be swapped for another.
    storage_locked: str | None = None
    has_bnb: bool = False  # bitsandbytes weights present (autofit's or the user's)


@dataclass(frozen=True, slots=True)
class Context:
    """One judgement's inputs: every rung predicate and cost function takes this."""

    machine: Machine
    pipeline: PipelineFacts
    workload: Workload = Workload()
    policy: str = DEFAULT_POLICY

    @property
    def footprint(self) -> Footprint:
        return self.pipeline.footprint


def context(footprint: Footprint, machine: Machine, workload: Workload = Workload(), *, policy: str = DEFAULT_POLICY,
            pipeline: PipelineFacts | None = None) -> Context:
    """A context from a footprint alone (pipeline facts at their permissive defaults)."""
    return Context(machine, pipeline or PipelineFacts(footprint), workload, policy)
