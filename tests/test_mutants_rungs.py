"""Tests that kill the mutants mutmut found alive in planning/rungs.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). rungs.py is pure. The table's rows are built when the module is imported,
where mutmut cannot switch a mutant on, so the table tests build the rows again with
``rungs._table()`` and check each against a reference outside the module: the rung-name grammar
and the plan's properties (autofit.plan), and the rung table of docs/recipes.md. The sizing and
step tests compare with a brute-force search over the cost model (autofit.planning.cost).
"""

import re
from pathlib import Path

import pytest

from autofit.plan import EXTRAS, PLACEMENTS, REPLACES, RESIDENT_MAX, RESIDENT_MIN, Plan, kind
from autofit.planning import cost, rungs
from autofit.planning.context import Machine, PipelineFacts, Workload, context

from footprints import FLUX, GIB, SDXL

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
NAMES = PLACEMENTS[1:] + EXTRAS
PLENTY = dict(budget_bytes=80 * GIB, host_available_bytes=1000 * GIB, disk_available_bytes=1000 * GIB)


def _docs_table() -> dict[str, tuple[str, str]]:
    """docs/recipes.md's rung table: name -> (kind, quality), the kind as the docs spell it
    ("add-on" for an extra) and the quality read from the cost column."""
    out = {}
    for line in RECIPES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        names, kind_cell, _, costs = cells
        quality = "lossy" if costs.startswith("lossy") else "near_lossless" if "near-lossless" in costs else "lossless"
        for name in re.findall(r"`([a-z0-9_]+)", names):
            out[name] = ({"add-on": "extra"}.get(kind_cell, kind_cell), quality)
    return out


def _ctx(fp=SDXL, workload=Workload(batch=2), policy="balanced", pipeline=None, **machine):
    return context(fp, Machine(**{**PLENTY, **machine}), workload, policy=policy,
                   pipeline=pipeline or PipelineFacts(fp))


def _rows() -> dict:
    """The table's rows, built again inside the test (where mutmut switches a mutant on)."""
    return {r.name: r for r in rungs._table()}


def _plan_with(name: str) -> Plan:
    return Plan().with_rung(name)


def test_every_row_has_the_kind_quality_and_replacements_the_grammar_and_docs_give():
    """kind: autofit.plan.kind and the docs' kind column; quality: the docs' cost column (lossy
    storage, near-lossless tiling); replaces: autofit.plan.REPLACES.
    mutants: planning.rungs.x__placement__mutmut_* and x__storage__mutmut_* that change the kind,
    the quality or the replaced rungs"""
    docs, rows = _docs_table(), _rows()
    assert set(rows) == set(NAMES) == set(docs) - {"device"}
    for name, row in rows.items():
        assert row.name == name
        assert (row.kind, row.quality) == docs[name], name
        assert row.kind == kind(name), name
        assert row.replaces == REPLACES.get(name, frozenset()), name


def test_the_off_device_and_planned_columns_are_what_the_plan_properties_say():
    """``off_device``: the stage whose components the plan keeps on the CPU (Plan.on_cpu);
    ``planned``: "decode" for decode remedies (tiling, the CPU decode), "moves" for the per-call
    moves (Plan.encoders_on_demand / decode_alone), None for the rest."""
    for name, row in _rows().items():
        plan = _plan_with(name)
        on_cpu = [role for role in ("encode", "decode") if plan.on_cpu(role)]
        assert row.off_device == (on_cpu[0] if on_cpu else None), name
        expected = ("decode" if plan.tiling or plan.decode_on_cpu
                    else "moves" if plan.encoders_on_demand or plan.decode_alone else None)
        assert row.planned == expected, name


def test_no_rung_refuses_where_everything_it_needs_is_there():
    """A CUDA machine with room everywhere, a pipeline with every facility and a batch of 2: every
    row's needs pass on the plan that adds it (so a mutant that refuses more shows)."""
    ctx = _ctx()
    for name, row in _rows().items():
        assert row.needs(_plan_with(name), ctx) is None, name


@pytest.mark.parametrize("name", [p for p in PLACEMENTS[1:]] + ["offload_encoders", "offload_for_decode", "vae_cpu",
                                                                   "fp8", "int8", "nf4"])
def test_rungs_that_hold_host_ram_are_refused_when_it_is_short(name):
    """Every placement, the per-call moves and the CPU decode hold weights in host RAM, and so does
    a storage rung under a placement that offloads (cost.host_bytes > 0 for each, checked here):
    with 1 byte available each is refused, naming host RAM.
    mutants: planning.rungs.x__placement__mutmut_* and x__storage__mutmut_* that drop host_ram"""
    ctx = _ctx(host_available_bytes=1)
    plan = Plan("model_offload").with_rung(name) if kind(name) == "storage" else _plan_with(name)
    assert cost.host_bytes(plan, SDXL) > 0
    reason = _rows()[name].needs(plan, ctx)
    assert reason and "host RAM" in reason, (name, reason)


@pytest.mark.parametrize("name, facts, expected", [
    ("resident_stream", dict(device_type="cpu"), "CPU's memory is the host's"),
    ("model_offload", dict(has_offload_seq=False), "model_cpu_offload_seq"),
    ("group_leaf_stream", dict(device_type="mps"), "streams"),
    ("group_leaf_stream", dict(pinned_available_bytes=1), "pinned host RAM"),
    ("group_leaf_lowmem", dict(device_type="mps"), "streams"),
    ("group_disk", dict(disk_unusable="the offload folder is read-only"), "read-only"),
    ("group_disk", dict(disk_available_bytes=1), "to disk"),
    ("sequential", dict(device_type="cpu"), "accelerator"),
    ("sequential", dict(has_bnb=True), "bitsandbytes"),
    ("split_batch", dict(batch=1), "batch of 1"),
    ("split_batch_max", dict(batch=1), "batch of 1"),
    ("vae_slicing", dict(batch=1), "batch of 1"),
    ("vae_slicing", dict(vae_can_slice=False), "slicing"),
    ("vae_tiling", dict(vae_can_tile=False), "tiling"),
    ("vae_tiling_small", dict(vae_can_tile=False), "tiling"),
    ("offload_encoders", dict(fp=Plan("model_offload")), "every component is on the device"),
    ("offload_encoders", dict(fp="no encoders"), "no text encoders"),
    ("offload_for_decode", dict(fp=Plan("group_block")), "every component is on the device"),
    ("fp8", dict(fp8_supported=False), "float8"),
    ("fp8", dict(storage_locked="int8"), "cannot be swapped"),
    ("int8", dict(storage_locked="nf4"), "cannot be swapped"),
    ("nf4", dict(storage_locked="int8"), "cannot be swapped"),
    ("int8", dict(quant_missing="bitsandbytes is not installed"), "not installed"),
    ("nf4", dict(quant_missing="bitsandbytes is not installed"), "not installed"),
])
def test_each_row_refuses_for_its_own_need(name, facts, expected):
    """Each row's own needs, one condition at a time, everything else plentiful: what
    docs/recipes.md and the guide say each rung needs.
    mutants: planning.rungs.xǁNeedǁ__init____mutmut_1, xǁNeedǁ__or____mutmut_1 and _2,
    x_need__mutmut_1, and the x__placement__ / x__storage__ mutants that drop a row's needs"""
    facts = dict(facts)
    plan, fp = _plan_with(name), SDXL
    base = facts.pop("fp", None)
    if isinstance(base, Plan):  # the rung added to a plan that already offloads
        plan = base.with_rung(name)
    elif base == "no encoders":
        fp = type(SDXL)({n: c for n, c in SDXL.components.items() if c.role != "encode"})
    pipeline = {k: facts.pop(k) for k in list(facts) if k in PipelineFacts.__dataclass_fields__}
    workload = Workload(batch=facts.pop("batch", 2))
    ctx = _ctx(fp, workload, pipeline=PipelineFacts(fp, **pipeline), **facts)
    reason = _rows()[name].needs(plan, ctx)
    assert reason and expected in reason, (name, reason)


def test_the_quality_policy_refuses_exactly_the_rungs_the_docs_call_lossy():
    """mutants: planning.rungs.x__storage__mutmut_* that change the storage quality (through
    refusal, which reads the row's quality)"""
    docs = _docs_table()
    ctx = _ctx(policy="quality")
    for name in NAMES:
        refused = rungs.refusal(name, _plan_with(name), ctx)
        assert (refused is not None and "policy" in refused) == (docs[name][1] == "lossy"), name


# ---- quality(plan): the worst rung's ------------------------------------------------------------
ORDER = ("lossless", "near_lossless", "lossy")


@pytest.mark.parametrize("pair", [("vae_tiling", "fp8"), ("model_offload", "vae_tiling"), ("group_leaf", "split_batch"),
                                  ("vae_tiling_small", "nf4"), ("offload_encoders", "vae_tiling"),
                                  ("sequential", "vae_cpu")])
def test_a_plans_quality_is_its_worst_rungs_by_the_docs(pair):
    """mutants: planning.rungs.x_quality__mutmut_*"""
    docs = _docs_table()
    plan = Plan.from_names(list(pair))
    worst = max((docs[n][1] for n in pair), key=ORDER.index)
    assert rungs.quality(plan) == worst
    assert rungs.quality(Plan()) == "lossless"
    for name in pair:
        assert rungs.quality(_plan_with(name)) == docs[name][1]


# ---- sizing resident_stream: the largest percent that fits ---------------------------------------
def _reference_percent(ctx, margin=None, measured=None):
    """Brute force over every percent with the cost model: the largest that fits, else the least."""
    room = cost.usable(ctx.machine.budget_bytes, margin)
    fitting = [p for p in range(RESIDENT_MIN, RESIDENT_MAX + 1)
               if max(cost.stage_peaks(Plan(f"resident_stream:{p}"), ctx.footprint, ctx.workload,
                                       measured).values()) <= room]
    return max(fitting) if fitting else RESIDENT_MIN


def _peak(p, fp=FLUX, wl=Workload(steps=4, cfg=False), measured=None):
    return max(cost.stage_peaks(Plan(f"resident_stream:{p}"), fp, wl, measured).values())


@pytest.mark.parametrize("gib", [1, 12, 16, 18.5, 20, 23, 26, 29, 40])
def test_sized_picks_the_largest_percent_that_fits(gib):
    """mutants: planning.rungs.x_sized__mutmut_2, _3, _5, _25, _27, _28, _31, _35, _43, _44"""
    ctx = _ctx(FLUX, Workload(steps=4, cfg=False), budget_bytes=int(gib * GIB))
    expected = _reference_percent(ctx)
    assert rungs.sized(Plan("resident_stream:50"), ctx) == Plan(f"resident_stream:{expected}")
    assert rungs.sized(Plan("model_offload"), ctx) == Plan("model_offload")  # other plans as they are


def test_the_largest_percent_is_found_for_every_budget_between_its_neighbours():
    """Budgets exactly at a percent's peak (margin 1.0: the whole budget usable) size to exactly that
    percent: a peak equal to the room fits.
    mutants: planning.rungs.x__fits__mutmut_15, x_sized__mutmut_25, _27, _28, _43, _44"""
    wl = Workload(steps=4, cfg=False)
    for p in (RESIDENT_MIN, 6, 17, 33, 50, 51, 64, 98, RESIDENT_MAX):
        ctx = _ctx(FLUX, wl, budget_bytes=_peak(p))
        assert _reference_percent(ctx, margin=1.0) == p  # peaks rise with every percent
        assert rungs.sized(Plan("resident_stream"), ctx, margin=1.0) == Plan(f"resident_stream:{p}"), p


def test_sized_uses_the_margin_and_the_measured_activations_it_is_given():
    """mutants: planning.rungs.x__fits__mutmut_3, _5, _10, _14, x_sized__mutmut_8, _9, _12, _13,
    _31, _32, _35, _36"""
    wl = Workload(steps=4, cfg=False)
    ctx = _ctx(FLUX, wl, budget_bytes=24 * GIB)
    default, whole = rungs.sized(Plan("resident_stream"), ctx), rungs.sized(Plan("resident_stream"), ctx, margin=1.0)
    assert whole.resident == _reference_percent(ctx, margin=1.0) > default.resident == _reference_percent(ctx)
    measured = {"denoise": 6 * GIB}
    heavy = rungs.sized(Plan("resident_stream"), ctx, measured=measured)
    assert heavy.resident == _reference_percent(ctx, measured=measured) < default.resident
    # The least percent already fails on the measured activations: the least comes back, not more.
    starved = {"denoise": 23 * GIB}
    assert _reference_percent(ctx, margin=1.0, measured=starved) == RESIDENT_MIN
    assert rungs.sized(Plan("resident_stream"), ctx, margin=1.0, measured=starved).resident == RESIDENT_MIN
    # ... while the same budget, measured lighter, would have taken more than the least.
    assert rungs.sized(Plan("resident_stream"), ctx, margin=1.0).resident > RESIDENT_MIN


# ---- steps and step: the way down in quarters -----------------------------------------------------
def test_steps_go_down_in_quarters_of_the_resident_bytes_to_the_least():
    """From the whole denoiser (not in force yet) and from a percent in force; 5 (the least) is a
    step; a rung already in the plan has nothing more to give.
    mutants: planning.rungs.x_steps__mutmut_2, _3, _4, _9, _16"""
    def percents(plan):
        return [s.resident for s in rungs.steps("resident_stream", plan)]

    assert percents(Plan()) == [75, 56, 42, 31, 23, 17, 12, 9, 6]  # 100 * 3/4 ... while >= 5
    assert percents(Plan("resident_stream:50")) == [37, 27, 20, 15, 11, 8, 6]
    assert percents(Plan("resident_stream:7")) == [RESIDENT_MIN]  # int(7 * 0.75) == 5
    assert percents(Plan("resident_stream:6")) == []
    assert rungs.steps("vae_tiling", _plan_with("vae_tiling")) == []
    assert rungs.steps("model_offload", Plan("model_offload")) == []
    assert rungs.steps("vae_tiling", Plan()) == [_plan_with("vae_tiling")]


def test_step_jumps_to_the_first_candidate_that_fits_else_takes_one_step():
    """mutants: planning.rungs.x_step__mutmut_7, _12, _19"""
    wl = Workload(steps=4, cfg=False)
    plan = Plan("resident_stream:10")  # candidates: 7, then 5
    fits_5_only = _ctx(FLUX, wl, budget_bytes=int((_peak(5) + _peak(7)) / 2 / (1 - 0.06)))
    assert rungs._fits(Plan("resident_stream:5"), fits_5_only) and not rungs._fits(Plan("resident_stream:7"),
                                                                                 fits_5_only)
    assert rungs.step("resident_stream", plan, fits_5_only) == Plan("resident_stream:5")
    nothing_fits = _ctx(FLUX, wl, budget_bytes=GIB)
    assert rungs.step("resident_stream", plan, nothing_fits) == Plan("resident_stream:7")
    assert rungs.step("resident_stream", Plan("resident_stream:6"), nothing_fits) is None
    assert rungs.step("vae_tiling", Plan(), nothing_fits) == _plan_with("vae_tiling")


# ---- what a one-way rung broke before -----------------------------------------------------------
def test_a_rung_broken_before_is_refused_only_for_its_own_components_and_names_them():
    """The plan cache's broken pairs are per rung: int8 having broken the transformer says nothing
    of fp8. The reason lists every broken component, comma-separated.
    mutants: planning.rungs.x__targets_left__mutmut_4, _8"""
    int8_broke = PipelineFacts(FLUX, broken=frozenset({("int8", "transformer"), ("int8", "text_encoder_2")}))
    ctx = _ctx(FLUX, pipeline=int8_broke)
    assert _rows()["fp8"].needs(_plan_with("fp8"), ctx) is None
    assert _rows()["nf4"].needs(_plan_with("nf4"), ctx) is None
    reason = _rows()["int8"].needs(_plan_with("int8"), ctx)
    listed = re.fullmatch(r"int8 broke (.*) before \(marked broken in the plan cache\)", reason).group(1)
    assert listed.split(", ") == ["text_encoder_2", "transformer"]


def test_measured_activations_lighter_than_the_estimate_let_more_stay_resident():
    """Where the estimate says even the least percent does not fit but the measured activations
    (lighter) say more does, the measured ones decide.
    mutants: planning.rungs.x_sized__mutmut_9"""
    wl = Workload(steps=4, cfg=False)
    light = {"denoise": 1, "encode": 1, "decode": 1, "load": 0}
    budget = (_peak(5) + _peak(5, measured=light)) // 2
    ctx = _ctx(FLUX, wl, budget_bytes=budget)
    assert _peak(5, measured=light) < budget < _peak(5)  # the estimate fails at the least percent
    expected = _reference_percent(ctx, margin=1.0, measured=light)
    assert expected > RESIDENT_MIN
    assert rungs.sized(Plan("resident_stream"), ctx, margin=1.0, measured=light).resident == expected


@pytest.mark.parametrize("rung", ["fp8", "int8", "nf4"])
def test_each_storage_rung_reads_its_own_broken_components_and_its_own_lock(rung):
    """A storage rung that broke every component it could store is refused for itself only; the
    storage applied with no copy kept (``storage_locked``) refuses the others, never itself.
    mutants: planning.rungs.x__storage__mutmut_17, x__table__mutmut_233, _234, _235 (and the fp8 and
    int8 rows' like them)"""
    targets = [c.name for c in FLUX.components.values() if (c.fp8_ok if rung == "fp8" else c.quant_ok)]
    broke = PipelineFacts(FLUX, broken=frozenset((rung, n) for n in targets))
    reason = _rows()[rung].needs(_plan_with(rung), _ctx(FLUX, pipeline=broke))
    assert reason and reason.startswith(f"{rung} broke "), reason
    for other in {"fp8", "int8", "nf4"} - {rung}:
        assert _rows()[other].needs(_plan_with(other), _ctx(FLUX, pipeline=broke)) is None, other
    locked = PipelineFacts(FLUX, storage_locked=rung)
    assert _rows()[rung].needs(_plan_with(rung), _ctx(FLUX, pipeline=locked)) is None
    for other in {"fp8", "int8", "nf4"} - {rung}:
        reason = _rows()[other].needs(_plan_with(other), _ctx(FLUX, pipeline=locked))
        assert reason and "cannot be swapped" in reason, other
