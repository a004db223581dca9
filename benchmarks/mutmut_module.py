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
import random
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
        "tests/test_mutants_rungs.py", "tests/test_rung_rows.py", "tests/test_planner.py", "tests/test_decisions.py",
        "tests/test_disk_offload.py"]),
    "recovery": ("src/autofit/engine/recovery.py", [
        "tests/test_mutants_recovery.py", "tests/test_recovery.py", "tests/test_decisions.py",
        "tests/test_engine_objects.py", "tests/test_oom_handlers.py", "tests/test_both_ways.py",
        "tests/test_one_way.py", "tests/test_checkpoint_undo.py"]),
    "placement": ("src/autofit/engine/placement.py", [
        "tests/test_mutants_placement.py", "tests/test_switch.py", "tests/test_one_way.py",
        "tests/test_checkpoint_undo.py", "tests/test_decisions.py", "tests/test_engine_objects.py"]),
    "preflight": ("src/autofit/engine/preflight.py", [
        "tests/test_mutants_preflight.py", "tests/test_cache_and_preflight.py", "tests/test_decisions.py",
        "tests/test_workload.py"]),
    "batch_runner": ("src/autofit/batch/runner.py", [
        "tests/test_mutants_batch_runner.py", "tests/test_batch.py", "tests/test_batch_hardening.py",
        "tests/test_decisions.py"]),
}


# Mutants judged equivalent (no observable change), by module; docs/testing.md says why for each.
# mutmut numbers a function's mutants in order, so an edit of that function renumbers them: after
# one, check the survivors again (``mutmut show <name>``) and update this table and the docs.
EQUIVALENT: dict[str, set[str]] = {
    "oom": {"x_free_memory__mutmut_4", "x_free_memory__mutmut_5"},
    "relax": {"xǁRelaxationǁplan_chosen__mutmut_3"},
    "cache": {"xǁPlanCacheǁentries__mutmut_2", "xǁPlanCacheǁ_read__mutmut_4", "xǁPlanCacheǁ_path__mutmut_7",
              "xǁPlanCacheǁupdate__mutmut_32", "xǁPlanCacheǁupdate__mutmut_39", "xǁPlanCacheǁupdate__mutmut_40",
              "xǁPlanCacheǁupdate__mutmut_15", "x__open_regular__mutmut_9", "xǁPlanCacheǁput__mutmut_23",
              "x__open_regular__mutmut_1", "xǁPlanCacheǁput__mutmut_49", "xǁPlanCacheǁput__mutmut_53",
              "xǁPlanCacheǁput__mutmut_55", "x__remove_stale_temporaries__mutmut_9",
              "x__remove_stale_temporaries__mutmut_24", "x__remove_stale_temporaries__mutmut_28",
              "xǁPlanCacheǁget__mutmut_7", "xǁPlanCacheǁget__mutmut_13", "xǁPlanCacheǁ_read__mutmut_27"},
    "batch_items": {"x_id_problem__mutmut_21", "x__rows__mutmut_4", "x__rows__mutmut_31"},
    "rungs": {"x_sized__mutmut_27", "x_step__mutmut_6", "x_steps__mutmut_12"},
    "recovery": {"xǁRecoveryǁ_exhausted__mutmut_6", "xǁRecoveryǁ_exhausted__mutmut_13", "x_climb__mutmut_2",
                 "x_climb__mutmut_24", "xǁRecoveryǁ_climb__mutmut_7", "xǁRecoveryǁ_climb__mutmut_41",
                 "xǁRecoveryǁ_judge__mutmut_3", "xǁRecoveryǁ_take__mutmut_156", "xǁRecoveryǁroll_back__mutmut_31",
                 "xǁRecoveryǁroll_back__mutmut_40", "xǁRecoveryǁroll_back__mutmut_58",
                 "xǁRecoveryǁroll_back__mutmut_60", "xǁRecoveryǁon_oom__mutmut_91", "xǁRecoveryǁon_oom__mutmut_92",
                 "xǁRecoveryǁon_oom__mutmut_93", "xǁRecoveryǁon_oom__mutmut_96", "xǁRecoveryǁon_oom__mutmut_98",
                 "xǁRecoveryǁon_oom__mutmut_100"},
    "placement": {"xǁPlacementǁ_restore__mutmut_28", "xǁPlacementǁ_restore__mutmut_34", "xǁPlacementǁ_apply__mutmut_23",
                  "xǁPlacementǁ__init____mutmut_47"},
    "preflight": {"x_activation_ceiling__mutmut_11", "x_activation_ceiling__mutmut_14", "x__stale__mutmut_14",
                  "x__stale__mutmut_22", "x__stale__mutmut_32", "xǁPreflightǁ_pick__mutmut_2", "xǁPreflightǁ_pick__mutmut_3",
                  "x_stored_activations__mutmut_18", "x_stored_activations__mutmut_25",
                  "xǁPreflightǁpredicted_peaks__mutmut_9", "xǁPreflightǁpredicted_peaks__mutmut_11",
                  "xǁPreflightǁturn_off__mutmut_1", "xǁPreflightǁ_pick__mutmut_60", "xǁPreflightǁ_pick__mutmut_61",
                  "xǁPreflightǁ_pick__mutmut_68", "xǁPreflightǁ_pick__mutmut_69", "xǁPreflightǁ_pick__mutmut_116",
                  "xǁPreflightǁ_pick__mutmut_124", "x__stored_plan__mutmut_9", "x__stored_plan__mutmut_15",
                  "x__untiled_until_measured__mutmut_14", "x__untiled_until_measured__mutmut_19"},
    "batch_runner": {"x__model_of__mutmut_4", "x__model_of__mutmut_7", "x__model_of__mutmut_16",
                     "x__clean_temporaries__mutmut_2", "x__clean_temporaries__mutmut_12",
                     "x__clean_temporaries__mutmut_13", "x__clean_temporaries__mutmut_14", "x_run_batch__mutmut_15",
                     "x_run_batch__mutmut_92", "x_run_batch__mutmut_93", "x_run_batch__mutmut_100",
                     "x_run_batch__mutmut_101", "x_run_batch__mutmut_117", "x__failed__mutmut_5", "x__failed__mutmut_8",
                     "x__failed__mutmut_12", "x__failed__mutmut_15", "x__after__mutmut_8", "x__record__mutmut_8",
                     "x__record__mutmut_16", "x__record__mutmut_17", "x__record__mutmut_18",
                     "x__end_torn_line__mutmut_17", "x__end_torn_line__mutmut_18", "x_pending__mutmut_16",
                     "x__output_folder__mutmut_13"},
}


def _scoped_pyproject(text: str, module_path: str, tests: list[str]) -> str:
    section = ("[tool.mutmut]\n"
               'source_paths = ["src"]\n'
               'also_copy = ["docs"]\n'  # tests read the docs' tables as their reference
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
    survivors (and of the mutants no test reached) of an earlier run in ``work``, so they run
    against the tests as they are."""
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        for name, code in codes.items():
            if code in (0, 5, 33):  # survived, or no selected test reached it (tests may have been added)
                codes[name] = None
        meta.write_text(json.dumps(data))


def score(module: str, work: Path) -> dict[str, object]:
    """mutmut's verdicts in ``work`` for ``module``, and the score: (killed + timed out) /
    (all - equivalent). Survivors named in ``EQUIVALENT`` are the equivalent ones."""
    codes: dict[str, int | None] = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    short = {name.rsplit(".", 1)[-1]: code for name, code in codes.items()}
    # mutmut's exit codes (mutmut.stats.status_by_exit_code): 1, 3 killed; 0 survived; None not run.
    killed = sum(code in (1, 3) for code in short.values())
    timeout = sum(code in (36, -24, 24, 152, 255) for code in short.values())  # a mutant that loops
    survivors = sorted(n for n, code in short.items() if code == 0)
    equivalent = [n for n in survivors if n in EQUIVALENT[module]]
    unchecked = sum(code is None for code in short.values())
    other = len(short) - killed - timeout - len(survivors) - unchecked  # no tests, suspicious, segfault
    denominator = len(short) - unchecked - len(equivalent)  # a sampled run counts the mutants it ran
    return {"module": module, "mutants": len(short), "not_checked": unchecked, "other": other, "killed": killed,
            "timeout": timeout, "survived": len(survivors), "equivalent": len(equivalent),
            "score": round(100 * (killed + timeout) / denominator, 1) if denominator else None,
            "left": [n for n in survivors if n not in EQUIVALENT[module]]}


def _table_row(module: str, s: dict[str, object]) -> str:
    path = SELECTIONS[module][0]
    ran = s['mutants'] - s['not_checked']
    return (f"| `{path}` | {s['mutants']} | {ran} | {s['killed']} | {s['timeout']} | {s['survived']} | "
            f"{s['equivalent']} | {s['score']} % |")


def _sync_unmutated(work: Path, module_path: str) -> None:
    """mutmut copies a source file into ``mutants/`` once and rewrites only the mutated module
    after that: on a rerun in the same folder the other modules (and the tests and docs) would
    be those of the first run. Bring every file but the mutated module up to date."""
    mutants = work / "mutants"
    if not mutants.is_dir():
        return  # the first run copies everything
    for name in ("src", "tests", "docs"):
        for path in (work / name).rglob("*"):
            rel = path.relative_to(work)
            if not path.is_file() or rel.as_posix() == module_path or "__pycache__" in rel.parts:
                continue
            target = mutants / rel
            if not target.is_file() or target.read_bytes() != path.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def _configure(work: Path, module_path: str, tests: list[str]) -> None:
    """Point mutmut in ``work`` at ``tests``, and let the survivors so far run again against them."""
    (work / "pyproject.toml").write_text(_scoped_pyproject((REPO / "pyproject.toml").read_text(), module_path, tests))
    _sync_unmutated(work, module_path)
    _retest_survivors(work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", choices=[*sorted(SELECTIONS), "all"],
                    help="one module, or all of them in turn (then a table of scores)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="the scratch folder (default: a new temporary one; with 'all', "
                                                 "one sub-folder per module)")
    ap.add_argument("--sample", type=int, default=0,
                    help="run only this many of each module's mutants, drawn at random (the same ones every time): "
                         "a quick estimate; the score then counts the mutants run")
    args = ap.parse_args(argv)
    if args.module == "all":
        base = args.workdir or Path(tempfile.mkdtemp(prefix="mutmut-all-"))
        rows, worst = [], 0
        for module in SELECTIONS:
            rc = main([module, "--max-children", str(args.max_children), "--workdir", str(base / module),
                       "--sample", str(args.sample)])
            worst = max(worst, rc)
            rows.append(_table_row(module, score(module, base / module)))
        print("| module | mutants | run | killed | timeout | survived | equivalent | score |",
              "|---|---|---|---|---|---|---|---|",
              *rows, sep="\n")
        return worst
    module_path, tests = SELECTIONS[args.module]
    # A module's tests/test_mutants_<module>.py exists once a survivor was killed.
    tests = [t for t in tests if (REPO / t.split("::")[0]).exists()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"mutmut-{args.module}-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests", "docs"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work / "src")}
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"mutmut on {module_path} in {work}, tests: {' '.join(tests)}", flush=True)
    names: list[str] = []
    if args.sample:  # generate the mutants (a pattern that names none runs none), then draw some
        _configure(work, module_path, tests)
        dotted = module_path.removeprefix("src/").removesuffix(".py").replace("/", ".")
        subprocess.run([*mutmut, "run", f"{dotted}.no_such_mutant"], cwd=work, env=env, capture_output=True,
                       check=False)
        every = sorted(json.loads(next((work / "mutants").rglob("*.py.meta")).read_text())["exit_code_by_key"])
        names = sorted(random.Random(args.module).sample(every, min(args.sample, len(every))))
    # One selection per workdir: mutmut forgets every verdict when the selection changes. Within
    # it, each mutant runs the selected tests that reach its function, fastest first, up to the
    # first failure: the module's own tests/test_mutants_*.py, quick and aimed, usually kill first.
    _configure(work, module_path, tests)
    run = subprocess.run([*mutmut, "run", "--max-children", str(args.max_children), *names], cwd=work, env=env,
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:  # e.g. the selected tests fail on the unmutated code ("failed to collect stats")
        print(run.stdout[-3000:].replace("\r", "\n"), run.stderr[-3000:], sep="\n", file=sys.stderr)
        return run.returncode
    result = score(args.module, work)
    print(json.dumps({k: v for k, v in result.items() if k != "left"}))
    for name in result["left"]:  # the survivors not judged equivalent: `mutmut show <name>` in work
        print("survived:", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
