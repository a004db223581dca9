"""mutmut on one decision module, with the tests that exercise it: the per-module score of
docs/testing.md.

    python benchmarks/mutmut_module.py oom            # mutate src/autofit/engine/oom.py only
    python benchmarks/mutmut_module.py cache --max-children 1 --workdir /tmp/mut-cache

The sources, tests and pyproject.toml are copied to a scratch folder (the working tree and its
``mutants/`` are never touched) whose ``[tool.mutmut]`` names that one module and its test
selection from ``SELECTIONS`` below; mutmut runs there with ``OMP_NUM_THREADS=1`` and
``PYTHONPATH`` on the copy's ``src`` (tests that start a subprocess import the copy, not whatever
the environment's editable install points at). It prints mutmut's counts (``mutmut
export-cicd-stats``) and every mutant that was not killed; ``mutmut show <name>`` in the scratch
folder shows one. A rerun with the same ``--workdir`` keeps mutmut's earlier results but tests
the earlier survivors again (after a test was added to kill them).

The selections are the fast tests of each module: the pure ones, the ``tests/test_mutants_*.py``
written to kill mutmut's survivors, and the few pipeline tests that pin a decision. mutmut runs,
for each mutant, only the selected tests that reach the function it changed, fastest first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_D = "tests/test_decisions.py::"
_B = "tests/test_batch.py::"
_C = "tests/test_cache_and_preflight.py::"

# module -> (the file mutated, the tests run against its mutants)
SELECTIONS: dict[str, tuple[str, list[str]]] = {
    "oom": ("src/autofit/engine/oom.py", ["tests/test_mutants_oom.py", "tests/test_oom_classify.py", "tests/test_decisions.py"]),
    "relax": ("src/autofit/engine/relax.py", [
        "tests/test_mutants_relax.py", "tests/test_both_ways_pure.py",
        _D + "test_a_step_down_that_held_a_whole_call_resets_the_wait"]),
    "cache": ("src/autofit/facts/cache.py", [
        "tests/test_mutants_cache.py", "tests/test_cache_hardening.py",
        _D + "test_a_record_whose_running_field_is_not_a_list_of_rung_names_is_ignored",
        _D + "test_a_process_killed_mid_write_never_leaves_a_torn_record",
        _C + "test_put_get_roundtrip", _C + "test_concurrent_writers_never_leave_a_torn_file",
        _C + "test_updates_from_many_writers_are_merged_not_lost",
        _C + "test_update_still_writes_where_the_filesystem_has_no_flock",
        _C + "test_a_success_keeps_what_another_process_found_broken"]),
    "batch_items": ("src/autofit/batch/items.py", [
        "tests/test_mutants_batch_items.py", _B + "test_bad_prompt_files_get_clear_errors",
        _B + "test_excel_csv_with_a_bom_and_plain_text_prompt_files", _B + "test_bad_values_are_refused_with_their_line",
        "tests/test_batch_hardening.py::test_read_items_names_the_duplicate_apart",
        _D + "test_ids_that_differ_only_in_case_are_one_file_and_collide"]),
    "rungs": ("src/autofit/planning/rungs.py", [
        "tests/test_rung_rows.py", "tests/test_planner.py", "tests/test_decisions.py",
        "tests/test_disk_offload.py"]),
}


def _scoped_pyproject(text: str, module_path: str, tests: list[str]) -> str:
    section = ("[tool.mutmut]\n"
               'source_paths = ["src"]\n'
               f"only_mutate = {json.dumps([module_path])}\n"
               f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
               'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
               'process_isolation = "forkserver"\n\n')
    out, n = re.subn(r"^\[tool\.mutmut\].*?(?=^\[)", lambda m: section, text, count=1, flags=re.S | re.M)
    if n != 1:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section followed by another")
    return out


def _retest_survivors(work: Path) -> None:
    """mutmut keeps a survivor's verdict even when the tests changed: forget the verdicts of the
    survivors (exit code 0) of an earlier run in ``work``, so they run against the tests as they are."""
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        for name, code in codes.items():
            if code == 0:
                codes[name] = None
        meta.write_text(json.dumps(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", choices=sorted(SELECTIONS))
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="the scratch folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    module_path, tests = SELECTIONS[args.module]
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"mutmut-{args.module}-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "pyproject.toml").write_text(_scoped_pyproject((REPO / "pyproject.toml").read_text(), module_path, tests))
    _retest_survivors(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work / "src")}
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"mutmut on {module_path} in {work}, tests: {' '.join(tests)}", flush=True)
    subprocess.run([*mutmut, "run", "--max-children", str(args.max_children)], cwd=work, env=env,
                   stdout=subprocess.DEVNULL, check=False)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, stdout=subprocess.DEVNULL, check=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    print(json.dumps(stats))
    subprocess.run([*mutmut, "results"], cwd=work, env=env, check=False)  # the mutants not killed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
