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


# ---- what each rung does: the terms the cost model, the facts and the strategies ask about ----
# These are data, so no module outside this grammar, the rung table (planning/rungs.py) and the
# strategy modules compares a rung's name: it asks the plan's terms. They live on the ground
# floor because the facts (compiled regions, footprints) and the diffusers touches ask them too;
# planning/rungs.py's row for a rung carries its terms (``Rung.terms``) beside its needs.
@dataclass(frozen=True, slots=True)
class Placing:
    """What a placement does with the weights.

    ``scheme`` is how weights reach the device, and the key both the cost model
    (planning/cost.py) and the strategies (strategies/placement.py) dispatch on: ``none`` (all
    stay on the device), ``component`` (accelerate moves whole components per call), ``layer``
    (accelerate hooks every leaf), ``group`` (diffusers group offload of ``group``-level granules)
    or ``partial`` (part resident, the rest streamed; strategies/partial.py)."""

    scheme: str
    group: str | None = None  # group offload granule: "leaf" or "block"
    stream: bool = False  # CUDA-stream prefetch (group offload's use_stream)
    lowmem: bool = False  # pins one group at a time (group offload's low_cpu_mem_usage)
    pins_copies: bool = False  # a pinned copy of every offloaded tensor, made up front
    disk: bool = False  # the offloaded weights live in files of the offload folder (autofit.disk)
    hooks_every_layer: bool = False  # hooks inside a component (compiled whole modules cannot run)
    # Seconds (cost.predict_seconds) of the group and layer schemes: each step the denoiser's
    # offloaded weights cross at ``rate`` ("pinned", "pageable", "pageable_out": into fresh pages,
    # half the pageable rate, or "disk"), hidden behind the compute when ``overlap``, plus
    # ``hook_calls`` hook overheads per leaf; the encoders' once a call; all times ``scale``.
    rate: str | None = None
    overlap: bool = False
    hook_calls: int = 0
    scale: float = 1.0

    @property
    def offloads(self) -> bool:
        """Weights leave the device between uses."""
        return self.scheme != "none"

    @property
    def hooks_in_blocks(self) -> bool:
        """Hooks sit inside a component's repeated blocks: on their layers, or streaming them."""
        return self.hooks_every_layer or self.scheme == "partial"

    @property
    def hooks_outside_forward(self) -> bool:
        """Every hook sits on the component itself, outside its forward (or there are none)."""
        return self.scheme in ("none", "component")

    @property
    def accelerate_hooks(self) -> bool:
        """Applied by accelerate's hooks (enable_model_cpu_offload / enable_sequential_cpu_offload)."""
        return self.scheme in ("component", "layer")

    @property
    def host_pageable(self) -> bool:
        """Offloaded weights wait in pageable host RAM: weights a streamed plan left in its pinned
        copies are unpinned first (they would stay page-locked, and rounded up)."""
        return self.offloads and not self.pins_copies

    @property
    def keeps_quantized(self) -> bool:
        """bitsandbytes components stay on the device: this scheme moves tensors, and their
        scales sit beside the weights, out of its reach (whole-module .to() moves both)."""
        return self.scheme in ("group", "partial")


@dataclass(frozen=True, slots=True)
class Storing:
    """What a storage rung does to a component's weights (facts/footprint.py sizes them)."""

    targets: str  # the ComponentFootprint flag of the components it applies to
    size: str  # the ComponentFootprint field with their stored size
    bitsandbytes: bool = False  # bitsandbytes layers: moved by their own .to(), originals kept to undo
    # Seconds per step (cost.predict_seconds), per GB: of cast weights times the effective batch
    # (fp8 upcasts each layer's weights on every use: SDXL +2.0 s over 30 steps on an H200), or
    # of the denoiser's full-precision weights quantized. bitsandbytes on an H100 (SDXL-sized,
    # 1024x1024, CFG, 10 steps): nf4 1.26 s vs 0.71 s unquantized (+0.0107 s/GB/step), LLM.int8
    # (threshold 6.0) 2.79 s (+0.041). A Flux-sized transformer lost far less to nf4 on an H200
    # (0.84 vs 0.78 s, 4 steps): its matmuls are larger; the SDXL figure is the cautious one.
    cast_s_per_gb: float = 0.0
    quant_s_per_gb: float = 0.0


# The decode tiling rungs and the tile size each one asks the VAE for (strategies/vae.py).
TILING: dict[str, str] = {"vae_tiling": "normal", "vae_tiling_small": "small"}
# The extras that shrink every stage's activations the most (preflight's lightest plan).
LIGHTEST_EXTRAS = frozenset({"vae_tiling_small", "vae_slicing", "split_batch_max"})

PLACING: dict[str, Placing] = {
    "device": Placing("none"),
    "resident_stream": Placing("partial"),
    "model_offload": Placing("component"),
    "group_leaf_stream": Placing("group", "leaf", stream=True, pins_copies=True, hooks_every_layer=True,
                                 rate="pinned", overlap=True, hook_calls=1),
    "group_leaf_lowmem": Placing("group", "leaf", stream=True, lowmem=True, hooks_every_layer=True,
                                 rate="pageable", overlap=True, hook_calls=1),
    "group_block": Placing("group", "block", rate="pageable_out"),
    "group_leaf": Placing("group", "leaf", hooks_every_layer=True, rate="pageable_out", hook_calls=2),
    "group_disk": Placing("group", "block", disk=True, hooks_every_layer=True, rate="disk"),
    "sequential": Placing("layer", hooks_every_layer=True, rate="pageable_out", hook_calls=2, scale=1.2),
}
STORING: dict[str, Storing] = {
    "fp8": Storing("fp8_ok", "cast_bytes", cast_s_per_gb=0.014),
    "int8": Storing("quant_ok", "int8_bytes", bitsandbytes=True, quant_s_per_gb=0.041),
    "nf4": Storing("quant_ok", "nf4_bytes", bitsandbytes=True, quant_s_per_gb=0.0107),
}
assert tuple(PLACING) == PLACEMENTS and tuple(STORING) == STORAGE, "terms != grammar"


def placing(name: str) -> Placing:
    """The terms of placement ``name`` (quantity allowed: ``resident_stream:75``)."""
    return PLACING[split_name(name)[0]]


def storing(name: str | None) -> Storing | None:
    """The terms of storage rung ``name``; None for the original weights (``None``)."""
    return None if name is None else STORING[name]


def placement_of(scheme: str, **terms: object) -> str:
    """The placement whose terms are ``scheme`` and ``terms`` (hooks found on a pipeline, read
    back as a name): ``placement_of("group", group="block", disk=False)`` -> ``group_block``."""
    found = [n for n, p in PLACING.items() if p.scheme == scheme and all(getattr(p, k) == v for k, v in terms.items())]
    if len(found) != 1:
        raise ValueError(f"terms {scheme!r} {terms} name {found or 'no placement'}, not one")
    return found[0]


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
            raise ValueError(f"unknown rungs {sorted(unknown)}; choose from {EXTRAS}")
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
    def placing(self) -> Placing:
        """What the placement does with the weights (its terms)."""
        return PLACING[self.family]

    @property
    def storing(self) -> Storing | None:
        """What the storage rung does to the weights (its terms); None for the original weights."""
        return storing(self.storage)

    @property
    def offloads(self) -> bool:
        """Weights leave the device between uses (any placement but ``device``)."""
        return self.placing.offloads

    @property
    def bitsandbytes(self) -> bool:
        """The plan stores weights as bitsandbytes layers (int8, nf4)."""
        return self.storing is not None and self.storing.bitsandbytes

    @property
    def encoders_on_demand(self) -> bool:
        """``offload_encoders``: text encoders live on the CPU and visit the device to encode."""
        return "offload_encoders" in self.extras

    @property
    def decode_alone(self) -> bool:
        """``offload_for_decode``: the other components leave the device before the VAE runs."""
        return "offload_for_decode" in self.extras

    @property
    def decode_on_cpu(self) -> bool:
        """``vae_cpu``: the VAE lives and runs on the CPU."""
        return "vae_cpu" in self.extras

    @property
    def decode_sliced(self) -> bool:
        """``vae_slicing``: the VAE decodes one image of the batch at a time."""
        return "vae_slicing" in self.extras

    def on_cpu(self, role: str | None) -> bool:
        """Components of stage ``role`` live on the CPU under the ``device`` placement."""
        return (role == "encode" and self.encoders_on_demand) or (role == "decode" and self.decode_on_cpu)

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
        """The tile size the VAE is asked for ("normal", "small"), or None: not tiled."""
        return next((TILING[n] for n in reversed(TILING) if n in self.extras), None)

    @property
    def tiling_rungs(self) -> tuple[str, ...]:
        """The plan's decode tiling rungs (what deferring the tiling takes out)."""
        return tuple(n for n in self.names if n in TILING)
