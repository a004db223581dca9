"""Each rung is one row: its terms (autofit.plan) are what the cost model, the facts and the
strategies read, so no module outside the grammar, the rung table and the strategy modules
compares a rung's name."""

import ast
from pathlib import Path

import pytest
import torch

import autofit
from autofit import _diffusers
from autofit.plan import EXTRAS, PLACEMENTS, PLACING, STORAGE, STORING, Placing, Plan, Storing, placement_of
from autofit.planning.rungs import RUNGS
from autofit.strategies import placement as placement_strategy
from autofit.strategies.placement import place, tear_down

SRC = Path(autofit.__file__).parent
NAMES = set(PLACEMENTS) | set(EXTRAS)
# Where a rung's name may be compared: its grammar, its row, its strategy module.
MAY_NAME = ("plan.py", "planning/rungs.py", "strategies/")
# Rooms this branch does not own yet: their comparisons have Plan properties / row terms waiting
# (docs/architecture.md, "One rulebook: the rung table"); remove each as it is converted.
PENDING: set[str] = set()  # files not converted yet (none)


def _name_comparisons(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if set(consts) & NAMES:
                out.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
              and any(isinstance(a, ast.Constant) and a.value in ("group_", "vae_", "split_", "offload_")
                      for a in node.args)):
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_rung_name_compared_outside_the_grammar_the_table_and_the_strategies():
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(MAY_NAME) or rel in PENDING:
            continue
        hits = _name_comparisons(ast.parse(path.read_text()))
        if hits:
            found[rel] = hits
    assert not found, f"compare the plan's terms (autofit.plan), not rung names: {found}"
    # The checker itself sees what it looks for (in a module known to compare names).
    assert _name_comparisons(ast.parse((SRC / "strategies/quantize.py").read_text()))


def test_every_row_carries_its_terms_and_every_scheme_has_a_strategy():
    for name, rung in RUNGS.items():
        if rung.kind == "placement":
            assert isinstance(rung.terms, Placing) and rung.terms is PLACING[name]
        elif rung.kind == "storage":
            assert isinstance(rung.terms, Storing) and rung.terms is STORING[name]
        else:
            assert rung.terms is None
    assert {p.scheme for p in PLACING.values()} == set(placement_strategy.SCHEMES)
    assert set(STORING) == set(STORAGE)


def test_terms_say_what_the_names_used_to():
    """The facts the old name lists held, read back from the terms."""
    assert {n for n, p in PLACING.items() if p.scheme == "group"} == {
        "group_leaf_stream", "group_leaf_lowmem", "group_block", "group_leaf", "group_disk"}
    assert {n for n, p in PLACING.items() if p.hooks_every_layer} == {
        "sequential", "group_leaf", "group_leaf_stream", "group_leaf_lowmem", "group_disk"}
    assert [n for n, p in PLACING.items() if not p.offloads] == ["device"]
    assert {n for n, p in PLACING.items() if p.accelerate_hooks} == {"model_offload", "sequential"}
    assert [n for n, s in STORING.items() if s.bitsandbytes] == ["int8", "nf4"]
    assert Plan("resident_stream:75").placing is PLACING["resident_stream"]
    assert Plan(extras=frozenset({"vae_tiling_small"})).tiling == "small" and Plan().tiling is None
    assert Plan(extras=frozenset({"vae_tiling", "vae_cpu"})).tiling_rungs == ("vae_tiling",)
    plan = Plan(extras=frozenset({"offload_encoders", "vae_cpu"}))
    assert plan.on_cpu("encode") and plan.on_cpu("decode") and not plan.on_cpu("denoise")
    assert not Plan("group_leaf").on_cpu("encode")


@pytest.mark.parametrize("name", [n for n, p in PLACING.items() if p.scheme == "group"])
def test_placement_of_reads_each_group_placement_back(name):
    p = PLACING[name]
    found = placement_of("group", group=p.group, stream=p.stream, lowmem=p.lowmem, disk=p.disk)
    assert found == name
    with pytest.raises(ValueError, match="not one"):
        placement_of("group")


@pytest.mark.parametrize("name", ["group_block", "group_leaf", "group_disk"])
def test_a_placed_group_offload_is_detected_as_its_rung(name, tmp_path, monkeypatch):
    """place() applies the row's terms with diffusers' real hooks; detect_placement reads them
    back into the same name (the round trip both directions of the terms take)."""
    from autofit.testing import tiny_sdxl

    monkeypatch.setenv("AUTOFIT_OFFLOAD_DIR", str(tmp_path))
    pipe = tiny_sdxl()
    place(pipe, Plan(name), torch.device("cpu"))
    try:
        assert _diffusers.detect_placement(pipe) == name
        assert _diffusers.placement_intact(pipe, name)
    finally:
        tear_down(pipe)
    assert _diffusers.detect_placement(pipe) is None
