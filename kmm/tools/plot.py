"""``kmm plot RUN``: pictures of one run (matplotlib, Agg, PNG).

From a trace (``kmm run --trace``), three PNGs beside it (or at ``-o PREFIX``):

- ``PREFIX-memory.png``: Rss and AnonHugePages (summed over processes) and free memory
  over emulated time, the series of timeline_model (docs/timeline.md);
- ``PREFIX-faults.png``: the latency of every fault (the ``do_user_addr_fault`` slice:
  mmap_lock requested to released), THP faults apart from the others;
- ``PREFIX-locks.png``: the waits of contended acquisitions per lock class, and the hold
  times per class.

From a report (``kmm run --json``) there is no time: ``PREFIX-locks.png`` shows its
lock_stat (wait and hold totals per class) and ``PREFIX-memory.png`` its regions' final
Rss and AnonHugePages.

The PNGs are deterministic: no date or software version in their metadata, fixed size
and fonts, so the same run and matplotlib give the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kmm.tools import timeline_model as tm

DPI = 100
SIZE = (8, 4.5)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9,
                         "svg.hashsalt": "kmm", "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _steps(series: list[tuple[int, int]], end: int, scale: float) -> tuple[list, list]:
    xs = [t / 1e6 for t, _ in series] + [end / 1e6]
    ys = [v * scale for _, v in series] + [series[-1][1] * scale]
    return xs, ys


def plot_memory(run: tm.Run, path: str, title: str) -> str:
    """Rss, AnonHugePages and free memory (MiB) over emulated time (ms)."""
    plt = _plt()
    fig, (top, bot) = plt.subplots(2, 1, figsize=SIZE, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    # Rss wide beneath, AnonHugePages narrow on top: both show where they are equal
    for key, colour, width in ((tm.RSS, "tab:blue", 3.0), (tm.AHP, "tab:orange", 1.3)):
        xs, ys = _steps(run.counters[key], run.end, 1 / 1024)
        top.step(xs, ys, where="post", label=key.replace(" kB", ""), color=colour,
                 linewidth=width)
    top.set_ylabel("MiB mapped")
    top.legend(loc="upper left")
    xs, ys = _steps(run.counters[tm.FREE], run.end, 4 / 1024)
    label = "free memory" if run.free_anchored else "free memory, change since start"
    bot.step(xs, ys, where="post", color="tab:green", label=label)
    bot.set_ylabel("MiB free" if run.free_anchored else "MiB (change)")
    bot.set_xlabel("emulated time (ms)")
    bot.legend(loc="upper left")
    fig.suptitle(f"{title}: memory over time")
    fig.tight_layout()
    return _save(fig, path)


def plot_faults(run: tm.Run, path: str, title: str) -> str:
    """Histogram of fault latencies (us, log scale), THP faults and the others."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    huge = [(f.end - f.start) / 1000 for f in run.faults if f.huge]
    small = [(f.end - f.start) / 1000 for f in run.faults if not f.huge]
    every = huge + small
    if every:
        import numpy as np
        lo, hi = max(min(every), 0.01), max(max(every), 0.02)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 40)
        data = [(small, "4K/mTHP faults", "tab:blue"), (huge, "THP faults", "tab:orange")]
        data = [d for d in data if d[0]]
        ax.hist([d[0] for d in data], bins=bins, label=[f"{d[1]} ({len(d[0])})" for d in data],
                color=[d[2] for d in data], stacked=True)
        ax.set_xscale("log")
        ax.set_yscale("log")  # the rare slow faults stay visible beside the many fast
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no faults in this trace", ha="center", transform=ax.transAxes)
    ax.set_xlabel("fault latency, do_user_addr_fault (emulated us)")
    ax.set_ylabel("faults")
    ax.set_title(f"{title}: {len(every)} faults")
    fig.tight_layout()
    return _save(fig, path)


def plot_locks(run: tm.Run, path: str, title: str) -> str:
    """Per lock class: the distribution of waits (left) and holds (right), in us."""
    plt = _plt()
    fig, (lw, lh) = plt.subplots(1, 2, figsize=SIZE)
    waits: dict[str, list[float]] = {}
    for w in run.waits:  # a 0 ns wait or hold is drawn at 1 ns (a log scale)
        waits.setdefault(w.slice.track, []).append(max(w.slice.end - w.slice.start, 1) / 1000)
    holds = {cls: [max(ns, 1) / 1000 for ns in v] for cls, v in run.hold_ns.items()}
    for ax, d, what in ((lw, waits, "wait"), (lh, holds, "hold")):
        if d:
            names = sorted(d)
            ax.boxplot([d[n] for n in names], orientation="horizontal", whis=(0, 100))
            ax.set_yticks(range(1, len(names) + 1),
                          [f"{n} ({len(d[n])})" for n in names])
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no contended acquisition" if what == "wait" else "no locks",
                    ha="center", transform=ax.transAxes)
            ax.set_yticks([])
        ax.set_xlabel(f"{what} time (emulated us)")
    lw.set_title("lock waits per class")
    lh.set_title("lock holds per class")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_report(rep: dict, prefix: str, title: str) -> list[str]:
    """A report has no time: its lock_stat and its regions' final figures."""
    plt = _plt()
    rows = [r for r in rep.get("locks", []) if r.get("acquisitions")]
    fig, ax = plt.subplots(figsize=SIZE)
    if rows:
        names = [r["class name"] for r in rows]
        ys = range(len(rows))
        ax.barh([y - 0.2 for y in ys], [r["waittime-total"] for r in rows], height=0.4,
                label="waittime-total", color="tab:red")
        ax.barh([y + 0.2 for y in ys], [r["holdtime-total"] for r in rows], height=0.4,
                label="holdtime-total", color="tab:blue")
        ax.set_yticks(list(ys), [f"{n} ({r['contentions']}/{r['acquisitions']})"
                                 for n, r in zip(names, rows)])
        ax.set_xscale("symlog")
        ax.legend()
    ax.set_xlabel("emulated us (lock_stat); per class: contentions/acquisitions")
    ax.set_title(f"{title}: lock_stat (a report has no time; plot a trace for series)")
    fig.tight_layout()
    out = [_save(fig, f"{prefix}-locks.png")]
    regions = rep.get("regions") or {}
    fig, ax = plt.subplots(figsize=SIZE)
    names = sorted(regions)
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [regions[n].get("rss_kb", 0) / 1024 for n in names],
            height=0.4, label="Rss", color="tab:blue")
    ax.barh([y + 0.2 for y in ys], [regions[n].get("anon_huge_kb", 0) / 1024 for n in names],
            height=0.4, label="AnonHugePages", color="tab:orange")
    ax.set_yticks(list(ys), names)
    ax.set_xlabel("MiB at the end of the run")
    ax.legend()
    ax.set_title(f"{title}: regions at the end")
    fig.tight_layout()
    out.append(_save(fig, f"{prefix}-memory.png"))
    return out


def plot_trace(run: tm.Run, prefix: str, title: str) -> list[str]:
    return [plot_memory(run, f"{prefix}-memory.png", title),
            plot_faults(run, f"{prefix}-faults.png", title),
            plot_locks(run, f"{prefix}-locks.png", title)]


def _load_report(path: str) -> dict[str, Any] | None:
    """The report in ``path``, or None when it is not one JSON object with vmstat."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and "vmstat" in doc and "seq" not in doc else None


def add_parser(sub) -> None:
    """``kmm plot``'s arguments (kmm/tools/cli.py)."""
    pl = sub.add_parser("plot", help="plots of a run (PNG): memory over time, fault "
                        "latencies, lock waits")
    pl.add_argument("run", help="a trace (kmm run --trace, JSON lines) or a report "
                    "(kmm run --json)")
    pl.add_argument("--report", metavar="REPORT.json",
                    help="with a trace: its report, to anchor free memory")
    pl.add_argument("-o", "--output", metavar="PREFIX",
                    help="where the PNGs go: PREFIX-memory.png ... (default: beside RUN)")
    pl.set_defaults(fn=cmd_plot)


def cmd_plot(args) -> int:
    """kmm plot RUN [--report REPORT.json] [-o PREFIX]."""
    from kmm.tools import locks
    path = args.run
    if not os.path.exists(path):
        print(f"kmm plot: {path}: no such file", file=sys.stderr)
        return 2
    prefix = args.output or os.path.splitext(path)[0]
    title = os.path.basename(path)
    rep = _load_report(path)
    try:
        if rep is not None:
            made = plot_report(rep, prefix, title)
        else:
            final_free = None
            if args.report:
                other = _load_report(args.report)
                if other is None or "zone" not in other:
                    print(f"kmm plot: {args.report}: not a kmm report (kmm run --json)",
                          file=sys.stderr)
                    return 2
                final_free = other["zone"]["nr_free"]
            run = tm.build(locks.read_events(path), final_free=final_free)
            made = plot_trace(run, prefix, title)
    except locks.TraceError as e:
        from kmm.tools.timeline import failure_hint
        hint = failure_hint(path, plot=True) or (" (give a trace, kmm run --trace, or a report, "
                                      "kmm run --json)")
        print(f"kmm plot: {e}{hint}", file=sys.stderr)
        return 2
    except tm.BadEvent as e:
        print(f"kmm plot: {path}: not a kmm trace: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kmm plot: {e.filename}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    for p in made:
        print(p)
    return 0
