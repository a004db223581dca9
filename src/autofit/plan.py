"""A plan: which rungs are applied. Immutable; the runtime swaps whole plans.

A placement may carry a quantity in its name, as a device carries its index ("cuda:0"):
``resident_stream:75`` keeps 75% of the denoiser on the device and streams the rest. The name
is the whole placement, so plans stay hashable, compare by value, and round-trip through the
names the plan cache stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .rungs import EXTRAS, PLACEMENTS, QUANTIFIED, RUNGS, STORAGE, split_name


@dataclass(frozen=True, slots=True)
class Plan:
    placement: str = "device"
    extras: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        family, amount = split_name(self.placement)  # raises on a bad quantity, saying why
        if family not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        if family in QUANTIFIED and amount is None:  # the bare rung name: its default quantity
            object.__setattr__(self, "placement", f"{family}:{QUANTIFIED[family]}")
        unknown = set(self.extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {EXTRAS}")
        storage = [s for s in STORAGE if s in self.extras]
        if len(storage) > 1:
            raise ValueError(f"a plan stores weights one way, got {storage}; pick one of {STORAGE}")

    @property
    def family(self) -> str:
        """The placement's rung name, without its quantity (``resident_stream:75`` -> ``resident_stream``)."""
        return split_name(self.placement)[0]

    @property
    def resident(self) -> int | None:
        """Percent of the denoiser kept on the device under ``resident_stream``; None otherwise."""
        return split_name(self.placement)[1]

    @property
    def storage(self) -> str | None:
        """The weight-storage rung of the plan (fp8, int8, nf4), or None for the original dtype."""
        return next((s for s in STORAGE if s in self.extras), None)

    @property
    def names(self) -> tuple[str, ...]:
        """The rungs applied, in the order they are applied (storage before offloading)."""
        out = [self.storage] if self.storage else []
        if self.placement != "device":
            out.append(self.placement)
        out += [e for e in EXTRAS if e in self.extras and e not in STORAGE]
        return tuple(out)

    @classmethod
    def from_names(cls, names: "tuple[str, ...] | list[str]") -> "Plan":
        placements = [n for n in names if split_name(n)[0] in PLACEMENTS]
        if len(placements) > 1:
            raise ValueError(f"a plan has one placement, got {placements}")
        return cls(placements[0] if placements else "device", frozenset(n for n in names if n not in placements))

    def with_rung(self, name: str) -> "Plan":
        """This plan with rung ``name`` added, and the rungs it replaces (rungs.RUNGS) dropped."""
        if name == "device":
            return replace(self, placement="device")
        rung = RUNGS[split_name(name)[0]]
        extras = self.extras - rung.replaces
        if rung.kind == "placement":
            return replace(self, placement=name, extras=extras)
        return replace(self, extras=extras | {name})

    def without(self, name: str) -> "Plan":
        """This plan with rung ``name`` taken out (a placement goes back to ``device``)."""
        if name in (self.placement, self.family):
            return replace(self, placement="device")
        return replace(self, extras=self.extras - {name})

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
