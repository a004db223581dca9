"""A plan: which rungs are applied. Immutable; the runtime swaps whole plans.

A placement may carry a quantity in its name, as a device carries its index ("cuda:0"):
``resident_stream:75`` keeps 75% of the denoiser on the device and streams the rest. The name
is the whole placement, so plans stay hashable, compare by value, and round-trip through the
names the plan cache stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# ---- the rung-name grammar: every name a plan may hold, its kind and what it replaces -------
# Kinds: a placement says where weights live (one per plan; "device" is the baseline), storage
# changes how they are stored (one-way; one per plan), an extra adds to either. What each rung
# needs, costs and does lives in planning/rungs.py (one row per name here) and strategies/.
STORAGE = ("fp8", "int8", "nf4")
PLACEMENTS = ("device", "resident_stream", "model_offload", "group_leaf_stream", "group_leaf_lowmem",
              "group_block", "group_leaf", "group_disk", "sequential")
EXTRAS = ("split_batch", "split_batch_max", "offload_encoders", "offload_for_decode", "vae_slicing", "vae_tiling",
          "vae_tiling_small", "vae_cpu", *STORAGE)
DEVICE_ONLY = frozenset({"offload_encoders", "offload_for_decode"})  # extras that only apply with all on the device
REPLACES: dict[str, frozenset[str]] = {  # rungs dropped from a plan when this one is added
    **{p: DEVICE_ONLY for p in PLACEMENTS[1:]},
    **{s: frozenset(STORAGE) - {s} for s in STORAGE},
    "split_batch_max": frozenset({"split_batch"}),
    "vae_tiling_small": frozenset({"vae_tiling"}),
    "vae_cpu": frozenset({"vae_tiling", "vae_tiling_small", "vae_slicing"}),
}
# Placements that carry a quantity in their name (``resident_stream:75``), with its default.
QUANTIFIED: dict[str, int] = {"resident_stream": 50}
RESIDENT_MIN, RESIDENT_MAX = 5, 99  # percent; below 5 leaf-level streaming is the better family, 100 is "device"


def kind(name: str) -> str:
    """``placement``, ``storage`` or ``extra``: the kind of rung ``name`` (quantity allowed)."""
    family = split_name(name)[0]
    if family in PLACEMENTS:
        return "placement"
    if family in STORAGE:
        return "storage"
    if family in EXTRAS:
        return "extra"
    raise ValueError(f"unknown rung {name!r}; choose from {PLACEMENTS + EXTRAS}")


def split_name(name: str) -> tuple[str, int | None]:
    """A rung name and its quantity: ``"resident_stream:75"`` -> ``("resident_stream", 75)``,
    ``"vae_tiling"`` -> ``("vae_tiling", None)``. Raises ValueError, saying what is allowed."""
    family, sep, amount = name.partition(":")
    if not sep:
        return name, None
    if family not in QUANTIFIED:
        raise ValueError(f"{name!r}: only {sorted(QUANTIFIED)} take a quantity after ':'")
    if not amount.isdigit() or not RESIDENT_MIN <= int(amount) <= RESIDENT_MAX:
        raise ValueError(f"{name!r}: '{family}:N' keeps N percent of the denoiser on the device; N must be a whole "
                         f"number from {RESIDENT_MIN} to {RESIDENT_MAX} (100 is the 'device' placement)")
    return family, int(amount)



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
        """This plan with rung ``name`` added, and the rungs it replaces (``REPLACES``) dropped."""
        if name == "device":
            return replace(self, placement="device")
        extras = self.extras - REPLACES.get(split_name(name)[0], frozenset())
        if kind(name) == "placement":
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
