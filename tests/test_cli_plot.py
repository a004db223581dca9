"""`autofit plan --plot FILE` (issue 25): predicted seconds against the VRAM budget, one line per plan
family, as an SVG drawn without any new dependency; checked by parsing the file the real command
writes, against the planner's own ranking at the swept budgets."""

import dataclasses
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from autofit.cli import plot
from autofit.facts.footprint import measure_folder
from autofit.planning.context import Machine, Workload, context
from autofit.planning.planner import rank
from autofit.strategies.quantize import missing
from autofit.testing import tiny_sdxl
from autofit.units import GIB

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
# A machine the command is told all of, so that this test can describe the same one.
MACHINE = ["--vram", "0.5GiB", "--ram", "16GiB", "--pinned", "16GiB", "--disk", "100GiB"]
WORKLOAD = ["--height", "1024", "--width", "1024"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "autofit.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})


def _families(path):
    """family -> (budgets in GiB, seconds, pixel points) as the SVG states them."""
    out = {}
    for g in ET.parse(path).getroot().iter(f"{SVG}g"):
        if g.get("class") == "family":
            line = g.find(f"{SVG}polyline")
            pixels = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            out[g.get("data-family")] = ([float(v) for v in line.get("data-budgets-gib").split()],
                                         [float(v) for v in line.get("data-seconds").split()], pixels)
    return out


def _reference(budget, fp):
    """The fastest fitting plan of each family at ``budget``, straight from the planner."""
    machine = Machine(budget, 16 * GIB, "cuda", 20.0, 20.0, quant_missing=missing("cuda"),
                      pinned_available_bytes=16 * GIB, disk_available_bytes=100 * GIB)
    best = {}
    for c in rank(context(fp, machine, Workload(height=1024, width=1024), policy="quality")):
        if c.fits:
            best[c.plan.family] = min(best.get(c.plan.family, math.inf), c.seconds)
    return best


def test_plot_draws_each_family_as_the_planner_ranks_it(sdxl_dir, tmp_path):
    """The SVG has one polyline per plan family; its points are the planner's fastest fitting plan of
    that family at each swept budget (checked at three budgets against rank itself); seconds never
    rise with the budget; the pixels follow the data (x right with the budget, y down with the
    seconds); the budget now is marked; --json names the file."""
    out = tmp_path / "sub" / "budget.svg"
    proc = _cli("plan", sdxl_dir, *MACHINE, *WORKLOAD, "--plot", out, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["plot"] == str(out)
    drawn = _families(out)
    _, fp = measure_folder(sdxl_dir)
    biggest = max(b for budgets, _, _ in drawn.values() for b in budgets)
    assert set(drawn) == set(_reference(int(biggest * GIB), fp)) and {"device", "sequential"} <= set(drawn)
    for family, (budgets, seconds, pixels) in drawn.items():
        assert len(budgets) == len(seconds) == len(pixels) >= 2, family
        assert all(a < b for a, b in zip(budgets, budgets[1:])), family
        assert all(a >= b for a, b in zip(seconds, seconds[1:])), (family, seconds)  # more VRAM is never slower
        assert all(p[0] < q[0] and p[1] <= q[1] for p, q in zip(pixels, pixels[1:])), family
    # The sweep's budgets are whole bytes: rebuild them from the same machine and compare with rank.
    machine = Machine(GIB // 2, 16 * GIB, "cuda", 20.0, 20.0, quant_missing=missing("cuda"),
                      pinned_available_bytes=16 * GIB, disk_available_bytes=100 * GIB)
    lines = plot.sweep(fp, machine, Workload(height=1024, width=1024), "quality")
    assert set(lines) == set(drawn)
    for family, points in lines.items():
        assert [s for _, s in points] == pytest.approx(drawn[family][1], rel=1e-5)
    budgets = sorted({b for points in lines.values() for b, _ in points})
    for budget in (budgets[0], budgets[len(budgets) // 2], budgets[-1]):
        expected = _reference(budget, fp)
        assert {f: dict(p)[budget] for f, p in lines.items() if budget in dict(p)} == expected
    now = next(g for g in ET.parse(out).getroot().iter(f"{SVG}g") if g.get("class") == "now")
    assert "budget now 0.5 GiB" in "".join(now.itertext())


def test_plot_text_output_says_where_the_plot_is(sdxl_dir, tmp_path):
    out = tmp_path / "p.svg"
    proc = _cli("plan", sdxl_dir, "--vram", "1GiB", "--height", "64", "--width", "64", "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert f"plot of seconds against the VRAM budget: {out}" in proc.stdout and _families(out)


@pytest.mark.parametrize("name, says", [("p.pdf", "is not a format"), ("p", "no extension is not a format")])
def test_plot_in_a_format_it_cannot_draw_is_one_line_before_anything_is_read(sdxl_dir, tmp_path, name, says):
    proc = _cli("plan", sdxl_dir, "--vram", "1GiB", "--plot", tmp_path / name, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr and ".svg" in proc.stderr


def test_a_png_plot_needs_matplotlib(sdxl_dir, tmp_path):
    """Without matplotlib, a .png is refused with what to do; with it, a PNG is written."""
    out = tmp_path / "p.png"
    proc = _cli("plan", sdxl_dir, "--vram", "1GiB", "--height", "64", "--width", "64", "--plot", out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert proc.returncode == 2 and "pip install matplotlib" in proc.stderr and not out.exists()
    else:
        assert proc.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svg_of_hand_made_lines_is_well_formed():
    """The drawing alone: a family that fits only from some budget on starts there; labels are
    escaped; a linear axis is used when the seconds span less than a decade."""
    lines = {"a<b": [(GIB, 2.0), (2 * GIB, 1.5)], "sequential": [(2 * GIB, 3.0)]}
    root = ET.fromstring(plot.svg(lines, now=GIB, title="x & y"))
    drawn = {g.get("data-family"): g for g in root.iter(f"{SVG}g") if g.get("class") == "family"}
    assert set(drawn) == {"a<b", "sequential"}
    assert drawn["sequential"].find(f"{SVG}polyline").get("data-budgets-gib") == "2"
    assert "log scale" not in "".join(root.itertext())
