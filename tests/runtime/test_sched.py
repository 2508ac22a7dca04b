"""The deterministic scheduler (kmm/runtime/sched.py): same seed, same trace; modes free,
random and replay; deadlock detection; emulated sleep in (time, seq) order.

The scheduler has no kernel twin (style.md: "The scheduler owns order and time"); what
these tests pin is its contract: exactly one actor runs between points, every choice
comes from the scheduler's own random.Random(seed) and is logged, and nothing from the
host (wall clock, trio's run queue) reaches a trace.
"""

from __future__ import annotations

import pathlib

from kmm import testing
from conftest import run as crun

import hashlib
import json

import pytest

from kmm.machine import Machine, MachineConfig
from kmm.runtime.sched import Deadlock, SchedError
from kmm.runtime.trace import Trace, read_trace
from kmm.tools import runner
from kmm.workload import Kernel

MiB = 1 << 20

# the two-CPU race users run: both CPUs write-fault the same PMD
TWO_CPU_FAULT = pathlib.Path(__file__).resolve().parents[2] / "workloads" / "two_cpu_fault.py"
race = runner.load_program(str(TWO_CPU_FAULT)).main


def machine(*, mode="free", seed=1, replay=None, sink=None, cpus=2):
    m = Machine(MachineConfig(memory=64 * MiB, cpus=cpus, seed=seed), mode=mode,
                seed=seed, replay=replay, trace=Trace(sink))
    return m, Kernel(m)


quiet_check = testing.check_between_ops


def run(m, k, fn, check=True):
    """fn on the given machine, the quiet check after every operation."""
    return crun(fn, m=m, k=k, check=quiet_check if check else None, final=False)


def run_race(**kw):
    m, k = machine(**kw)
    assert run(m, k, lambda m, k: race(k)) == {"lost_bytes": 0}
    return m


together = testing.together

# ----------------------------------------------------------------- determinism
def test_same_seed_same_trace_digest(tmp_path):
    """Same program, same seed, random mode: the trace (and so its digest) is identical."""
    reps = [runner.run_program(str(TWO_CPU_FAULT), cpus=2, seed=7, mode="random",
                               check=quiet_check) for _ in range(2)]
    a, b = (r["run"] for r in reps)
    assert a["trace_sha256"] == b["trace_sha256"]
    assert a["events"] == b["events"] > 0 and a["emulated_ns"] == b["emulated_ns"]
    assert reps[0]["result"] == reps[1]["result"] == {"lost_bytes": 0}
    assert reps[0]["vmstat"] == reps[1]["vmstat"]


def test_different_seeds_give_different_interleavings():
    """Each seed drives its own random.Random: the decision lists of a 2-CPU program
    differ between seeds (and repeat for the same seed)."""
    runs = {seed: run_race(mode="random", seed=seed) for seed in (1, 2, 3, 4)}
    decisions = {seed: m.sched.decisions for seed, m in runs.items()}
    assert all(len(d) > 10 for d in decisions.values())
    assert len({tuple(d) for d in decisions.values()}) == 4
    digests = {m.sched.trace.digest() for m in runs.values()}
    assert len(digests) == 4
    assert run_race(mode="random", seed=3).sched.decisions == decisions[3]
    # every decision names an actor that exists
    names = {a.name for a in runs[1].sched.actors}
    assert set(decisions[1]) <= names and len(set(decisions[1])) >= 2


def test_free_mode_runs_one_actor_until_it_blocks():
    """free: the current actor runs on at every point; another runs only once it blocks
    (here: sleeping with a lock held, then waiting for that lock). No choice is made, so
    nothing is logged in ``decisions``."""
    async def fn(m, k):
        log = []
        lk = m.locks.spinlock("test_lock", "L")

        async def a():
            for i in range(3):
                await m.sched.point("a", i=i)
                log.append(("A", i))
            await lk.lock("a")
            log.append(("A", "locked"))
            await m.sched.sleep(100)  # blocks, still holding L
            log.append(("A", "woke"))
            await lk.unlock()

        async def b():
            for i in range(3):
                await m.sched.point("b", i=i)
                log.append(("B", i))
            await lk.lock("b")  # blocks: A holds L
            log.append(("B", "locked"))
            await lk.unlock()

        await together(m, A=a, B=b)
        return log

    m, k = machine()
    log = run(m, k, fn)
    assert log == [("A", 0), ("A", 1), ("A", 2), ("A", "locked"),
                   ("B", 0), ("B", 1), ("B", 2),
                   ("A", "woke"), ("B", "locked")]
    assert m.sched.decisions == []


def test_free_mode_program_is_not_interleaved():
    """The 2-CPU program in free mode: the first CPU actor runs all its accesses before
    the second starts (nothing blocks it), so the trace switches between them once."""
    sink = _Lines()
    m = run_race(mode="free", sink=sink)
    cpus = [e["actor"] for e in sink.events() if e["actor"].startswith("cpu")]
    runs = [a for i, a in enumerate(cpus) if i == 0 or cpus[i - 1] != a]
    assert len(runs) == 2 and runs[0].startswith("cpu0") and runs[1].startswith("cpu1")
    assert m.sched.decisions == []


def test_random_mode_program_is_interleaved():
    """random: a choice at every point among the runnable actors, so the two CPUs'
    accesses alternate many times in one run."""
    sink = _Lines()
    run_race(mode="random", seed=2, sink=sink)
    cpus = [e["actor"] for e in sink.events() if e["actor"].startswith("cpu")]
    runs = [a for i, a in enumerate(cpus) if i == 0 or cpus[i - 1] != a]
    assert len(runs) > 10


# ---------------------------------------------------------------------- replay
def test_replay_of_recorded_decisions_reproduces_the_trace():
    """replay: following a recorded decision list gives the same trace, byte for byte."""
    rec = run_race(mode="random", seed=11)
    rep = run_race(mode="replay", replay=list(rec.sched.decisions))
    assert rep.sched.trace.digest() == rec.sched.trace.digest()
    assert rep.sched.decisions == rec.sched.decisions
    assert rep.sched.seq == rec.sched.seq and rep.sched.now == rec.sched.now


def test_replay_that_diverges_is_an_error():
    """A decision naming an actor that is not runnable at that point stops the run."""
    rec = run_race(mode="random", seed=11)
    bad = list(rec.sched.decisions)
    bad[0] = "nobody"
    with pytest.raises(SchedError, match="replay diverged at decision 1: nobody"):
        run_race(mode="replay", replay=bad)


# --------------------------------------------------------------------- deadlock
def test_abba_deadlock_names_both_actors():
    """Two actors take two locks in opposite order (lockdep off, so nothing warns
    first): each blocks on the lock the other holds, no actor can run, and the
    scheduler raises Deadlock with the wait-for graph: who waits for what, held by whom."""
    async def fn(m, k):
        m.locks.lockdep.enabled = False
        la = m.locks.spinlock("lock_a", "A")
        lb = m.locks.spinlock("lock_b", "B")

        async def t1():
            await la.lock("t1_first")
            await m.sched.sleep(10)  # let t2 take B
            await lb.lock("t1_second")

        async def t2():
            await lb.lock("t2_first")
            await m.sched.sleep(10)
            await la.lock("t2_second")

        await together(m, t1=t1, t2=t2)

    m, k = machine()
    with pytest.raises(Deadlock) as ei:
        run(m, k, fn)
    msg = str(ei.value)
    assert "t1 waits for B (held by t2); holds A" in msg
    assert "t2 waits for A (held by t1); holds B" in msg


# ------------------------------------------------------------------------ sleep
@pytest.mark.parametrize("mode", ["free", "random"])
def test_sleepers_wake_in_time_then_seq_order(mode):
    """Emulated time is the scheduler's: sleepers wake in (wake time, seq) order, so
    two actors due at the same time wake in the order they went to sleep (SimPy's
    eid), whatever the mode, and the clock jumps to each wake time without any wall
    clock."""
    DUE = {"A": 300, "B": 100, "C": 100, "D": 200, "E": 0, "F": 100}

    async def fn(m, k):
        slept, woke = [], []
        t0 = m.sched.now

        def sleeper(name):
            async def go():
                slept.append(name)
                await m.sched.sleep(DUE[name])  # no point before it: all sleep at t0
                woke.append((name, m.sched.now - t0))
            return go

        await together(m, **{name: sleeper(name) for name in DUE})
        return slept, woke

    m, k = machine(mode=mode, seed=5)
    slept, woke = run(m, k, fn, check=False)
    want = sorted(DUE, key=lambda n: (DUE[n], slept.index(n)))
    assert woke == [(n, DUE[n]) for n in want]
    if mode == "free":  # spawn order
        assert slept == list(DUE)
        assert [n for n, _ in woke] == ["E", "B", "C", "F", "D", "A"]
    else:
        assert slept != list(DUE)  # seed 5 starts them in another order


# ----------------------------------------------------------------- trace files
def test_trace_files_are_byte_identical_for_the_same_seed(tmp_path):
    """trace_file: canonical JSON lines (sorted keys; seq, t, actor, event and the
    event's fields), nothing from the host, so the same seed writes the same bytes."""
    prog = TWO_CPU_FAULT
    paths = []
    for i, seed in enumerate((5, 5, 6)):
        path = tmp_path / f"t{i}.jsonl"
        with open(path, "w") as f:
            rep = runner.run_program(str(prog), cpus=2, seed=seed, mode="random",
                                     trace_file=f)
        paths.append((path, rep))
    (p0, r0), (p1, r1), (p2, r2) = paths
    assert p0.read_bytes() == p1.read_bytes()
    assert p0.read_bytes() != p2.read_bytes()
    lines = p0.read_text().splitlines()
    # one line per point; a sleep takes a sequence number but writes no line, and the
    # only sleep here is kswapd's first HZ/10 nap (kswapd_try_to_sleep) at start-up
    assert len(lines) == r0["run"]["events"] - 1 > 100
    events = list(read_trace(str(p0)))
    assert len(events) == len(lines)
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in zip(seqs, seqs[1:]))
    ts = [e["t"] for e in events]
    assert all(a <= b for a, b in zip(ts, ts[1:]))
    for line, e in zip(lines, events):
        assert {"seq", "t", "actor", "event"} <= set(e)
        assert line == json.dumps(e, sort_keys=True)  # canonical: sorted keys
    assert r0["run"]["trace_sha256"] == r1["run"]["trace_sha256"] != r2["run"]["trace_sha256"]


class _RenderedTrace:
    """The trace as it was before the cheap digest: every point rendered by structlog
    and the line hashed (the reference the JSON lines must still match)."""

    cheap = False

    def __init__(self, sink) -> None:
        import structlog
        self.sink = sink
        self._hash = hashlib.sha256()
        self._render = structlog.processors.JSONRenderer(sort_keys=True)

    def emit(self, seq, t, actor, event, fields) -> None:
        line = self._render(None, "msg", {"seq": seq, "t": t, "actor": actor,
                                          "event": event, **fields})
        self._hash.update(line.encode())
        self.sink.write(line)
        self.sink.write("\n")


@pytest.mark.parametrize("mode,seed", [("free", 1), ("random", 5)])
def test_trace_file_lines_are_those_the_rendered_trace_wrote(mode, seed):
    """The cheap digest changed no line: with a sink, Trace writes byte for byte what
    rendering every point with structlog wrote, and the digest does not depend on
    whether lines are written (the same run without a sink gives the same digest, and
    the same emulated clock)."""
    ref, new = _Lines(), _Lines()
    runs = []
    for trace in (_RenderedTrace(ref), Trace(new), Trace()):
        m = Machine(MachineConfig(memory=64 * MiB, cpus=2, seed=seed), mode=mode,
                    seed=seed, trace=trace)
        assert run(m, Kernel(m), lambda m, k: race(k)) == {"lost_bytes": 0}
        runs.append(m)
    # (free mode: the stores that hit the TLB are no events, docs/points.md class 5)
    assert "".join(new.buf) == "".join(ref.buf) and len(ref.buf) > 100
    assert runs[2].sched.quiet == (mode == "free")  # no sink: a tick and a fold, if free
    assert runs[1].sched.trace.digest() == runs[2].sched.trace.digest()
    assert runs[0].sched.seq == runs[1].sched.seq == runs[2].sched.seq
    assert runs[0].sched.now == runs[1].sched.now == runs[2].sched.now


class _Lines:
    """A text sink keeping the trace in memory."""

    def __init__(self) -> None:
        self.buf: list[str] = []

    def write(self, s: str) -> None:
        self.buf.append(s)

    def events(self):
        return [json.loads(line) for line in "".join(self.buf).splitlines() if line]


def test_digest_is_the_same_in_every_process():
    """The digest hashes the events' values (pickled), never a str's per-process hash: two
    processes with different hash seeds report the same digest."""
    import os
    import subprocess
    import sys
    digests = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-m", "kmm", "run", str(TWO_CPU_FAULT), "--cpus", "2",
             "--mode", "random", "--seed", "3", "--json"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed})
        digests.add(json.loads(out.stdout)["run"]["trace_sha256"])
    assert len(digests) == 1
