"""Docs and packaging that agree with the code."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from autofit.ladder import LADDERS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "autofit"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _emitted_events() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        names |= set(re.findall(r'\bemit\(\s*"([a-z0-9_]+)"', path.read_text()))
    return names


def test_every_emitted_event_is_documented():
    """Each event name emitted in src appears in docs/logging.md."""
    events = _emitted_events()
    assert {"wrapped", "escalate", "batch_done", "unpinned"} <= events  # the scan finds them
    doc = (ROOT / "docs" / "logging.md").read_text()
    missing = sorted(e for e in events if f"autofit.{e}`" not in doc)
    assert not missing, f"undocumented events: {missing}"


def test_readme_first_screen_installs_this_distribution():
    """The README's first screen shows `pip install <name>` with pyproject's name, which is not
    the unrelated `autofit` on PyPI."""
    name = _project()["name"]
    assert name != "autofit"
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert re.search(rf"^pip install {re.escape(name)}\b", first_screen, re.M)
    assert "pip install 'autofit[" not in (ROOT / "README.md").read_text()


def test_dependencies_match_imports():
    """tqdm is declared; transformers is not required; bitsandbytes is not in the test extra."""
    project = _project()
    deps = " ".join(project["dependencies"])
    assert "tqdm" in deps and "transformers" not in deps
    extras = project["optional-dependencies"]
    assert not any("bitsandbytes" in d for d in extras["test"])
    assert any("transformers" in d for d in extras["testing"])
    importers = {p.name for p in SRC.rglob("*.py") if re.search(r"^\s*from transformers|^\s*import transformers",
                                                                  p.read_text(), re.M)}
    assert importers <= {"_tiny.py"}, importers


def test_tiny_pipelines_say_how_to_get_transformers(monkeypatch):
    """Without transformers, autofit.testing's builders say which extra to install."""
    from autofit.testing import tiny_sdxl

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"autofit-diffusers\[testing\]"):
        tiny_sdxl()


def test_examples_and_docs_use_dtype_not_torch_dtype():
    """Examples and docs load with `dtype=` (`torch_dtype` is deprecated in diffusers)."""
    files = [*(ROOT / "examples").glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    offenders = [f.name for f in files if "torch_dtype=" in f.read_text()]
    assert not offenders, offenders


def test_architecture_ladder_drawing_matches_the_code():
    """Each column of the ladder drawing in docs/architecture.md lists LADDERS[stage] in order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("## The ladder"):]
    block = block[block.index("```") + 3:]
    lines = block[:block.index(" * only when")].splitlines()
    header = next(line for line in lines if "load" in line and "decode" in line)
    starts = [header.index(stage) for stage in LADDERS]
    bounds = [*starts[1:], 10**6]
    for stage, start, stop in zip(LADDERS, starts, bounds):
        column = []
        for line in lines:
            cell = line[start:stop].split()
            if cell and re.fullmatch(r"[a-z0-9_]+\*?", cell[0]) and cell[0] != stage:
                column.append(cell[0].rstrip("*"))
        assert tuple(column) == LADDERS[stage], (stage, column)
