"""The race laboratory's explorer: many schedules of one program, checked; exact replay.

``explore`` runs a program (``async def main(k)``) under schedule after schedule
(schedule i uses seed S+i) in one of the scheduler's systematic modes (``random``,
``pct``, ``preempt``: kmm.runtime.sched), checks every run, stops at the first violation
(or runs them all with ``all_``), minimizes the failing schedule and writes a failure
file that ``replay`` re-runs byte for byte.

Violations have a kind:

=================  ==========================================================
``invariant``      kmm.testing's invariant checker (refcounts, mapcounts, page
                   tables, deposits, free lists, LRU, swap, written bytes)
``lockdep``        kmm.lockdep.LockdepSplat, raised when a lock is taken
``deadlock``       sched.Deadlock: no actor can run; the wait-for cycle
``data``           a written byte that does not read back: the checker's shadow
                   check, or a program result whose ``lost_bytes`` / ``*_lost``
                   value is nonzero
``assertion``      an AssertionError raised by the program itself, or a failed
                   call turned into its errno name (``errno_name``) which the
                   program never examined with ``k.expect``
``program-error``  any other exception the program raised itself, a SIGSEGV or
                   SIGBUS of its process, or a call the program API refused
                   (kmm.tools.errors: the innermost frame is the program's)
``kernel-bug``     KernelBug or any other exception out of the mechanism
``nondeterminism`` two runs of the same seed gave different trace digests
``livelock``       the run passed ``max_points`` points (sched.Livelock): the
                   message gives each actor's repeating cycle of events
=================  ==========================================================

Every schedule is bounded: ``max_points`` defaults to ``LIVELOCK_FACTOR`` times the
points of the first (measuring) run, so a schedule that spins is reported as a livelock
with its cycle, never a hang. ``focus`` (``--focus EVENT|SITE|lock:NAME|fn:NAME``,
kmm.runtime.sched.focus_matcher) aims the schedules: pct's change points, preempt's
preemptions and random's choices fall only at the points it accepts (the minimized
replay runs without it). ``keep_going`` runs every schedule and groups the violations
by (kind, site) (``violation_site``: the first line of the message with its numbers
blanked), each with its first schedule.

When the full invariant checker runs (``check``): lockdep, deadlock detection and the
program's own assertions are checked at every point by construction (they raise where
they happen). The full checker is a scan of every page table and struct page (5-12 ms
on the race programs' 1 GiB machines), and it only holds *between* critical sections:
halfway through another CPU's fault, a PTE is set before the mapcount moves. Three
granularities:

- ``point``: at every point at which no actor holds a lock and no server actor (the page
  allocator) is busy: the finest that holds, since every multi-step update of shared
  state in kmm is made under a lock (PTL, mmap_lock, folio lock, zone lock), so with no
  lock held every update is complete or not begun. It gives no false positive on the
  unmodified race programs, but runs the scan thousands of times per run.
- ``op`` (the default): after every program operation (mmap, store, touch, madvise,
  fork, ...) that ends while no other actor holds a lock (kmm.testing.check_between_ops),
  and once at the end: tens of scans per run, so exploration keeps its speed; a broken
  invariant a later operation would repair between two checks can be missed.
- ``end``: once, after the run; the fastest.

The trace of an explored run is never rendered: kmm.runtime.trace.Trace folds each
event into its digest (batches pickled by value into a running sha256), the digest
``kmm run`` reports too, the same in every process and with or without a trace file.
A schedule is run without any trace unless its digest is used (``--check-determinism``,
the minimized run of a failure, replay): the schedule and its checks are the same.

Failure file (JSON lines, ``format`` = ``kmm-failure/1``): the first line is the header::

    {"format": "kmm-failure/1", "program": PATH, "program_sha256": HEX,
     "mode": "random|pct|preempt", "base_seed": S, "schedule": i, "seed": S+i,
     "depth": D, "n": N, "bound": B, "cpus": C, "inject": [...], "check": "op",
     "violation": {"kind": K, "message": M, "seq": SEQ},
     "decisions": [actor name per choice], "preemptions_before": P0,
     "minimized": {"preemptions": [["actor:steps:stops", actor], ...], "count": P1,
                   "violation": {...}, "digest": HEX, "events": E}}

``minimized.preemptions`` is the schedule ``replay`` runs: the scheduler in ``preempt``
mode, non-preemptive except at those choices, each keyed by its position in the running
actor's own execution (kmm.runtime.sched; ``count`` of them switch away from an actor
that could have run on). The header is followed by the last ``TAIL`` trace events
of the minimized run, one JSON object per line (seq, t, actor, event and its fields).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from kmm import testing
from kmm.lockdep import LockdepSplat
from kmm.runtime import remote
from kmm.runtime.sched import Deadlock, Livelock, SchedError, focus_matcher
from kmm.runtime.trace import Trace
from kmm.tools import errors, interrupt, runner
from kmm.tools.progress import Progress  # noqa: F401 - explore's progress (kmm explore)
from kmm.workload import Kernel, UnexpectedResult

FORMAT = "kmm-failure/1"
TAIL = 400                 # trace events kept in the failure file
MODES = ("random", "pct", "preempt")
CHECKS = ("point", "op", "end")
DEFAULT_DEPTH = {"random": 1, "pct": 3, "preempt": 2}
KINDS = ("invariant", "lockdep", "deadlock", "data", "assertion", "program-error",
         "kernel-bug", "nondeterminism", "livelock")
LIVELOCK_FACTOR = 50       # default bound: this many times the first run's points
MEASURE_CAP = 2_000_000    # the measuring run's own bound


class ExploreError(Exception):
    """Bad input (a failure file, a stale program): one line for the user."""


class Violation(Exception):
    """A check failed inside a run (raised at the point where it fired)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ------------------------------------------------------------------------ config
@dataclass
class Config:
    program: str
    mode: str = "random"
    seed: int = 1
    depth: int = 1
    cpus: int | None = None
    inject: list[str] = field(default_factory=list)
    check: str = "op"
    n: int = 0        # pct: expected points; preempt: preemption opportunities
    max_points: int = 0   # the bound of one schedule (0: measured, LIVELOCK_FACTOR x)
    focus: list[str] = field(default_factory=list)  # aimed schedules (sched.focus_matcher)


@dataclass
class Outcome:
    """One run: its violation (kind None if clean), the schedule taken and its digest."""

    kind: str | None = None
    message: str = ""
    seq: int = 0
    digest: str = ""
    decisions: list[str] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    preemptions: int = 0
    points: int = 0
    opportunities: int = 0
    focus_points: int = 0
    events: list[dict] = field(default_factory=list)
    result: Any = None

    def violation(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "seq": self.seq}


def schedule_params(cfg: Config, i: int) -> tuple[str, int, dict[str, Any]]:
    """(mode, seed, scheduler parameters) of schedule i. preempt: schedule 0 has no
    preemption, the next ``n`` each preempt once at opportunity i-1 (every single
    preemption, in order), then seeded plans of 2 .. depth preemptions."""
    seed = cfg.seed + i
    if cfg.mode == "pct":
        return "pct", seed, {"depth": cfg.depth, "n": cfg.n}
    if cfg.mode == "preempt":
        if i == 0:
            return "preempt", seed, {"plan": set()}
        n = max(cfg.n, 1)
        if i <= n:
            return "preempt", seed, {"plan": {i - 1}}
        bound = min(cfg.depth, 2 + (i - n - 1) // n)
        return "preempt", seed, {"bound": max(bound, 1), "n": n}
    return "random", seed, {}


# ---------------------------------------------------------------------- checking
class Checker:
    """The invariant checker at the chosen granularity (module docstring)."""

    def __init__(self, m, k: Kernel, every: str) -> None:
        self.m, self.k, self.every = m, k, every
        self.actors = m.sched.actors
        # one incremental checker for the run: the full checker's verdicts, re-checking
        # only the tables and struct pages that changed since the last check
        self.checker = testing.incremental_checker(m, k)

    def full(self) -> None:
        errs = self.checker.errors()
        if errs:
            data = [e for e in errs if "written" in e or "MADV_FREE'd" in e]
            kind = "data" if len(data) == len(errs) else "invariant"
            raise Violation(kind, "\n".join(errs[:40]))

    def at_point(self) -> None:
        if testing.quiescent(self.m):
            self.full()

    def after_op(self) -> None:
        if testing.quiescent(self.m, but=self.m.sched.current):
            self.full()


def _program_frame(e: BaseException, path: str) -> bool:
    tb = traceback.extract_tb(e.__traceback__)
    return bool(tb) and os.path.abspath(tb[-1].filename) == os.path.abspath(path)


def classify(e: BaseException, path: str) -> tuple[str, str]:
    """The violation kind and message of an exception out of a run."""
    if isinstance(e, Violation):
        return e.kind, e.message
    if isinstance(e, testing.InvariantError):
        return "invariant", str(e)
    if isinstance(e, LockdepSplat):
        return "lockdep", str(e)
    if isinstance(e, Deadlock):
        return "deadlock", str(e)
    if isinstance(e, Livelock):
        return "livelock", str(e)
    if isinstance(e, UnexpectedResult):
        return "assertion", str(e)
    if isinstance(e, AssertionError) and _program_frame(e, path):
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "assertion", (f"{tb.filename}:{tb.lineno}: {tb.line}"
                             + (f" ({e})" if str(e) else ""))
    if isinstance(e, errors.UserCodeError):
        return "program-error", str(e)
    if errors.raised_by_user(e):
        return "program-error", str(errors.ProgramError(path, e))
    if isinstance(e, SchedError):
        return "kernel-bug", f"scheduler: {e}"
    return "kernel-bug", f"{type(e).__name__}: {e}"


def lost_data(result: Any) -> str | None:
    """A program result dict whose lost_bytes or *_lost values are nonzero."""
    if not isinstance(result, dict):
        return None
    bad = {k: v for k, v in result.items()
           if (k == "lost_bytes" or k.endswith("_lost")) and v}
    return f"program result reports lost data: {bad}" if bad else None


_programs: dict[str, tuple] = {}


def _program(path: str) -> tuple[Any, dict]:
    """The program module and its machine, loaded once per process and file version
    (the explorer runs it thousands of times; a changed file is loaded again)."""
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size, st.st_ino)
    got = _programs.get(path)
    if got is None or got[0] != key:
        mod = runner.load_program(path)
        got = _programs[path] = (key, mod, runner.program_machine(mod, path))
    return got[1], got[2]


def run_schedule(cfg: Config, mode: str, seed: int, params: dict[str, Any], *,
                 keep: int = 0, sink=None, digest: bool = True,
                 aim: bool = False) -> Outcome:
    """Run the program once under the given schedule, with every check; never raises
    for a violation (it is in the Outcome). ``digest=False``: no trace at all (the
    schedule, the checks and the outcome are the same; ``Outcome.digest`` is empty).
    ``aim``: with the config's focus (an explored schedule; a minimized replay runs
    without it)."""
    return trio.run(functools.partial(run_schedule_async, cfg, mode, seed, params,
                                      keep=keep, sink=sink, digest=digest, aim=aim))


async def run_schedule_async(cfg: Config, mode: str, seed: int, params: dict[str, Any], *,
                             keep: int = 0, sink=None, digest: bool = True,
                             aim: bool = False) -> Outcome:
    """run_schedule inside a trio run already going (the explorer's loops run many
    schedules in one: starting a trio run costs more than a short schedule)."""
    mod, spec = _program(cfg.program)
    cpus = cfg.cpus or spec.get("cpus", 2)
    mcfg = runner.MachineConfig(memory=spec.get("memory", 1 << 30),
                                swap=spec.get("swap", 0), cpus=cpus, seed=seed,
                                **runner.program_numa(spec, cpus))
    m = runner.build_machine(mcfg, seed=seed, mode="free", cpus=cpus, inject=cfg.inject)
    trace = Trace(sink, keep) if digest or keep or sink is not None else None
    m.sched.trace = trace
    params = dict(params)
    params.setdefault("max_points", cfg.max_points)
    if aim and cfg.focus:
        params["focus"] = focus_matcher(cfg.focus)
    m.sched.configure(mode, seed, **params)
    k = Kernel(m)
    chk = Checker(m, k, cfg.check)
    if cfg.check == "point":
        m.sched.on_point = chk.at_point
    elif cfg.check == "op":
        k.after_op = chk.after_op
    out = Outcome()
    box: dict[str, Any] = {}

    async def driver() -> None:
        await runner.start_daemons(k)
        box["value"] = await mod.main(k)

    try:
        try:
            await m.run_async(driver)
        finally:
            remote.reap_all()  # no child of a spawned actor outlives the run
        out.result = box.get("value")
        chk.full()  # every granularity checks the final state
        lost = lost_data(out.result)
        if lost:
            raise Violation("data", lost)
        ignored = k.unexamined()
        if ignored:  # a failed call the program never examined (Kernel.expect)
            raise Violation("assertion", "the program ignored failed calls: "
                            + "; ".join(ignored[:8]))
    except Exception as e:  # noqa: BLE001 - every exception is a finding
        if interrupt.caught():  # the signal landed inside an operation: not a finding
            raise interrupt.Interrupted(interrupt.caught()) from None
        out.kind, out.message = classify(e, cfg.program)
        out.seq = m.sched.seq
    s = m.sched
    out.digest = trace.digest() if trace is not None else ""
    out.decisions = list(s.decisions)
    out.overrides = dict(s.overrides)
    out.preemptions = s.preemptions
    out.points = s.points
    out.opportunities = s.opportunities
    out.focus_points = s.focus_points
    if keep:
        out.events = trace.tail()
    return out


MEASURE_SEEDS = 8  # measuring runs pct with a focus may take to find it


def measure(cfg: Config) -> tuple[int, int]:
    """(the ``n`` a mode needs, the points of the run) from a first run: pct the number
    of points (with a focus: of accepted points, from the first of seeds S, S+1, ...
    whose run reaches the focus) of a random run of seed S; preempt the preemption
    opportunities of the non-preemptive run; random only the points."""
    params: dict[str, Any] = {"max_points": cfg.max_points or MEASURE_CAP}
    if cfg.mode == "preempt":
        out = run_schedule(cfg, "preempt", cfg.seed, {**params, "plan": set()}, aim=True,
                           digest=False)
        return out.opportunities, out.points
    out = run_schedule(cfg, "random", cfg.seed, params, aim=cfg.mode == "pct",
                       digest=False)
    if cfg.mode == "pct" and cfg.focus:
        # an aimed run that never reached the focus (another actor ran to the end
        # first) would leave pct no change point at all: measure the next seeds
        for k in range(1, MEASURE_SEEDS):
            if out.focus_points:
                break
            out = run_schedule(cfg, "random", cfg.seed + k, params, aim=True, digest=False)
        return out.focus_points, out.points
    if cfg.mode == "pct":
        return out.points, out.points
    return 0, out.points


def run_one(cfg: Config, i: int, determinism: bool) -> tuple:
    """Schedule i, summarised for the explorer: (i, kind, message, seq)."""
    return trio.run(run_one_async, cfg, i, determinism)


async def run_one_async(cfg: Config, i: int, determinism: bool) -> tuple:
    mode, seed, params = schedule_params(cfg, i)
    # the digest only serves the determinism check here (a failure is re-run, with
    # its digest, when minimized)
    out = await run_schedule_async(cfg, mode, seed, params, digest=determinism,
                                   aim=True)
    if determinism:
        again = await run_schedule_async(cfg, mode, seed, params, aim=True)
        if again.digest != out.digest or again.kind != out.kind:
            return (i, "nondeterminism",
                    f"seed {seed}: trace digest {out.digest[:16]} then {again.digest[:16]}"
                    f" ({out.seq or 'clean'} / {again.seq or 'clean'})", 0)
    return (i, out.kind, out.message, out.seq)


def run_chunk(cfg: Config, lo: int, hi: int, determinism: bool, stop: bool) -> list[tuple]:
    """Schedules [lo, hi) in a worker; stops after the first violation if ``stop``."""
    async def loop() -> list[tuple]:
        res = []
        for i in range(lo, hi):
            r = await run_one_async(cfg, i, determinism)
            res.append(r)
            if stop and r[1] is not None:
                break
        return res
    return trio.run(loop)


# ----------------------------------------------------------------------- explore
@dataclass
class Summary:
    schedules: int = 0
    seconds: float = 0.0
    violations: dict[str, int] = field(default_factory=dict)
    first: int | None = None
    first_violation: dict[str, Any] | None = None
    n: int = 0
    max_points: int = 0
    distinct: list[dict[str, Any]] = field(default_factory=list)  # keep_going
    workers: int = 1  # processes or Ray CPUs that ran schedules


def violation_site(kind: str, message: str) -> str:
    """Where a violation is, for grouping: its message's first line with addresses and
    numbers blanked (the same broken invariant at another pfn is the same site)."""
    import re
    line = message.strip().splitlines()[0] if message.strip() else kind
    if kind == "livelock":
        return "schedule exceeded its bound"
    line = re.sub(r"0x[0-9a-fA-F]+|\b\d+\b", "N", line)
    return line[:160]


def explore(cfg: Config, schedules: int, *, jobs: int = 1, all_: bool = False,
            determinism: bool = False, progress: Progress | None = None,
            keep_going: bool = False, executor=None, start: int = 0) -> Summary:
    """Run schedules start .. start+schedules-1 (a range of a longer exploration: ``n``
    and the bound still come from seed S's run, so consecutive ranges run exactly the
    schedules of one run over their union); the result does not depend on ``jobs`` or the
    ``executor`` (kmm.tools.executors: a Ray cluster's tasks run ranges of schedules as
    the pool's workers do): the first violation is the lowest failing index, and without
    ``all_`` only the schedules up to it are counted. ``keep_going`` runs them all and
    fills ``distinct``: one entry per (kind, site), with its first schedule and how many
    schedules showed it."""
    t0 = time.perf_counter()
    summ = Summary()
    all_ = all_ or keep_going
    if not cfg.max_points or (cfg.mode in ("pct", "preempt") and not cfg.n):
        n, points = measure(cfg)
        if cfg.mode in ("pct", "preempt") and not cfg.n:
            cfg.n = max(n, 1) if cfg.focus else n
        if not cfg.max_points:
            cfg.max_points = LIVELOCK_FACTOR * max(points, 1000)
    summ.n = cfg.n
    summ.max_points = cfg.max_points
    results: dict[int, tuple] = {}
    prog = progress or Progress(schedules, enabled=False)

    def found() -> int:
        return sum(1 for r in results.values() if r[1] is not None)

    def first_fail() -> int | None:
        fails = [i for i, r in results.items() if r[1] is not None]
        return min(fails) if fails else None

    if jobs <= 1 and executor is None:
        async def loop() -> None:
            for i in range(start, start + schedules):
                r = await run_one_async(cfg, i, determinism)
                results[i] = r
                prog.update(len(results), found())
                if r[1] is not None and not all_:
                    break
        trio.run(loop)
    else:
        from kmm.tools import executors
        with executor or executors.LocalExecutor(jobs) as ex:
            summ.workers = ex.workers
            chunk = max(1, min(16, schedules // (ex.workers * 8) or 1))
            end = start + schedules
            starts = list(range(start, end, chunk))
            pending: dict = {}
            nxt = 0
            while nxt < len(starts) or pending:
                best = None if all_ else first_fail()
                while (nxt < len(starts) and len(pending) < ex.workers * 2
                       and (best is None or starts[nxt] < best)):
                    lo = starts[nxt]
                    h = ex.submit(run_chunk, cfg, lo, min(lo + chunk, end),
                                  determinism, not all_)
                    pending[h] = lo
                    nxt += 1
                if not pending:
                    break
                for h in ex.wait(pending):
                    pending.pop(h)
                    for r in ex.result(h):
                        results[r[0]] = r
                prog.update(len(results), found())
    first = first_fail()
    if first is not None and not all_:
        results = {i: r for i, r in results.items() if i <= first}
    summ.schedules = len(results)
    summ.violations = dict(Counter(r[1] for r in results.values() if r[1] is not None))
    summ.first = first
    if first is not None:
        r = results[first]
        summ.first_violation = {"kind": r[1], "message": r[2], "seq": r[3]}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for i in sorted(results):
        r = results[i]
        if r[1] is None:
            continue
        key = (r[1], violation_site(r[1], r[2]))
        if key in groups:
            groups[key]["count"] += 1
        else:
            groups[key] = {"kind": r[1], "site": key[1], "first": i, "count": 1,
                           "message": r[2], "seq": r[3]}
    summ.distinct = list(groups.values())
    summ.seconds = time.perf_counter() - t0
    prog.update(summ.schedules, sum(summ.violations.values()), final=True)
    return summ


# --------------------------------------------------------------------- minimizer
def ddmin(items: list, test: Callable[[list], bool], budget: int) -> list:
    """Zeller's delta debugging: a 1-minimal sublist of ``items`` (as far as the run
    budget allows) for which ``test`` still holds."""
    runs = [0]

    def t(sub: list) -> bool:
        if runs[0] >= budget:
            return False
        runs[0] += 1
        return test(sub)

    n = 2
    while len(items) >= 2 and runs[0] < budget:
        size = -(-len(items) // n)
        parts = [items[i:i + size] for i in range(0, len(items), size)]
        for p in parts:
            if t(p):
                items, n = p, 2
                break
        else:
            for j in range(len(parts)):
                comp = [x for q, p in enumerate(parts) if q != j for x in p]
                if t(comp):
                    items, n = comp, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items


def minimize(cfg: Config, seed: int, fail: Outcome, budget: int = 300
             ) -> tuple[list[tuple[str, str]], Outcome]:
    """Fewer preemptions, same kind of violation: ddmin over the failing run's choices
    that differ from the non-preemptive default, replayed in preempt mode."""
    items = list(fail.overrides.items())  # in the order the run made them
    if fail.kind == "livelock":  # every try runs to the bound: keep it short
        budget = min(budget, 4)

    def run(sub: list) -> Outcome:
        return run_schedule(cfg, "preempt", seed, {"preemptions": dict(sub)},
                            digest=False)

    def test(sub: list) -> bool:
        return run(sub).kind == fail.kind

    if test([]):
        items = []
    elif test(items):
        items = ddmin(items, test, budget)
    else:  # cannot happen for a deterministic program: keep the full schedule
        pass
    return items, run_schedule(cfg, "preempt", seed, {"preemptions": dict(items)},
                               keep=TAIL)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_failure(path: str, cfg: Config, i: int, fail: Outcome,
                  sched: list[tuple[str, str]] | None, mini: Outcome | None,
                  replace: bool = True) -> dict:
    """The failure file (module docstring); returns its header."""
    mode, seed, params = schedule_params(cfg, i)
    head: dict[str, Any] = {
        "format": FORMAT, "program": os.path.abspath(cfg.program),
        "program_sha256": sha256_file(cfg.program), "mode": cfg.mode,
        "base_seed": cfg.seed, "schedule": i, "seed": seed, "depth": cfg.depth,
        "n": cfg.n, "bound": params.get("bound", len(params.get("plan", ()))),
        "cpus": cfg.cpus, "inject": list(cfg.inject), "check": cfg.check,
        "violation": fail.violation(), "decisions": fail.decisions,
        "preemptions_before": fail.preemptions, "minimized": None,
    }
    if cfg.max_points:
        head["max_points"] = cfg.max_points
    if cfg.focus:
        head["focus"] = list(cfg.focus)
    if mini is not None:
        head["minimized"] = {"preemptions": [list(p) for p in sched or ()],
                             "count": mini.preemptions, "violation": mini.violation(),
                             "digest": mini.digest, "events": mini.seq}
    text = json.dumps(head, sort_keys=True) + "\n" + "".join(
        json.dumps(ev, sort_keys=True) + "\n" for ev in (mini.events if mini is not None else ()))
    interrupt.publish(path, text, replace=replace)
    return head


def failure_path(program: str, seed: int) -> str:
    """A failure file name of its own in the current directory:
    FAILURE-<program>-<seed>.jsonl, then -2, -3 ... if taken (never overwritten)."""
    stem = os.path.splitext(os.path.basename(program))[0]
    base = f"FAILURE-{stem}-{seed}"
    name, n = base + ".jsonl", 1
    while os.path.exists(name):
        n += 1
        name = f"{base}-{n}.jsonl"
    return name


def keep_going_path(out: str, k: int) -> str:
    """The k-th (0-based) failure file of a keep-going exploration: ``out`` itself,
    then OUT-2.jsonl, OUT-3.jsonl, ..."""
    if k == 0:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{k + 1}{ext or '.jsonl'}"


def record_failure(cfg: Config, i: int, path: str, budget: int = 300,
                   violation: dict | None = None, replace: bool = True
                   ) -> tuple[Outcome, list | None, Outcome | None]:
    """Re-run failing schedule i, minimize it (unless nondeterministic) and write its
    failure file at ``path``: (the failing run, the minimized schedule, its run)."""
    mode, seed, params = schedule_params(cfg, i)
    fail = run_schedule(cfg, mode, seed, params, aim=True)
    if (violation or {}).get("kind") == "nondeterminism" or fail.kind is None:
        write_failure(path, cfg, i, Outcome(
            kind="nondeterminism", message=(violation or {}).get("message", ""),
            decisions=fail.decisions), None, None, replace=replace)
        return fail, None, None
    sched, mini = minimize(cfg, seed, fail, budget=budget)
    write_failure(path, cfg, i, fail, sched, mini, replace=replace)
    return fail, sched, mini


# ------------------------------------------------------------------------ replay
def read_failure(path: str) -> tuple[dict, list[dict]]:
    try:
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
    except FileNotFoundError:
        raise ExploreError(f"{path}: no such file") from None
    try:
        head = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError as e:
        raise ExploreError(f"{path}: line 1 is not JSON ({e.msg})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ExploreError(f"{path}: not a kmm failure file (format must be {FORMAT!r})")
    for key in ("program", "program_sha256", "seed", "violation", "minimized"):
        if key not in head:
            raise ExploreError(f"{path}: header lacks the field {key!r}")
    return head, [json.loads(ln) for ln in lines[1:]]


def replay(path: str, *, trace_sink=None, last: int = 30) -> tuple[bool, dict, Outcome, str]:
    """Re-run a failure file's minimized schedule. Returns (reproduced, header, outcome,
    why): reproduced means the same kind of violation and the same trace digest."""
    head, _ = read_failure(path)
    prog = head["program"]
    if not os.path.exists(prog):
        raise ExploreError(f"{path}: program {prog} no longer exists")
    if sha256_file(prog) != head["program_sha256"]:
        raise ExploreError(f"{path}: program {prog} changed since the failure was recorded "
                           f"(sha256 differs); re-run kmm explore")
    cfg = Config(program=prog, mode=head.get("mode", "random"), seed=head["seed"],
                 depth=head.get("depth", 1), cpus=head.get("cpus"),
                 inject=list(head.get("inject", ())), check=head.get("check", "op"),
                 n=head.get("n", 0), max_points=head.get("max_points", 0),
                 focus=list(head.get("focus", ())))
    mini = head["minimized"]
    keep = max(last, 1)
    if mini is None:  # nondeterminism: the best there is, the recorded decisions
        out = run_schedule(cfg, "replay", head["seed"],
                           {"replay": head.get("decisions") or []}, keep=keep, sink=trace_sink)
        return False, head, out, "a nondeterministic run cannot be replayed exactly"
    out = run_schedule(cfg, "preempt", head["seed"],
                       {"preemptions": {i: a for i, a in mini["preemptions"]}},
                       keep=keep, sink=trace_sink)
    want = mini["violation"]["kind"]
    if out.digest != mini["digest"]:
        return False, head, out, (f"trace digest {out.digest[:16]} differs from the file's "
                                  f"{mini['digest'][:16]}")
    if out.kind != want:
        return False, head, out, f"violation {out.kind} instead of {want}"
    return True, head, out, "reproduced"


HEX_FIELDS = ("pt", "val", "pfn", "addr", "start", "end", "dst", "src", "table", "entry")


def format_event(ev: dict) -> str:
    """One line of replay's listing: seq, emulated time, actor, event, and what it
    touched (lock and site, page-table page/index/value, pfn)."""
    rest = []
    for key, v in ev.items():
        if key in ("seq", "t", "actor", "event"):
            continue
        if key in HEX_FIELDS and isinstance(v, int) and not isinstance(v, bool):
            v = hex(v)
        rest.append(f"{key}={v}")
    return (f"{ev['seq']:>8} {ev['t']:>12}ns  {ev['actor']:<14} {ev['event']:<26} "
            + " ".join(rest)).rstrip()
