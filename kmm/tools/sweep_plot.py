"""kmm sweep's plots: each chosen figure against the swept knob, the spread over seeds.

One picture per figure, PNG and SVG: the x axis is the swept dimension (``--x``, else
the first ``--set`` with more than one value), one line per combination of the other
swept dimensions, each point the mean over the seeds of the runs that finished ok, a
band from the lowest to the highest seed and the seeds' own values as dots. Drawn with
matplotlib's Agg canvas (no display, no pyplot state); the files carry no date or
version, and the SVG's element ids come from a fixed salt, so the same sweep gives
byte-equal files.
"""

from __future__ import annotations

import os
import re
from typing import Any

SALT = "kmm-sweep"
METADATA = {"png": {"Software": "kmm sweep"},
            "svg": {"Creator": "kmm sweep", "Date": None, "Format": None}}


def x_dimension(plan, x: str | None) -> str:
    """The dimension on the x axis: ``x`` if given (a --set name, daemon or seed), else
    the first with more than one value, else the first, else the seed."""
    names = [d.name for d in plan.dims]
    if x is not None:
        if x not in names and x != "seed":
            from kmm.tools.sweep import SweepError
            raise SweepError(f"--x {x}: not a swept dimension (one of "
                             f"{', '.join(names + ['seed'])})")
        return x
    for d in plan.dims:
        if len(d.values) > 1:
            return d.name
    return names[0] if names else "seed"


def file_stem(figure: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", figure)


def series(plan, rows: list[dict], fig: str, x: str) -> dict[tuple, dict[Any, list]]:
    """(other swept values) -> x value -> the figure's values over the seeds."""
    from kmm.tools.sweep import figure
    others = [d.name for d in plan.dims if d.name != x and len(d.values) > 1]
    out: dict[tuple, dict[Any, list]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        v = figure(r["report"], fig)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        key = tuple(r["params"][o] for o in others)
        xv = r["seed"] if x == "seed" else r["params"][x]
        out.setdefault(key, {}).setdefault(xv, []).append(v)
    return out


def draw(plan, rows: list[dict], fig: str, x: str, out_dir: str) -> list[str]:
    """The picture of one figure: ``<out_dir>/<figure>.png`` and ``.svg``."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    data = series(plan, rows, fig, x)
    others = [d.name for d in plan.dims if d.name != x and len(d.values) > 1]
    fixed = [f"{d.name}={d.values[0]}" for d in plan.dims
             if d.name != x and len(d.values) == 1]
    xs_all = sorted({xv for s in data.values() for xv in s},
                    key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
    numeric = all(isinstance(v, (int, float)) for v in xs_all)
    pos = {v: (v if numeric else i) for i, v in enumerate(xs_all)}
    with matplotlib.rc_context({"svg.hashsalt": SALT, "font.size": 9}):
        f = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(f)
        ax = f.add_subplot()
        for key in sorted(data, key=str):
            pts = data[key]
            xs = [v for v in xs_all if v in pts]
            px = [pos[v] for v in xs]
            mean = [sum(pts[v]) / len(pts[v]) for v in xs]
            lo = [min(pts[v]) for v in xs]
            hi = [max(pts[v]) for v in xs]
            label = ", ".join(f"{o}={k}" for o, k in zip(others, key)) or "mean over seeds"
            (line,) = ax.plot(px, mean, marker="o", label=label)
            ax.fill_between(px, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
            dots = [(pos[v], y) for v in xs for y in pts[v]]
            if dots:
                ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=8, alpha=0.4,
                           color=line.get_color())
        if not numeric:
            ax.set_xticks(list(range(len(xs_all))), [str(v) for v in xs_all])
        ax.set_xlabel(x)
        ax.set_ylabel(fig)
        seeds = len(plan.seeds)
        ax.set_title(f"{fig} against {x}\n{os.path.basename(plan.path)}: mean, min..max "
                     f"over {seeds} seed{'s' if seeds != 1 else ''}"
                     + (f"; {', '.join(fixed)}" if fixed else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        if data:
            ax.legend(fontsize=8)
        f.tight_layout()
        paths = []
        for ext in ("png", "svg"):
            path = os.path.join(out_dir, f"{file_stem(fig)}.{ext}")
            f.savefig(path, format=ext, metadata=METADATA[ext])
            paths.append(path)
    return paths
