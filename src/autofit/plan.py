"""A plan: which strategies are applied. Immutable; the runtime swaps whole plans."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PLACEMENTS = (
    "device",  # every component on the device (the baseline; not listed in ``names``)
    "model_offload",
    "group_leaf_stream",
    "group_leaf_lowmem",
    "group_block",
    "group_leaf",
    "sequential",
)
EXTRAS = (
    "fp8",
    "int8",
    "nf4",
    "split_batch",
    "split_batch_max",
    "offload_encoders",
    "offload_for_decode",
    "vae_slicing",
    "vae_tiling",
    "vae_tiling_small",
    "vae_cpu",
)
# Extras that only make sense while everything else lives on the device.
DEVICE_ONLY_EXTRAS = frozenset({"offload_encoders", "offload_for_decode"})
# Weight storage rungs (one-way, lossy): at most one per plan.
STORAGE = ("fp8", "int8", "nf4")


@dataclass(frozen=True, slots=True)
class Plan:
    placement: str = "device"
    extras: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        unknown = set(self.extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {EXTRAS}")
        storage = [s for s in STORAGE if s in self.extras]
        if len(storage) > 1:
            raise ValueError(f"a plan stores weights one way, got {storage}; pick one of {STORAGE}")

    @property
    def storage(self) -> str | None:
        """The weight-storage rung of the plan (fp8, int8, nf4), or None for the original dtype."""
        return next((s for s in STORAGE if s in self.extras), None)

    @property
    def names(self) -> tuple[str, ...]:
        """The strategies applied, in the order they are applied (storage before offloading)."""
        out = [self.storage] if self.storage else []
        if self.placement != "device":
            out.append(self.placement)
        out += [e for e in EXTRAS if e in self.extras and e not in STORAGE]
        return tuple(out)

    @classmethod
    def from_names(cls, names: "tuple[str, ...] | list[str]") -> "Plan":
        placements = [n for n in names if n in PLACEMENTS]
        if len(placements) > 1:
            raise ValueError(f"a plan has one placement, got {placements}")
        return cls(placements[0] if placements else "device", frozenset(n for n in names if n not in PLACEMENTS))

    def with_strategy(self, name: str) -> "Plan":
        if name in PLACEMENTS:
            extras = self.extras if name == "device" else self.extras - DEVICE_ONLY_EXTRAS
            return replace(self, placement=name, extras=extras)
        extras = set(self.extras) | {name}
        if name in STORAGE:
            extras -= set(STORAGE) - {name}
        if name == "vae_tiling_small":
            extras.discard("vae_tiling")
        if name == "split_batch_max":
            extras.discard("split_batch")
        if name == "vae_cpu":
            extras -= {"vae_tiling", "vae_tiling_small", "vae_slicing"}
        return replace(self, extras=frozenset(extras))

    def denoise_chunks(self, batch: int) -> int:
        """How many pieces the denoiser's batch is cut into (1: not split)."""
        if "split_batch_max" in self.extras:
            return max(batch, 1)
        if "split_batch" in self.extras:
            return 2
        return 1

    @property
    def tiling(self) -> str | None:
        if "vae_tiling_small" in self.extras:
            return "small"
        if "vae_tiling" in self.extras:
            return "normal"
        return None


@dataclass(frozen=True, slots=True)
class CallShape:
    """What a call asks for, as far as memory goes."""

    batch: int = 1
    height: int | None = None
    width: int | None = None
    latent_hw: tuple[int, int] | None = None  # seen at decode time
