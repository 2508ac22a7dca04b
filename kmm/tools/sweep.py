"""kmm sweep: one scenario or program over a grid of knobs, machine sizes, daemons and
seeds; every run's report in one table.

The grid is the product of the ``--set NAME=V1,V2,...`` dimensions (a sysfs knob as a
scenario names it, ``thp.enabled``, ``khugepaged.max_ptes_none``,
``thp.hugepages-64kB.enabled``; or a machine size, ``machine.memory``, ``machine.cpus``,
``machine.swap``), the ``--daemon`` alternatives and the ``--seeds``. It is validated
whole before anything runs, by the scenario loader's own checks (an unknown knob or value
is one line, exit 2). Each run is ``kmm run FILE --seed S`` with the grid point's knobs
set as the file's own (a program may write them again) on a fresh machine, in a worker
of the executor (kmm.tools.executors: this process, a local pool, or Ray tasks).

The rows are sorted by the parameters (numbers numerically, in the order of the
``--set`` options) then the seed, and hold nothing of the wall clock, so the same sweep
gives byte-equal files on every executor and every number of workers. A run that fails
(a kernel BUG, the program's own error) is a row with its status, its error and the
report as far as the machine could still give one. In ``--out DIR``: ``sweep.csv`` (the
figures), ``sweep.jsonl`` (the figures and each run's whole report) and the plots of
``--plot`` (kmm.tools.sweep_plot). Ctrl-C cancels the runs not finished and writes
those that are.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time
from typing import Any

from kmm.tools import executors, interrupt
from kmm.tools.progress import Progress
from kmm.tools.scenario import ScenarioError, _knobs, _machine, load_scenario


class SweepError(Exception):
    """Bad input to kmm sweep: one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension of the grid: its name as given, its values (validated, typed), and
    what it sets (a sysfs knob, a machine size, the plug-in daemon)."""

    name: str
    values: tuple
    kind: str           # "knob" | "machine" | "daemon"
    target: str = ""    # the sysfs name, or the machine key


MACHINE_KEYS = ("memory", "swap", "cpus")


def _typed(text: str) -> Any:
    """A --set value as TOML would give it: a decimal integer, else the word."""
    return int(text) if re.fullmatch(r"\d+", text) else text


def parse_set(spec: str) -> Dim:
    """``NAME=V1,V2,...`` -> Dim, each value checked as the scenario loader checks a
    file's [thp], [khugepaged] and [machine] tables."""
    name, eq, rest = spec.partition("=")
    name = name.strip()
    values = [v.strip() for v in rest.split(",")]
    if not eq or not name or not all(values):
        raise SweepError(f"--set {spec}: expected NAME=VALUE[,VALUE...] (e.g. "
                         "khugepaged.max_ptes_none=0,64,511)")
    if len(set(values)) != len(values):
        raise SweepError(f"--set {spec}: a value is given twice")
    table, _, key = name.partition(".")
    where = f"--set {name}"
    if table == "machine":
        if key not in MACHINE_KEYS:
            raise SweepError(f"{where}: unknown machine size (allowed: "
                             f"{', '.join('machine.' + k for k in MACHINE_KEYS)})")
        out = []
        for v in values:
            try:
                out.append(getattr(_machine({key: _typed(v)}, where), key))
            except ScenarioError as e:
                raise SweepError(f"{where}={v}: {e.message}") from None
        return Dim(name, tuple(out), "machine", key)
    if table not in ("thp", "khugepaged") or not key:
        raise SweepError(f"{where}: unknown knob (a knob is thp.NAME, thp.hugepages-<size>kB"
                         ".NAME or khugepaged.NAME; a machine size machine.memory, "
                         "machine.swap or machine.cpus)")
    out, target = [], ""
    for v in values:
        doc: dict = {table: {}}
        inner = doc[table]
        parts = key.split(".")
        for p in parts[:-1]:
            inner = inner.setdefault(p, {})
        inner[parts[-1]] = _typed(v)
        try:
            knobs = _knobs(doc, where)
        except ScenarioError as e:
            raise SweepError(f"{where}={v}: {e.message}") from None
        if len(knobs) != 1:
            raise SweepError(f"{where}: names a table, not one knob")
        (target, value), = knobs.items()
        out.append(value)
    return Dim(name, tuple(out), "knob", target)


def parse_daemons(spec: str) -> Dim:
    """``--daemon A,B``: each run has one of these plug-ins (an installed daemon's name
    or module:Class; ``none`` for no plug-in), loaded here to check them."""
    from kmm import daemon
    values = [v.strip() for v in spec.split(",")]
    if not all(values) or len(set(values)) != len(values):
        raise SweepError(f"--daemon {spec}: expected NAME[,NAME...] (each once)")
    for v in values:
        if v != "none":
            try:
                load_daemon(v)
            except daemon.DaemonLoadError as e:
                raise SweepError(f"--daemon: {e}") from None
    return Dim("daemon", tuple(values), "daemon")


def load_daemon(spec: str):
    """A plug-in daemon class: ``module:Class``, or the name of an installed daemon."""
    from kmm import daemon
    if ":" in spec:
        return daemon.load_daemon_spec(spec)
    return daemon.load_daemons([spec])[0]


def parse_seeds(spec: str) -> tuple[int, ...]:
    """``1..20``, ``1,5,9`` or a mix (``1..3,10``); each seed once, in order."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise SweepError(f"--seeds {spec}: expected seeds like 1..20 or 1,5,9 "
                             "(non-negative integers, A..B with A <= B)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        out += [s for s in range(lo, hi + 1) if s not in out]
    if len(out) > 100_000:
        raise SweepError(f"--seeds {spec}: more than 100000 seeds")
    return tuple(out)


@dataclasses.dataclass
class Plan:
    """A validated sweep: the file, the dimensions, the seeds, the runs in row order."""

    path: str
    scenario: Any            # the loaded Scenario, or None for a program
    source: str | None       # a program's text (a worker without the file writes it)
    dims: list[Dim]
    seeds: tuple[int, ...]
    mode: str = "free"

    def points(self) -> list[dict]:
        """Every grid point (dimension name -> value), sorted (``sort_key``)."""
        pts: list[dict] = [{}]
        for d in self.dims:
            pts = [{**p, d.name: v} for p in pts for v in d.values]
        return sorted(pts, key=self.sort_key)

    def sort_key(self, params: dict) -> tuple:
        return tuple((0, v, "") if isinstance(v, int) else (1, 0, str(v))
                     for v in (params[d.name] for d in self.dims))

    def jobs(self) -> list[dict]:
        """One job per run, in row order (parameters, then seed)."""
        return [{"params": p, "seed": s} for p in self.points() for s in self.seeds]


def plan(path: str, sets: list[str], seeds: str, daemon: str | None = None,
         mode: str = "free") -> Plan:
    """Validate everything before any run: the file, each --set, the seeds, daemons."""
    if not os.path.exists(path):
        raise SweepError(f"{path}: no such file")
    scenario = source = None
    if path.endswith(".py"):
        from kmm.tools import runner
        runner.load_program(path)  # a broken program is one line, before any run
        with open(path) as f:
            source = f.read()
    elif path.endswith(".toml"):
        scenario = load_scenario(path)
    else:
        raise SweepError(f"{path}: not a scenario (.toml) or a program (.py)")
    dims = [parse_set(s) for s in sets]
    if daemon:
        dims.append(parse_daemons(daemon))
    names = [d.name for d in dims]
    for d in dims:
        if names.count(d.name) > 1:
            raise SweepError(f"--set {d.name}: given twice (list every value in one --set)")
        if scenario is None and d.kind == "machine" and d.target == "swap":
            raise SweepError(f"--set {d.name}: a program's swap is its own MACHINE['swap']")
    return Plan(path, scenario, source, dims, parse_seeds(seeds), mode)


# ----------------------------------------------------------------------- one run
def run_job(plan: Plan, job: dict) -> dict:
    """One run (in a worker): the row of ``job``'s grid point and seed. Never raises
    for a failed run: its status and error are in the row."""
    from kmm.machine import KernelBug
    from kmm.runtime import remote
    from kmm.tools import errors, runner
    knobs: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    daemons: list = []
    for d in plan.dims:
        v = job["params"][d.name]
        if d.kind == "knob":
            knobs[d.target] = v
        elif d.kind == "machine":
            machine[d.target] = v
        elif v != "none":
            daemons.append(load_daemon(v))
    row = {"params": job["params"], "seed": job["seed"], "status": "ok", "error": ""}
    try:
        if plan.scenario is not None:
            sc = plan.scenario
            sc = dataclasses.replace(sc, knobs={**sc.knobs, **knobs},
                                     machine=dataclasses.replace(sc.machine, **machine))
            rep = runner.run_scenario(sc, seed=job["seed"], mode=plan.mode, daemons=daemons)
        else:
            rep = runner.run_program(_program_file(plan), seed=job["seed"], mode=plan.mode,
                                     cpus=machine.get("cpus"), memory=machine.get("memory"),
                                     knobs=knobs, daemons=daemons)
    except Exception as e:  # noqa: BLE001 - a failed run is a row, not the sweep's end
        status = ("kernel-bug" if isinstance(e, KernelBug)
                  else "actor-died" if isinstance(e, remote.ChildDied)
                  else "program-error" if isinstance(e, errors.UserCodeError)
                  else "bad-input" if isinstance(e, ScenarioError)
                  else "kernel-bug")
        msg = str(e) if not isinstance(e, KernelBug) else f"kernel BUG: {e}"
        row.update(status=status, error=" ".join(msg.split())[:500])
        rep = getattr(e, "partial_report", None)
    row["report"] = rep
    return row


def _program_file(plan: Plan) -> str:
    """The program's path; on a worker without it (a Ray cluster's other machine), the
    shipped text written to a file of the same name."""
    if os.path.isfile(plan.path):
        return plan.path
    import hashlib
    import tempfile
    d = os.path.join(tempfile.gettempdir(), "kmm-sweep-" + hashlib.sha256(
        plan.source.encode()).hexdigest()[:16])
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, os.path.basename(plan.path))
    if not os.path.exists(path):
        interrupt.publish(path, plan.source)
    return path


def run_jobs(plan: Plan, batch: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Several runs in one task (fewer round trips for short runs), each with its
    index in row order."""
    return [(i, run_job(plan, j)) for i, j in batch]


# --------------------------------------------------------------------- the sweep
@dataclasses.dataclass
class Result:
    rows: list[dict]           # finished runs, in row order
    total: int                 # runs in the grid
    seconds: float = 0.0
    workers: int = 1
    interrupted: bool = False


def sweep(plan: Plan, executor=None, progress: Progress | None = None,
          on_interrupt=None) -> Result:
    """Run every job of the plan on the executor; the rows in row order. On an
    interruption ``on_interrupt(result)`` gets what finished before it goes on
    unwinding (kmm sweep writes those rows)."""
    jobs = plan.jobs()
    executor = executor or executors.InlineExecutor()
    prog = progress or Progress(len(jobs), enabled=False)
    done: dict[int, dict] = {}
    t0 = time.perf_counter()
    res = Result([], len(jobs))

    def finish() -> Result:
        res.rows = [done[i] for i in sorted(done)]
        res.seconds = time.perf_counter() - t0
        return res

    _warm()
    try:
        with executor as ex:
            res.workers = ex.workers
            # one run per task: a run (tenths of a second and more) outweighs a task's
            # overhead, and Ctrl-C keeps every run that finished
            batches = [[(i, j)] for i, j in enumerate(jobs)]
            pending = {}
            nxt = 0
            while nxt < len(batches) or pending:
                while nxt < len(batches) and len(pending) < ex.workers * 2:
                    pending[ex.submit(run_jobs, plan, batches[nxt])] = nxt
                    nxt += 1
                for h in ex.wait(pending):
                    pending.pop(h)
                    for i, row in ex.result(h):
                        done[i] = row
                failed = sum(1 for r in done.values() if r["status"] != "ok")
                prog.update(len(done), failed)
    except KeyboardInterrupt:
        res.interrupted = True
        prog.close()
        if on_interrupt is not None:
            on_interrupt(finish())
        raise
    prog.update(len(done), sum(1 for r in done.values() if r["status"] != "ok"),
                final=True)
    return finish()


def _warm() -> None:
    """Load what every run needs (the mechanism, the built-in daemons' entry points)
    once, before a pool forks its workers, instead of once in each worker."""
    from kmm import daemon
    from kmm.tools import runner
    daemon.load_daemons([*runner.DEFAULT_DAEMONS, "khugepaged"])


# --------------------------------------------------------------------- figures
SHORT = {"rss": "rss_kb", "Rss": "rss_kb", "rss_kb": "rss_kb",
         "AnonHugePages": "anon_huge_kb", "anon_huge": "anon_huge_kb",
         "anon_huge_kb": "anon_huge_kb", "swap": "swap_kb", "swap_kb": "swap_kb",
         "pages_collapsed": "khugepaged.pages_collapsed",
         "full_scans": "khugepaged.full_scans", "events": "run.events",
         "emulated_ns": "run.emulated_ns", "nr_free": "zone.nr_free"}
REPORT_KEYS = ("vmstat", "regions", "vm_events", "zone", "lru", "run", "khugepaged",
               "meminfo", "mthp", "events", "hugetlb_events", "deferred_split_queue",
               "result")  # result: a program's own returned dict


def check_figure(name: str) -> str:
    """A figure's column name (``--plot``): a short name (SHORT), a /proc/vmstat
    counter (``thp_fault_alloc``, ``pgfault``), or a dotted path into the report
    (``regions.main/heap.anon_huge_kb``, ``khugepaged.pages_collapsed``, a program's
    ``result.KEY``)."""
    from kmm import vmstat
    if name in SHORT:
        return SHORT[name]
    if name in vmstat.THP_EVENTS or name in vmstat.OTHER_EVENTS:
        return name
    if name.split(".", 1)[0] in REPORT_KEYS and "." in name:
        return name
    raise SweepError(f"--plot {name}: unknown figure (rss, AnonHugePages, a /proc/vmstat "
                     "counter such as thp_fault_alloc, or a path into the report such as "
                     "khugepaged.pages_collapsed or regions.main/heap.rss_kb)")


def figure(report: dict | None, name: str) -> Any:
    """The value of a figure column in a report (None when the report lacks it)."""
    if report is None:
        return None
    regions = report.get("regions") or {}
    if name in ("rss_kb", "anon_huge_kb", "swap_kb"):
        return sum(r.get(name, 0) for r in regions.values())
    if name in (report.get("vmstat") or {}):
        return report["vmstat"][name]
    if "." not in name:
        return (report.get("vm_events") or {}).get(name, 0)
    return _walk(report, name.split("."))


def _walk(node: Any, parts: list[str]) -> Any:
    """A dotted path whose keys may themselves hold dots (region names)."""
    if not parts:
        return node
    if not isinstance(node, dict):
        return None
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in node:
            return _walk(node[key], parts[n:])
    return None


def columns(plan: Plan, rows: list[dict], extra: list[str]) -> list[str]:
    """The figure columns: Rss and AnonHugePages (all regions), every thp_* counter
    that moved in some run, khugepaged's collapses, the figures asked for, then the
    run's events, emulated time and trace digest."""
    from kmm import vmstat
    moved = [n for n in vmstat.THP_EVENTS
             if any((r["report"] or {}).get("vmstat", {}).get(n) for r in rows)]
    cols = ["rss_kb", "anon_huge_kb", *moved]
    if any((r["report"] or {}).get("khugepaged") for r in rows):
        cols.append("khugepaged.pages_collapsed")
    cols += [c for c in extra if c not in cols]
    return cols + ["run.events", "run.emulated_ns", "run.trace_sha256"]


def flat(plan: Plan, row: dict, cols: list[str]) -> dict:
    """A row as the CSV has it: parameters, seed, status, error, figures."""
    out = {d.name: row["params"][d.name] for d in plan.dims}
    out.update(seed=row["seed"], status=row["status"], error=row["error"])
    for c in cols:
        v = figure(row["report"], c)
        out[c] = "" if v is None else v
    return out


def to_csv(plan: Plan, rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    names = [d.name for d in plan.dims] + ["seed", "status", "error"] + cols
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(flat(plan, r, cols))
    return buf.getvalue()


def to_jsonl(plan: Plan, rows: list[dict], cols: list[str]) -> str:
    """One JSON object per run: the CSV's fields and the run's whole report."""
    lines = []
    for r in rows:
        obj = flat(plan, r, cols)
        obj["report"] = r["report"]
        lines.append(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    return "".join(line + "\n" for line in lines)
