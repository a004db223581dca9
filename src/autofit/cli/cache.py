"""``autofit cache list|show|clear``: what the plan cache learned, per model, size, batch, budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autofit.cli import args as a
from autofit.cli.args import UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="list, show or clear what the plan cache learned")
    p.add_argument("action", choices=["list", "show", "clear"])
    p.add_argument("key", nargs="?", help="the record to show (from `autofit cache list`)")
    p.add_argument("--model", default=None, help="clear: only the records of the pipeline in this folder")
    p.add_argument("--cache-dir", default=None, help="default: $AUTOFIT_CACHE_DIR or ~/.cache/autofit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from autofit.facts.cache import PlanCache

    cache = PlanCache(args.cache_dir)
    if args.action == "list":
        _list(cache, json_out=args.json)
    elif args.action == "show":
        _show(cache, args.key)
    else:
        if args.model:
            a.check_model_dir(args.model)
        n = cache.clear(model_dir=args.model)
        print(json.dumps({"removed": n}) if args.json else f"removed {n} record(s) from {cache.directory}")
    return 0


def _show(cache: Any, key: str | None) -> None:
    if not key:
        raise UsageError("cache show needs a KEY (see `autofit cache list`)")
    try:
        path = cache._path(key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    record = cache.get(key)
    if record is None:
        raise UsageError(f"no usable record {key} in {path.parent}")
    print(json.dumps(record, indent=2))


def _list(cache: Any, *, json_out: bool) -> None:
    import time

    now = time.time()
    rows = [_cache_row(e, now) for e in cache.entries()]
    if json_out:
        print(json.dumps({"directory": str(cache.directory), "records": rows}, indent=2))
        return
    print(f"{cache.directory}: {len(rows)} record(s)")
    table = [("MODEL", "SIZE", "BATCH", "BUDGET", "POLICY", "PLAN", "AGE", "KEY")]
    for r in rows:
        what = f"ignored: {r['problem']}" if r["problem"] else "+".join(r["plan"] or []) or "device"
        size = r["size"] and "x".join(map(str, r["size"]))
        if not size and r["megapixels"] is not None:
            size = f"~{r['megapixels']:g} MP"
        if size and (r["frames"] or 1) > 1:
            size += f" x{r['frames']}f"
        budget = f"{r['budget_gib']:g} GiB" if r["budget_gib"] is not None else "?"
        table.append((r["model"] or "?", size or "?", str(r["batch"] or "?"), budget, r["policy"] or "?",
                      what, _age(r["age_s"]), r["key"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def _cache_row(entry: Any, now: float) -> dict[str, Any]:
    """One `autofit cache list` row: what the record's key says of the workload (model, size,
    batch, budget, policy), its plan and age. Fields a record lacks are None."""
    record = entry.record or {}
    key = record.get("key") if isinstance(record.get("key"), dict) else {}

    def number(value: Any) -> Any:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    size = record.get("size")
    size = size if isinstance(size, list) and len(size) == 2 and all(number(v) for v in size) else None
    pixels, budget, updated = number(key.get("pixels_bucket")), number(key.get("budget_bucket")), number(record.get("updated"))
    return {"key": entry.key, "pipeline": key.get("pipeline"), "model": key.get("pipeline"),
            "size": size,  # [height, width] of the last call stored, where the record has it
            "megapixels": round(pixels * 65536 / 1e6, 2) if pixels is not None else None,  # the key's bucket
            "frames": number(key.get("frames")), "batch": number(key.get("batch")),
            "budget_gib": budget * 0.5 if budget is not None else None,  # the 512 MiB bucket's floor
            "policy": key.get("policy"), "device": key.get("device"),
            "plan": record.get("plan"), "updated": updated,
            "age_s": round(max(0.0, now - updated), 1) if updated is not None else None,
            "problem": entry.problem}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{int(seconds // length)} {unit} ago"
    return f"{int(seconds)} s ago"


