"""Batch kill-and-resume check (issue 6): 16 SDXL-sized images at 1024x1024 under an 8 GiB cap;
an uninterrupted run, a run SIGKILLed after the 5th finished image and resumed, and an oracle run
with a fixed plan for seconds per image without recovery.

Every batch runs in a child process (this file with ``--child``), so the kill is a real SIGKILL
of a process in the middle of a job. The parent checks: all 16 images present in both folders,
pixel-identical per item, the kill landed after >= 5 and before 16 finished items, the resume
skipped exactly the finished ones; and reports seconds per image (first image of each child
apart: planning and warm-up), the plan, escalations and peak memory. Exit code 1 if a check fails.

    python benchmarks/batch_resume_check.py --out $OUT/batch_resume.json        # GPU (H100/H200)
    python benchmarks/batch_resume_check.py --tiny --device cpu --out /tmp/brc.json  # CPU smoke path
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB = 2**30
# Words from the tiny tokenizer's vocabulary, so the prompts differ at --tiny too.
SUBJECTS = ("astronaut", "cat", "dog", "horse")
SCENES = ("on the moon", "city night sky", "mountain lake", "sunset painting")


# ---- child: one batch run in its own process ---------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _build(tiny: bool, device: str, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)  # random weights: the same seed in every child gives the same model
    if tiny:
        from autofit.testing import tiny_sdxl

        pipe = tiny_sdxl(seed=seed).to(device)
    else:
        from sized import sdxl_sized

        pipe = sdxl_sized(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _checksum(pipe: Any) -> str:
    """A fingerprint of the random weights (unet and VAE), to show every child built the same model."""
    import torch

    sums = [p.detach().float().sum() for m in (pipe.unet, pipe.vae) for p in m.parameters()]
    total = torch.stack(sums).double().sum().item()
    first = next(pipe.unet.parameters()).detach().flatten()[:4096].float().cpu().numpy().tobytes()
    return f"{total:.6e}:{hashlib.sha1(first).hexdigest()[:12]}"


def _apply_cap(device: str, cap_gib: float) -> float | None:
    import gc

    import torch

    if not device.startswith("cuda"):
        return None  # no per-process cap on the CPU: the smoke path checks the mechanics only
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
    gc.collect()
    torch.cuda.empty_cache()  # blocks cached before the cap would be reused as if there were none
    torch.cuda.reset_peak_memory_stats()
    return round(total / GIB, 2)


def _record_calls(proxy: Any) -> list[dict[str, Any]]:
    """Collect ``last_call`` after every pipeline call: call seconds without the PNG write."""
    runtime = proxy._self_runtime
    inner, calls = runtime.call, []

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = inner(args, kwargs)
        calls.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in runtime.last_call.items()})
        return out

    runtime.call = call
    return calls


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def child_main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    import logging

    import torch

    from autofit import autofit
    from autofit.batch.runner import load_items, run_batch

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    info: dict[str, Any] = {"name": args.child, "pid": os.getpid(), "torch": torch.__version__,
                            "import_s": round(time.perf_counter() - t0, 2)}
    t = time.perf_counter()
    pipe = _build(args.tiny, args.device, args.weight_seed)
    _sync(args.device)
    info.update(build_s=round(time.perf_counter() - t, 2), weights=_checksum(pipe),
                gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                gpu_total_gib=_apply_cap(args.device, args.cap))
    plan = None if args.plan is None else tuple(filter(None, args.plan.split(",")))
    cache: str | bool = False if args.cache == "none" else args.cache
    proxy = autofit(pipe, device=args.device, plan=plan, cache=cache)
    calls = _record_calls(proxy)
    items = load_items(args.items)[: args.limit or None]
    work = Path(args.work)
    # Written before the job starts, so a child killed mid-job still shows which weights it had.
    _write_json(work / f"{args.child}.start.json", info)
    t = time.perf_counter()
    report = run_batch(proxy, items, args.out_dir, progress=False)
    info.update(batch_s=round(time.perf_counter() - t, 2), done=report.done, skipped=report.skipped,
                failed=report.failed, calls=calls, plan=list(proxy.autofit.plan),
                escalations=[(r.stage, r.action, r.scope) for r in proxy.autofit.history])
    if args.device.startswith("cuda"):
        info.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                    peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
    info["child_s"] = round(time.perf_counter() - t0, 2)
    _write_json(work / f"{args.child}.result.json", info)


# ---- parent: orchestration ------------------------------------------------------------------
def write_items(path: Path, steps: int, size: int) -> list[str]:
    """16 prompts (different text, seeds 0..15); SDXL's default guidance."""
    rows = [{"id": f"img{i:02d}", "prompt": f"a photo of an {s} {c}", "seed": i,
             "num_inference_steps": steps, "height": size, "width": size}
            for i, (s, c) in enumerate((s, c) for s in SUBJECTS for c in SCENES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows]


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Keep the caller's PYTHONPATH first; add src/ and benchmarks/ in case they are missing.
    extra = [p for p in (str(HERE.parent / "src"), str(HERE)) if p not in env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH", ""), *extra]))
    return env


def spawn(args: argparse.Namespace, work: Path, name: str, out_dir: Path, *, plan: str | None,
          cache: str, limit: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--out-dir", str(out_dir),
           "--items", str(work / "items.jsonl"), "--device", args.device, "--cap", str(args.cap),
           "--weight-seed", str(args.weight_seed), "--cache", cache, "--limit", str(limit)]
    if plan is not None:
        cmd += ["--plan", plan]
    if args.tiny:
        cmd.append("--tiny")
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed when the child is reaped)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    proc.log = log  # type: ignore[attr-defined]
    return proc


def reap(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Wait for a child with a time limit: a hang must not eat the device budget."""
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    proc.log.close()  # type: ignore[attr-defined]
    return {"rc": proc.returncode, "timed_out": timed_out}


def read_manifest(out_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Manifest records in file order, and the number of lines that are not JSON (torn writes)."""
    path = out_dir / "manifest.jsonl"
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def finished_ids(out_dir: Path) -> set[str]:
    """What run_batch counts as finished: an ``ok`` record whose files exist, unless failed later.
    Written out again on purpose (autofit.batch.runner._finished): the parent stays torch-free and checks
    run_batch against its own reading of the manifest."""
    done: set[str] = set()
    for rec in read_manifest(out_dir)[0]:
        if rec.get("status") == "ok" and all((out_dir / f).is_file() for f in rec.get("files", [])):
            done.add(rec["id"])
        elif rec.get("status") == "failed":
            done.discard(rec["id"])
    return done


def _ok_count(out_dir: Path) -> int:
    return sum(r.get("status") == "ok" for r in read_manifest(out_dir)[0])


def run_and_kill(proc: subprocess.Popen, out_dir: Path, after: int, timeout: float, poll_s: float) -> dict[str, Any]:
    """SIGKILL the child as soon as ``after`` items are finished in its manifest."""
    start, sent_at = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - start < timeout:
        if _ok_count(out_dir) >= after:
            os.kill(proc.pid, signal.SIGKILL)
            sent_at = round(time.monotonic() - start, 2)
            break
        time.sleep(poll_s)
    row = reap(proc, timeout - (time.monotonic() - start))
    row.update(killed=sent_at is not None and row["rc"] == -signal.SIGKILL, kill_sent_s=sent_at)
    return row


def inspect_killed(out_dir: Path) -> dict[str, Any]:
    """What a kill left: finished items, leftover temporaries, images without a record."""
    from PIL import Image

    done = finished_ids(out_dir)
    records, bad = read_manifest(out_dir)
    recorded = {f for r in records if r.get("status") == "ok" for f in r.get("files", [])}
    decodes = True
    for rec in records:
        for f in rec.get("files", []):
            try:
                with Image.open(out_dir / f) as im:
                    im.load()  # a finished image must be complete, not a truncated write
            except Exception:  # noqa: BLE001 (any decode failure counts)
                decodes = False
    return {"finished": sorted(done), "n_finished": len(done), "manifest_records": len(records),
            "torn_lines": bad, "tmp_files": sorted(p.name for p in out_dir.glob(".*tmp*")),
            "orphan_images": sorted(p.name for p in out_dir.glob("*.png") if p.name not in recorded),
            "finished_images_decode": decodes}


def compare(a: Path, b: Path, ids: list[str]) -> dict[str, Any]:
    """Pixel comparison per item of two batch folders."""
    import numpy as np
    from PIL import Image

    per_item: dict[str, int | None] = {}
    hashes, std = set(), None
    for i in ids:
        pa, pb = a / f"{i}.png", b / f"{i}.png"
        if not (pa.is_file() and pb.is_file()):
            per_item[i] = None
            continue
        xa = np.asarray(Image.open(pa).convert("RGB"), dtype=np.int16)
        xb = np.asarray(Image.open(pb).convert("RGB"), dtype=np.int16)
        per_item[i] = int(np.abs(xa - xb).max()) if xa.shape == xb.shape else 255
        hashes.add(hashlib.sha1(xa.tobytes()).hexdigest())
        std = float(xa.std()) if std is None else std
    diffs = [d for d in per_item.values() if d is not None]
    return {"compared": len(diffs), "identical": sum(d == 0 for d in diffs),
            "max_abs_diff": max(diffs) if diffs else None, "per_item": per_item,
            # Identity means little if every image is the same flat picture (NaN weights etc.).
            "distinct_images_a": len(hashes), "first_image_pixel_std": std}


def _stats(values: list[float]) -> dict[str, Any]:
    rest = values[1:]
    return {"n": len(values), "first": values[0] if values else None,
            "mean_rest": round(sum(rest) / len(rest), 4) if rest else None,
            "min_rest": min(rest) if rest else None, "max_rest": max(rest) if rest else None}


def timing(records: list[dict[str, Any]], result: dict[str, Any] | None) -> dict[str, Any]:
    """Seconds per image of one child: manifest seconds (call + PNG write) and call seconds."""
    calls = (result or {}).get("calls", [])
    return {"item_s": _stats([r["seconds"] for r in records if r.get("status") == "ok"]),
            "call_s": _stats([c["seconds"] for c in calls]),
            "attempts": sum(c.get("attempts", 0) for c in calls),
            "escalations": sum(len(r.get("escalations", [])) for r in records),
            "plans": sorted({",".join(r.get("plan", [])) for r in records})}


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a[key]["mean_rest"], b[key]["mean_rest"]
    return round(x / y, 3) if x and y else None


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


class Runner:
    """Runs the children one after the other within a total deadline, keeping their results."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.deadline = time.monotonic() + args.deadline
        self.runs: dict[str, dict[str, Any]] = {}

    def left(self) -> float:
        return min(self.args.child_timeout, self.deadline - time.monotonic())

    def run(self, name: str, out_dir: Path, *, plan: str | None = None, cache: str = "none",
            limit: int = 0, kill_after: int = 0) -> dict[str, Any]:
        if self.left() < 5:
            self.runs[name] = {"skipped": "deadline"}
            return self.runs[name]
        t = time.monotonic()
        proc = spawn(self.args, self.work, name, out_dir, plan=plan, cache=cache, limit=limit)
        row = (run_and_kill(proc, out_dir, kill_after, self.left(), self.args.poll)
               if kill_after else reap(proc, self.left()))
        row["wall_s"] = round(time.monotonic() - t, 2)
        row["start"] = _load(self.work / f"{name}.start.json")
        row["result"] = _load(self.work / f"{name}.result.json")
        if (row["rc"] != 0 and not kill_after) or row["timed_out"]:
            row["log_tail"] = _tail(self.work / f"{name}.log")
        self.runs[name] = row
        print(f"[{name}] rc={row['rc']} wall={row['wall_s']}s" + (" TIMED OUT" if row["timed_out"] else ""),
              flush=True)
        return row


def evaluate(runner: Runner, ids: list[str], dirs: dict[str, Path], kill: dict[str, Any]) -> dict[str, Any]:
    args, runs = runner.args, runner.runs
    rec_a, _ = read_manifest(dirs["A"])
    rec_b, torn_b = read_manifest(dirs["B"])
    rec_o, _ = read_manifest(dirs["oracle"])
    resume = runs["B_resume"].get("result") or {}
    # The killed child's records come first in B's manifest; the resumed child's follow.
    rec_resume = rec_b[kill.get("manifest_records", 0):]
    t_a, t_r, t_o = timing(rec_a, runs["A"].get("result")), timing(rec_resume, resume), timing(
        rec_o, runs["oracle"].get("result"))
    identity = compare(dirs["A"], dirs["B"], ids)
    # Informational: with the same plan as A, the oracle's images should match A's too.
    vs_oracle = compare(dirs["A"], dirs["oracle"], ids[: args.oracle_items])
    weights = {n: (r.get("start") or {}).get("weights") for n, r in runs.items() if "skipped" not in r}
    n_kill = kill.get("n_finished", 0)
    checks = {
        "children_ok": all(runs[n].get("rc") == 0 for n in ("A", "B_resume", "oracle")),
        "same_weights_in_every_child": len(set(weights.values())) == 1 and None not in weights.values(),
        "a_complete": finished_ids(dirs["A"]) == set(ids),
        "b_complete": finished_ids(dirs["B"]) == set(ids),
        "kill_landed_mid_job": bool(runs["B_killed"].get("killed")) and args.kill_after <= n_kill < len(ids),
        "killed_leaves_nothing_counted_unfinished": kill.get("finished_images_decode", False),
        "resume_skipped_exactly_finished": sorted(resume.get("skipped", [])) == kill.get("finished"),
        "resume_did_the_rest": sorted(resume.get("done", [])) == sorted(set(ids) - set(kill.get("finished", []))),
        "identical_to_uninterrupted": identity["identical"] == len(ids),
    }
    return {
        "checks": checks, "passed": all(checks.values()),
        "warnings": {"torn_manifest_lines_in_b": torn_b,
                     "all_images_alike": identity["distinct_images_a"] <= 1},
        "kill": kill, "identity": identity, "weights": weights,
        "a_vs_oracle_images": {k: vs_oracle[k] for k in ("compared", "identical", "max_abs_diff")},
        "timing": {"A": t_a, "B_resume": t_r, "oracle": t_o,
                   "ratio_A_vs_oracle_item": _ratio(t_a, t_o, "item_s"),
                   "ratio_A_vs_oracle_call": _ratio(t_a, t_o, "call_s"),
                   "ratio_resume_vs_oracle_item": _ratio(t_r, t_o, "item_s"),
                   "ratio_resume_vs_oracle_call": _ratio(t_r, t_o, "call_s")},
        "plan": {n: (runs[n].get("result") or {}).get("plan") for n in ("A", "B_resume", "oracle")},
        "escalations": {n: (runs[n].get("result") or {}).get("escalations") for n in ("A", "B_resume", "oracle")},
        "memory": {n: {k: (runs[n].get("result") or {}).get(k) for k in ("peak_allocated_gib", "peak_reserved_gib")}
                   for n in ("A", "B_resume", "oracle")},
    }


def _summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per child: wall, startup and batch seconds, without the bulky per-call lists."""
    out = {}
    for name, r in runs.items():
        res, start = r.get("result") or {}, r.get("start") or {}
        out[name] = {k: r.get(k) for k in ("rc", "timed_out", "wall_s", "killed", "kill_sent_s", "skipped", "log_tail")
                     if r.get(k) is not None}
        out[name].update({k: start.get(k) for k in ("import_s", "build_s", "gpu", "gpu_total_gib", "torch")})
        out[name].update({k: res.get(k) for k in ("batch_s", "child_s", "failed") if k in res})
    return out


def parent_main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    if args.tiny:
        args.size = args.size or 64
        args.steps = args.steps or 4
    args.size, args.steps = args.size or 1024, args.steps or 10
    work = Path(args.work or tempfile.mkdtemp(prefix="autofit-batch-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = write_items(work / "items.jsonl", args.steps, args.size)
    dirs = {n: work / n for n in ("A", "B", "oracle")}
    cache = str(work / "plan-cache")  # shared by the autofit children: B reuses A's plan
    runner = Runner(args, work)
    config = {k: getattr(args, k) for k in ("device", "tiny", "cap", "steps", "size", "kill_after", "oracle_plan",
                                            "oracle_items", "weight_seed")} | {"items": len(ids), "work": str(work)}
    print(json.dumps(config), flush=True)

    runner.run("A", dirs["A"], cache=cache)
    runner.run("B_killed", dirs["B"], cache=cache, kill_after=args.kill_after)
    kill = inspect_killed(dirs["B"])
    print(f"[B_killed] finished at kill: {kill['n_finished']}", flush=True)
    runner.run("B_resume", dirs["B"], cache=cache)
    runner.run("oracle", dirs["oracle"], plan=args.oracle_plan, limit=args.oracle_items)

    result = {"config": config, **evaluate(runner, ids, dirs, kill), "runs": _summary(runner.runs),
              "wall_s": round(time.monotonic() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text, flush=True)
    print("PASS" if result["passed"] else f"FAIL: {[k for k, v in result['checks'].items() if not v]}", flush=True)
    return 0 if result["passed"] else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL at 64x64, 4 steps (CPU smoke path)")
    p.add_argument("--cap", type=float, default=8.0, help="per-process GPU memory cap, GiB (CUDA only)")
    p.add_argument("--steps", type=int, default=0, help="default 10 (4 with --tiny)")
    p.add_argument("--size", type=int, default=0, help="default 1024 (64 with --tiny)")
    p.add_argument("--kill-after", type=int, default=5, help="SIGKILL once this many items are finished")
    p.add_argument("--oracle-plan", default="vae_tiling", help="comma-separated strategy names; '' = none")
    p.add_argument("--oracle-items", type=int, default=4)
    p.add_argument("--weight-seed", type=int, default=0)
    p.add_argument("--poll", type=float, default=0.005, help="manifest poll interval, seconds")
    p.add_argument("--child-timeout", type=float, default=150.0, help="seconds per child before it is killed")
    p.add_argument("--deadline", type=float, default=330.0, help="total seconds for all children")
    p.add_argument("--work", default=None, help="folder for items, images, logs (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    # Used by the parent to start the children.
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--items", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default="none", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        sys.path.insert(0, str(HERE))  # sized.py
        child_main(args)
        return
    sys.exit(parent_main(args))


if __name__ == "__main__":
    main()
