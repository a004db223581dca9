"""Docs and packaging that agree with the code."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from autofit.planning.ladder import LADDERS

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
    """The README's first install command works today (`pip install .` in a clone: the
    distribution is not on PyPI yet); the published name, pyproject's (not the unrelated
    `autofit` on PyPI), is only ever offered "once released"."""
    name = _project()["name"]
    assert name != "autofit"
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:30])
    commands = re.findall(r"^(pip install \S+)", first_screen, re.M)
    assert commands and commands[0] == "pip install .", commands
    assert re.search(rf"once released: pip install {re.escape(name)}\b", first_screen)
    for line in readme.splitlines():  # the published name only with "once released"
        if re.search(rf"pip install '?{re.escape(name)}", line):
            assert "once released" in line, line
    assert "pip install 'autofit[" not in readme


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
    assert importers <= {"tiny.py"}, importers


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


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def test_every_path_the_docs_name_exists():
    """Each repository path in backticks or a link (benchmarks/x.py, docs/x.md, tests/x.py,
    examples/x.py, src/...) exists; so does every `*.md` named bare (no gpu-facts.md)."""
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        names = _code_spans(text) + re.findall(r"\]\(([^)#\s]+)", text)
        for name in names:
            name = name.split()[0].rstrip(".,:;")
            if re.fullmatch(r"(benchmarks|docs|tests|examples|src)/[\w./-]+", name):
                if not (ROOT / name).exists():
                    missing.append(f"{doc.name}: {name}")
            elif re.fullmatch(r"[\w.-]+\.md", name) and not (doc.parent / name).exists() \
                    and not (ROOT / name).exists() and not (ROOT / "docs" / name).exists():
                missing.append(f"{doc.name}: {name}")
        missing += [f"{doc.name}: {m}" for m in re.findall(r"[\w-]*gpu-facts[\w.]*", text)]
    assert not missing, missing


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


_CGROUP_FILES = {"memory.current", "memory.stat", "memory.max", "memory.usage_in_bytes", "memory.limit_in_bytes"}


def test_every_module_and_symbol_the_docs_name_exists():
    """`autofit.x`, `autofit.x.y` and `x.py` modules, and `module.symbol` of autofit's modules
    (`stages.split_call`), named in the docs, import and resolve. Event names
    (`autofit.escalate`) are checked against the code by the logging test."""
    events = _emitted_events()
    # a module named bare (`cost.GIB`) is found in whichever room holds it
    modules = {p.stem: ".".join(p.relative_to(SRC.parent).with_suffix("").parts)  # shallowest wins: `plan.X`
               for p in sorted(SRC.rglob("*.py"), key=lambda p: -len(p.parts)) if p.stem != "__init__"}
    modules |= {p.name: ".".join(p.relative_to(SRC.parent).parts) for p in SRC.rglob("*") if p.is_dir()
                and (p / "__init__.py").exists()}
    bad = []
    for doc in DOCS:
        for span in _code_spans(doc.read_text()):
            for dotted in re.findall(r"(?<![\w.])(autofit(?:\.\w+)+)", span):
                if dotted.split(".")[1] in events or dotted.split(".")[1] in {"cache_record_ignored"}:
                    continue
                if not _resolves(dotted.split("(")[0]):
                    bad.append(f"{doc.name}: {dotted}")
            m = re.fullmatch(r"([a-z_]+)\.([A-Za-z_]\w*)(\(.*\))?", span)
            if m and m.group(2) == "py":  # a file: autofit's module, a benchmark, a test, an example
                if not any(folder.exists() for folder in (*SRC.rglob(span), ROOT / "benchmarks" / span,
                                                          ROOT / "tests" / span, ROOT / "examples" / span)):
                    bad.append(f"{doc.name}: {span}")
                continue
            # (`proxy.to(...)` and `demo.png` name a proxy object and a file, not the modules)
            if span in _CGROUP_FILES:
                continue
            if m and m.group(1) in (set(modules) | {"stages"}) - {"proxy", "demo", "vae"}:  # `vae.decode`: the component
                if not _resolves(f"{modules.get(m.group(1), 'autofit.stages')}.{m.group(2)}"):
                    bad.append(f"{doc.name}: {span}")
    assert not bad, bad


def test_every_cli_flag_the_docs_name_exists():
    """Each `autofit <command> ... --flag` in the docs is a flag of that command."""
    from autofit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for line in [*re.findall(r"^autofit .*$", text, re.M), *_code_spans(text)]:
            m = re.match(r"\s*autofit\s+(-\S+\s+)*([a-z]+)\b(.*)", line)
            if not m or m.group(2) not in flags:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(3).split("#")[0]):
                if flag not in flags[m.group(2)]:
                    bad.append(f"{doc.name}: autofit {m.group(2)} {flag}")
    assert not bad, bad


def test_the_copy_and_pickle_errors_point_at_readme_sections_that_exist():
    """The proxy's copy/pickle errors name README sections; each is a heading there."""
    text = (SRC / "proxy.py").read_text()
    sections = re.findall(r"README, '([^']+)'", text)
    assert sections
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M))
    assert set(sections) <= headings, set(sections) - headings


def test_every_rung_has_a_row_in_the_recipes_table():
    """docs/recipes.md maps every rung (and `device`) to its diffusers call and its cost; the
    `plan=` error points at that section."""
    from autofit.proxy import valid_plan_names
    from autofit.planning.rungs import RUNGS

    text = (ROOT / "docs" / "recipes.md").read_text()
    title = "Rungs and the diffusers calls they stand for"
    assert f"## {title}" in text and title in valid_plan_names()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    named = {n.split(":")[0] for row in rows for n in re.findall(r"`([a-z0-9_:N]+)`", row.split("|")[1])}
    assert {"device", *RUNGS} <= named, {"device", *RUNGS} - named


def test_the_readme_speed_policy_example_is_what_the_planner_picks():
    """The README's `policy="speed"` at 4 GiB example names what the planner picks for the
    SDXL-sized footprint (it once said nf4; the planner moved on)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from footprints import SDXL

    from autofit.planning.context import DEFAULT_PAGEABLE_GBPS, DEFAULT_PINNED_GBPS, Machine, Workload, context
    from autofit.planning.planner import rank

    machine = Machine(4 * 2**30, 64 * 2**30, "cuda", DEFAULT_PINNED_GBPS, DEFAULT_PAGEABLE_GBPS, quant_missing=None)
    fits = [c for c in rank(context(SDXL, machine, Workload(height=1024, width=1024, steps=30), policy="speed"))
            if c.fits]
    readme = " ".join((ROOT / "README.md").read_text().split())
    claim = readme[readme.index('under `policy="speed"`'):][:400]
    assert " + ".join(f"`{n}`" for n in fits[0].names) in claim, (fits[0].names, claim)
