"""``autofit plan --plot FILE``: predicted seconds per call against the VRAM budget, one line per
plan family (the placement: device, model_offload, group_*, sequential...), where a user sees
whether a bigger card is worth it.

The sweep asks the planner's pure ``rank`` at each budget (nothing is loaded); a family's point is
its fastest plan that fits there under the chosen policy. An ``.svg`` is written by hand (no
dependency); a ``.png`` needs matplotlib, used only when it is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from autofit.cli.args import UsageError
from autofit.units import GIB

FORMATS = (".svg", ".png")
POINTS = 48
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 800, 480, 70, 600, 50, 420  # canvas and plot area, in pixels


def check(path: str) -> None:
    """A format this machine can write (before the model folder is measured)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--plot {path}: {suffix or 'no extension'} is not a format the plot is drawn in; "
                         "name an .svg (or a .png, with matplotlib installed)")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot {path}: a .png needs matplotlib (pip install matplotlib); "
                         "or name an .svg, which needs nothing")


def budgets(ctx_for: Any, now: int) -> list[int]:
    """Budgets from near nothing to one where the fastest plan of all fits (and past ``now``)."""
    from autofit.planning.planner import rank

    roomy = rank(ctx_for(1 << 50))  # every plan fits: the best there is
    fastest = min(c.seconds for c in roomy)
    top = max(now * 1.1, min(c.vram for c in roomy if c.seconds <= fastest) * 1.25)
    for _ in range(24):  # a plan's peak can depend on the budget (sized chunks): look, grow, look
        if any(c.fits and c.seconds <= fastest * 1.001 for c in rank(ctx_for(int(top)))):
            break
        top *= 1.5
    return [int(top * (i + 1) / POINTS) for i in range(POINTS)]


def sweep(fp: Any, machine: Any, workload: Any, policy: str) -> dict[str, list[tuple[int, float]]]:
    """Family -> [(budget, seconds of its fastest fitting plan)], budgets ascending; a family is
    absent at budgets where none of its plans fits."""
    from autofit.planning.context import context
    from autofit.planning.planner import rank

    def ctx_for(budget: int):
        return context(fp, dataclasses.replace(machine, budget_bytes=budget), workload, policy=policy)

    lines: dict[str, list[tuple[int, float]]] = {}
    for budget in budgets(ctx_for, machine.budget_bytes):
        best: dict[str, float] = {}
        for c in rank(ctx_for(budget)):
            if c.fits and c.seconds < best.get(c.plan.family, math.inf):
                best[c.plan.family] = c.seconds
        for family, seconds in best.items():
            lines.setdefault(family, []).append((budget, seconds))
    return lines


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        steps = (1, 2, 5) if last - first <= 3 else (1,)
        return [m * 10**e for e in range(first, last + 1) for m in steps if lo <= m * 10**e <= hi]
    raw = (hi - lo) / 6 or 1
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def svg(lines: dict[str, list[tuple[int, float]]], *, now: int, title: str) -> str:
    """The plot as an SVG document: axes with ticks, one polyline per family (its points also as
    ``data-budgets-gib`` and ``data-seconds``), a legend, and a dashed line at the budget ``now``."""
    points = [p for pts in lines.values() for p in pts]
    x_hi = max([b for b, _ in points] + [now]) / GIB
    secs = [s for _, s in points] or [1.0]
    log = max(secs) / max(min(secs), 1e-9) > 10
    y_lo, y_hi = (min(secs) / 1.2, max(secs) * 1.2) if log else (0.0, max(secs) * 1.1 or 1.0)

    def x(gib: float) -> float:
        return _LEFT + (_RIGHT - _LEFT) * gib / x_hi

    def y(s: float) -> float:
        share = (math.log(s / y_lo) / math.log(y_hi / y_lo)) if log else (s - y_lo) / (y_hi - y_lo)
        return _BOTTOM - (_BOTTOM - _TOP) * share

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{_W}" height="{_H}" fill="white"/>',
           f'<text x="{_W / 2}" y="24" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<g class="axes" stroke="black"><line x1="{_LEFT}" y1="{_BOTTOM}" x2="{_RIGHT}" y2="{_BOTTOM}"/>'
           f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_BOTTOM}"/></g>']
    for t in _ticks(0, x_hi, False):
        out.append(f'<text class="xtick" x="{x(t):.1f}" y="{_BOTTOM + 16}" text-anchor="middle">{_label(t)}</text>')
    for t in _ticks(y_lo, y_hi, log):
        out.append(f'<text class="ytick" x="{_LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>'
                   f'<line x1="{_LEFT}" y1="{y(t):.1f}" x2="{_RIGHT}" y2="{y(t):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{(_LEFT + _RIGHT) / 2}" y="{_BOTTOM + 36}" text-anchor="middle">VRAM budget (GiB)</text>'
               f'<text transform="translate(18 {(_TOP + _BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               f'predicted seconds per call{" (log scale)" if log else ""}</text>')
    out.append(f'<g class="now"><line x1="{x(now / GIB):.1f}" y1="{_TOP}" x2="{x(now / GIB):.1f}" y2="{_BOTTOM}" '
               f'stroke="black" stroke-dasharray="4 4"/><text x="{x(now / GIB) + 4:.1f}" y="{_TOP + 12}">'
               f'budget now {now / GIB:.3g} GiB</text></g>')
    for i, (family, pts) in enumerate(lines.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{x(b / GIB):.1f},{y(s):.1f}" for b, s in pts)
        out.append(f'<g class="family" data-family={quoteattr(family)}>'
                   f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}" '
                   f'data-budgets-gib="{" ".join(f"{b / GIB:.6g}" for b, _ in pts)}" '
                   f'data-seconds="{" ".join(f"{s:.6g}" for _, s in pts)}"/>'
                   f'<line x1="{_RIGHT + 20}" y1="{_TOP + 40 + 18 * i}" x2="{_RIGHT + 40}" y2="{_TOP + 40 + 18 * i}" '
                   f'stroke="{color}" stroke-width="2"/>'
                   f'<text x="{_RIGHT + 46}" y="{_TOP + 40 + 18 * i + 4}">{escape(family)}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png(lines: dict[str, list[tuple[int, float]]], path: Path, *, now: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for family, pts in lines.items():
        ax.plot([b / GIB for b, _ in pts], [s for _, s in pts], label=family)
    ax.axvline(now / GIB, color="black", linestyle="--", label=f"budget now {now / GIB:.3g} GiB")
    ax.set(xlabel="VRAM budget (GiB)", ylabel="predicted seconds per call", title=title, yscale="log")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
