"""The hand-made mutants of issue 26, re-applied one at a time: each must be killed by its test.

    python benchmarks/mutate.py            # every mutant, with the test that must kill it
    python benchmarks/mutate.py cache_      # those whose name starts with a prefix

Each mutant is a small edit of one decision in ``src/autofit`` that the suite once accepted. For
each one the sources are copied to a scratch folder, the edit is applied there (the working tree
is never touched), and the named test of ``tests/test_decisions.py`` is run against the copy
(``PYTHONPATH`` puts it first). A mutant whose test still passes *survived*: the script lists it
and exits 1. An edit that no longer applies (the code moved) is reported as stale, exit 2: update
the table. The real sources must pass every test first, or nothing is proved.

``make mutate`` runs this (a minute or two) before mutmut's own, much longer, run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = "tests/test_decisions.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/autofit
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text); each old text occurs once
    test: str  # the test in tests/test_decisions.py that must fail on it


MUTANTS = (
    Mutant("switch_no_rollback", "engine/placement.py",
           (("                    self._restore(previous, target, exc)\n", "                    pass\n"),),
           "test_a_switch_that_fails_leaves_the_previous_plan_placed_and_the_pipeline_usable"),
    Mutant("switch_rollback_not_applied", "engine/placement.py",
           (("            self._apply(None, previous, None)\n            self._applied = previous\n",
             "            self._apply(None, previous, None)\n"),),
           "test_a_switch_that_fails_leaves_the_previous_plan_placed_and_the_pipeline_usable"),
    Mutant("oom_any_exception", "engine/oom.py",
           (("    elif isinstance(exc, RuntimeError):", "    elif isinstance(exc, Exception):"),),
           "test_an_exception_that_is_not_a_runtime_error_is_never_an_oom_whatever_it_says"),
    Mutant("oom_quotes_12_chars", "engine/oom.py",
           (("lines[0] in str(outer)", "lines[0][:12] in str(outer)"),),
           "test_an_error_raised_while_handling_an_oom_counts_only_if_it_quotes_the_whole_line"),
    Mutant("relax_wait_not_reset", "engine/relax.py",
           (("keep it\n            self.wait = self.first_wait\n", "keep it\n"),),
           "test_a_step_down_that_held_a_whole_call_resets_the_wait"),
    Mutant("recovery_backoff_first_delay", "engine/state.py",
           (("LAST_RUNG_BACKOFF[self._backoffs] if", "LAST_RUNG_BACKOFF[0] if"),),
           "test_the_last_rung_backoff_waits_longer_each_time_then_gives_up"),
    Mutant("recovery_glue_as_denoise", "engine/runtime.py",
           (("self._choice, self._wrappers.glue_stage(),", 'self._choice, "denoise",'),),
           "test_an_oom_in_glue_before_the_decode_is_blamed_on_the_decode"),
    Mutant("recovery_origin_lost", "engine/recovery.py",
           (("(stage,) if stage == origin else (stage, origin)", "(stage,)"),),
           "test_a_load_oom_while_placing_the_next_rung_goes_on_up_the_failing_stages_ladder"),
    Mutant("rungs_split_batch_of_one", "planning/rungs.py",
           (("ctx.workload.batch > 1", "ctx.workload.batch >= 1"),),
           "test_split_batch_is_refused_at_batch_one"),
    Mutant("rungs_disk_unknown_is_enough", "planning/rungs.py",
           (('        return "free disk space at the offload folder is not known"', "        return None"),),
           "test_group_disk_is_refused_when_free_disk_space_is_unknown"),
    Mutant("rungs_host_ram_all_of_it", "planning/rungs.py",
           (("if held > cost.HOST_SHARE * m.host_available_bytes:", "if held > m.host_available_bytes:"),),
           "test_host_ram_need_is_compared_against_the_share_the_rule_allows"),
    Mutant("cache_running_unchecked", "facts/cache.py",
           (('    if "running" in record and not _str_list(record["running"]):\n'
             '        return "running is not a list of rung names"\n', ""),),
           "test_a_record_whose_running_field_is_not_a_list_of_rung_names_is_ignored"),
    Mutant("cache_written_in_place", "facts/cache.py",
           (('tmp = f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"', "tmp = path.name"),
            ("os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW", "os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW")),
           "test_a_process_killed_mid_write_never_leaves_a_torn_record"),
    Mutant("batch_key_without_seed", "batch/runner.py",
           (('"prompt": item.prompt, "seed": item.seed, "settings"', '"prompt": item.prompt, "settings"'),),
           "test_a_changed_seed_remakes_exactly_that_image"),
    Mutant("batch_finished_without_files", "batch/runner.py",
           (("isinstance(f, str) and (out_dir / f).is_file() for f", "isinstance(f, str) for f"),),
           "test_a_finished_item_whose_image_is_gone_is_made_again"),
    Mutant("batch_items_ids_case_sensitive", "batch/items.py",
           (("first = owner.get(item_id.casefold())", "first = owner.get(item_id)"),),
           "test_ids_that_differ_only_in_case_are_one_file_and_collide"),
    Mutant("batch_ids_in_code_case_sensitive", "batch/runner.py",
           (("elif item.id.casefold() in owner:", "elif item.id in owner:"),),
           "test_ids_that_differ_only_in_case_are_one_file_and_collide"),
    Mutant("batch_names_case_sensitive", "batch/runner.py",
           (("taken = [(n, owner[n.casefold()]) for n in names if n.casefold() in owner]",
             "taken = [(n, owner[n]) for n in names if n in owner]"),),
           "test_ids_that_differ_only_in_case_are_one_file_and_collide"),
    Mutant("batch_item_catch_narrowed", "batch/runner.py",
           (("    except Exception as exc:  # an error of this item", "    except (TypeError, ValueError) as exc:  #"),),
           "test_an_unexpected_error_of_one_item_is_recorded_and_the_job_goes_on"),
    Mutant("batch_torn_line_unrepaired", "batch/runner.py",
           (("        _end_torn_line(manifest)\n", "        pass\n"),),
           "test_a_torn_manifest_line_is_repaired_so_the_next_record_is_not_lost"),
)


def _pytest(src: Path, tests: list[str]) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a shared or busy machine torch's spinning threads make the tiny
    # pipelines a hundred times slower.
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *[f"{TESTS}::{t}" for t in tests]],
                          cwd=REPO, env=env, capture_output=True, text=True)


def _apply(mutant: Mutant, src: Path) -> str | None:
    """Apply the mutant to the copy at ``src``; the reason it cannot be applied, or None."""
    path = src / "autofit" / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return f"{mutant.file}: {old.strip()[:60]!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or any(m.name.startswith(p) for p in argv)]
    with tempfile.TemporaryDirectory(prefix="autofit-mutants-") as scratch:
        pristine = Path(scratch) / "pristine"
        shutil.copytree(REPO / "src", pristine, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        base = _pytest(pristine, sorted({m.test for m in chosen}))
        if base.returncode != 0:
            print(base.stdout[-3000:], base.stderr[-2000:])
            print("the real sources fail these tests: fix that first")
            return 2
        survived, stale = [], []
        for m in chosen:
            copy = Path(scratch) / m.name
            shutil.copytree(pristine, copy)
            why = _apply(m, copy)
            if why:
                stale.append(m.name)
                print(f"STALE     {m.name}: {why}")
                continue
            t0 = time.perf_counter()
            done = _pytest(copy, [m.test])
            killed = done.returncode == 1  # a test failed (2+: an error collecting or running pytest)
            if not killed:
                survived.append(m.name)
            shown = "killed  " if killed else f"SURVIVED (pytest exit {done.returncode})"
            print(f"{shown}  {m.name:34} {time.perf_counter() - t0:5.1f} s  {m.test}", flush=True)
            if killed:  # what the test saw: the first line of the failure
                error = next((ln for ln in done.stdout.splitlines() if ln.startswith("E ")), "")
                print(f"          {error[:150]}")
            shutil.rmtree(copy)
    print(f"{len(chosen) - len(survived) - len(stale)}/{len(chosen)} hand-made mutants killed"
          + (f"; survived: {', '.join(survived)}" if survived else "") + (f"; stale: {', '.join(stale)}" if stale else ""))
    return 1 if survived else 2 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
