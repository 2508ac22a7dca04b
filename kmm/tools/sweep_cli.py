"""The ``kmm sweep`` command: validate, run on an executor, show the table, write DIR.

The terminal table has one row per grid point (the seeds folded: each figure as its
value when every seed agrees, else ``mean [min..max]``; ``--runs`` shows one row per
run), drawn by rich on a terminal and as plain aligned text otherwise. The files in
``--out DIR`` are kmm.tools.sweep's (``sweep.csv``, ``sweep.jsonl``) and
kmm.tools.sweep_plot's (``<figure>.png``, ``<figure>.svg``), each written whole or not
at all.
"""

from __future__ import annotations

import os
import sys

from kmm.tools import executors, interrupt, sweep as sw
from kmm.tools.progress import Progress

MAX_FIGURE_COLUMNS = 6  # the terminal table's figures when --plot names none


def main(args) -> int:
    try:
        plan = sw.plan(args.file, args.set or [], args.seeds, args.daemon, args.mode)
        figures = [sw.check_figure(f) for f in args.plot or ()]
        if figures and not args.out:
            raise sw.SweepError("--plot needs --out DIR (where the pictures go)")
        if args.jobs < 1:
            raise sw.SweepError("--jobs must be at least 1")
        from kmm.tools import sweep_plot
        x = sweep_plot.x_dimension(plan, args.x)
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise sw.SweepError(f"--out {args.out}: exists and is not a directory")
        executor = executors.make(args.jobs, args.ray)
        if args.ray is not None and args.ray != "auto":
            executors.check_address(args.ray)  # before anything starts
    except (sw.SweepError, executors.ExecutorError) as e:
        print(f"kmm sweep: {e}", file=sys.stderr)
        return 2
    total = len(plan.points()) * len(plan.seeds)
    prog = Progress(total, enabled=not args.quiet, what="sweep", unit="run",
                    found="failure")

    def keep(res: sw.Result) -> None:  # Ctrl-C: what finished is written
        if args.out:
            write(plan, res, figures, x, args.out)
        print(f"kmm sweep: interrupted: {len(res.rows)} of {res.total} runs finished"
              + (f", written to {args.out}" if args.out else ""), file=sys.stderr)

    try:
        res = sw.sweep(plan, executor, prog, on_interrupt=keep)
    except executors.ExecutorError as e:
        print(f"kmm sweep: {e}", file=sys.stderr)
        return 2
    cols = sw.columns(plan, res.rows, figures)
    shown = figures or [c for c in cols if not c.startswith("run.")][:MAX_FIGURE_COLUMNS]
    print_table(plan, res.rows, shown, per_run=args.runs)
    failed = [r for r in res.rows if r["status"] != "ok"]
    for r in failed[:10]:
        print(f"failed: {_params(plan, r)} seed {r['seed']}: {r['status']}: {r['error']}")
    if len(failed) > 10:
        print(f"failed: ... and {len(failed) - 10} more (the status column of the files)")
    where = ""
    if args.out:
        paths = write(plan, res, figures, x, args.out)
        where = f"; files: {', '.join(paths)}"
    on = f"{res.workers} Ray worker" if args.ray is not None else f"{res.workers} job"
    print(f"{plan.path}: {len(res.rows)} runs ({len(plan.points())} grid points x "
          f"{len(plan.seeds)} seed{'s' if len(plan.seeds) != 1 else ''}) in {res.seconds:.1f}s on {on}"
          f"{'s' if res.workers != 1 else ''}, {len(failed)} failed{where}")
    sys.stdout.flush()
    return 1 if failed else 0


def _params(plan, row: dict) -> str:
    return " ".join(f"{d.name}={row['params'][d.name]}" for d in plan.dims) or "(no --set)"


def write(plan, res, figures: list[str], x: str, out: str) -> list[str]:
    """sweep.csv, sweep.jsonl and the plots of ``figures`` in ``out``."""
    from kmm.tools import sweep_plot
    os.makedirs(out, exist_ok=True)
    cols = sw.columns(plan, res.rows, figures)
    paths = []
    for name, text in (("sweep.csv", sw.to_csv(plan, res.rows, cols)),
                       ("sweep.jsonl", sw.to_jsonl(plan, res.rows, cols))):
        path = os.path.join(out, name)
        interrupt.publish(path, text)
        paths.append(path)
    for fig in figures:
        paths += sweep_plot.draw(plan, res.rows, fig, x, out)
    return paths


def _cell(values: list) -> str:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return "-"
    lo, hi = min(nums), max(nums)
    if lo == hi:
        return f"{lo:g}" if isinstance(lo, float) else str(lo)
    return f"{sum(nums) / len(nums):.4g} [{lo:g}..{hi:g}]"


def table_rows(plan, rows: list[dict], shown: list[str], per_run: bool
               ) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the terminal table."""
    dims = [d.name for d in plan.dims]
    if per_run:
        head = dims + ["seed", "status"] + shown
        body = [[str(r["params"][d]) for d in dims] + [str(r["seed"]), r["status"]]
                + [_cell([sw.figure(r["report"], c)]) for c in shown] for r in rows]
        return head, body
    head = dims + ["runs", "failed"] + shown
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["params"][d] for d in dims), []).append(r)
    body = []
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        body.append([str(v) for v in key] + [str(len(rs)), str(len(rs) - len(ok))]
                    + [_cell([sw.figure(r["report"], c) for r in ok]) for c in shown])
    return head, body


def print_table(plan, rows: list[dict], shown: list[str], *, per_run: bool = False,
                stream=None, console=None) -> None:
    """A rich table on a terminal (or into ``console``), plain aligned text otherwise."""
    stream = stream or sys.stdout
    head, body = table_rows(plan, rows, shown, per_run)
    if console is not None or stream.isatty():
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"kmm sweep {plan.path}"
                  + ("" if per_run else f" (seeds {_seeds(plan.seeds)})"))
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < len(plan.dims) else "right")
        for cells in body:
            t.add_row(*cells)
        (console or Console(file=stream)).print(t)
        return
    width = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
             for i, h in enumerate(head)]
    stream.write("  ".join(h.rjust(w) for h, w in zip(head, width)).rstrip() + "\n")
    for cells in body:
        stream.write("  ".join(c.rjust(w) for c, w in zip(cells, width)).rstrip() + "\n")


def _seeds(seeds: tuple[int, ...]) -> str:
    if len(seeds) > 1 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(map(str, seeds))
