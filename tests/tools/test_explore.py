"""The race laboratory's explorer (kmm/tools/explore.py) and the systematic scheduler
modes it drives (kmm/runtime/sched.py: pct, preempt).

The racy toy program is the textbook lost update: two CPUs each load a shared byte and
store it plus one, so an interleaving load, load, store, store leaves 1 where 2 was
meant; a non-preemptive schedule can never show it, one preemption can.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm import testing
from kmm.machine import Machine, MachineConfig
from kmm.runtime.trace import Trace
from kmm.tools import cli
from kmm.tools import explore as ex

MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parents[2]
TWO_CPU_FAULT = str(ROOT / "workloads" / "two_cpu_fault.py")

TOY = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await p.store(a, bytes([0]))

    async def inc(cpu):
        q = p.on(cpu)
        v = (await q.load(a))[0]
        await q.store(a, bytes([v + 1]))

    await k.parallel(inc, inc)
    assert (await p.load(a))[0] == 2, "lost update"
'''

URANDOM = '''
import os

async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 << 20)
    # host randomness the scheduler does not control picks the page
    off = (os.urandom(1)[0] % 64) * 4096
    await p.touch(a + off, 4096, value=1)
'''


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "lost_update.py"
    path.write_text(TOY)
    return str(path)


# -------------------------------------------------------------------- schedulers
def _spawn_log(mode, seed=3, points=4, **params):
    """Three actors, each passing ``points`` points; the log of (actor, point no)."""
    m = Machine(MachineConfig(memory=64 * MiB, cpus=2, seed=seed), mode="free",
                seed=seed, trace=Trace())
    m.sched.configure(mode, seed, **params)
    log = []

    async def driver():
        def body(name):
            async def go():
                for i in range(points):
                    await m.sched.point("step", i=i)
                    log.append((name, i, m.sched.points))
            return go
        await testing.together(m, A=body("A"), B=body("B"), C=body("C"))

    return m, log, driver


def test_pct_depth_1_is_a_strict_priority_schedule():
    """PCT with depth 1 has no change point: the highest-priority runnable actor runs
    at every point, so each actor runs all its points in one stretch, in descending
    priority order."""
    for seed in (1, 2, 3, 4):
        m, log, driver = _spawn_log("pct", seed=seed, depth=1, n=100)
        m.run(driver)
        assert m.sched.change_points is None
        prio = {a.name: a.prio for a in m.sched.actors if a.name in "ABC"}
        assert all(p > 1 for p in prio.values())  # above the depth
        order = [name for name, _, _ in log]
        want = sorted(prio, key=lambda n: -prio[n])
        assert order == [n for n in want for _ in range(4)]


def test_pct_change_point_drops_the_running_actors_priority():
    """At change point i the running actor's priority becomes i (below every initial
    priority), so the next highest-priority actor takes over at that very point."""
    m, log, driver = _spawn_log("pct", seed=5, depth=2, n=100)
    # a dry run (depth 1) tells at which scheduler point the top actor's 2nd point falls
    m0, log0, d0 = _spawn_log("pct", seed=5, depth=1, n=100)
    m0.run(d0)
    top = log0[0][0]
    c = log0[1][2]
    m.sched.change_points = {c: 1}  # the single change point (i = 1) right there
    m.run(driver)
    prio = {a.name: a.prio for a in m.sched.actors if a.name in "ABC"}
    assert prio[top] == 1
    order = [name for name, _, _ in log]
    # its 1st point completes; at its 2nd it is demoted and the others run first
    assert order[0] == top and order[1] != top
    assert order[1:9].count(top) == 0 and order[9:] == [top] * 3


def test_preempt_bound_0_never_preempts():
    """preempt with no planned preemption: the running actor keeps the CPU while it can,
    so no choice differs from the non-preemptive default."""
    cfg = ex.Config(program=TWO_CPU_FAULT, mode="preempt")
    out = ex.run_schedule(cfg, "preempt", 1, {"plan": set()})
    assert out.kind is None and out.result == {"lost_bytes": 0}
    assert out.preemptions == 0 and out.overrides == {}
    assert out.opportunities > 10 and len(out.decisions) >= out.opportunities
    m, log, driver = _spawn_log("preempt", plan=set())
    m.run(driver)
    order = [name for name, _, _ in log]
    assert order == ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    assert m.sched.preemptions == 0


def test_preempt_plan_preempts_exactly_there():
    """A plan of one opportunity gives exactly one preempting switch."""
    m, log, driver = _spawn_log("preempt", plan={1})
    m.run(driver)
    assert m.sched.preemptions == 1 and len(m.sched.overrides) == 1


# ----------------------------------------------------------------------- explore
@pytest.mark.parametrize("mode", ["random", "pct"])
def test_lost_update_is_found(toy, mode):
    cfg = ex.Config(program=toy, mode=mode, seed=1, depth=ex.DEFAULT_DEPTH[mode])
    summ = ex.explore(cfg, 60)
    assert summ.first is not None and summ.first < 60
    assert summ.violations == {"assertion": 1}
    assert summ.schedules == summ.first + 1
    assert "lost update" in summ.first_violation["message"]


def test_failure_file_replays_and_is_minimal(toy, tmp_path, capsys):
    """explore writes the failure file; the minimized schedule has exactly one
    preemption (the lost update needs one); replay reruns it byte-identically."""
    out = tmp_path / "f.jsonl"
    rc = cli.main(["explore", toy, "--schedules", "60", "--seed", "1", "--quiet",
                   "--out", str(out)])
    assert rc == 1
    text = capsys.readouterr().out
    assert "first failing schedule" in text and "assertion" in text
    head = json.loads(out.read_text().splitlines()[0])
    assert head["format"] == ex.FORMAT and head["violation"]["kind"] == "assertion"
    assert head["minimized"]["count"] == 1
    assert head["preemptions_before"] >= 1
    assert len(head["decisions"]) >= 1
    events = [json.loads(ln) for ln in out.read_text().splitlines()[1:]]
    assert events and events[-1]["seq"] == head["minimized"]["violation"]["seq"]
    trace = tmp_path / "replay.jsonl"
    rc = cli.main(["replay", str(out), "--last", "5", "--trace", str(trace)])
    text = capsys.readouterr().out
    assert rc == 1, text  # the violation is there again: as explore, exit 1
    assert "reproduced" in text and "violation: assertion" in text
    lines = [ln for ln in text.splitlines() if ln.strip().split(" ")[0].isdigit()]
    assert len(lines) == 5 and "load" in lines[-1]
    written = [json.loads(ln) for ln in trace.read_text().splitlines()]
    assert written[-len(events):] == events  # the file's tail is the replayed trace
    ok, _, again, _ = ex.replay(str(out))
    assert ok and again.digest == head["minimized"]["digest"]


def test_jobs_do_not_change_the_result(toy):
    cfg = ex.Config(program=toy, mode="random", seed=1)
    one = ex.explore(cfg, 40)
    two = ex.explore(cfg, 40, jobs=2)
    assert one.first == two.first is not None
    assert one.schedules == two.schedules and one.violations == two.violations
    every1 = ex.explore(cfg, 24, all_=True)
    every2 = ex.explore(cfg, 24, jobs=2, all_=True)
    assert every1.violations == every2.violations and every1.schedules == 24


@pytest.mark.parametrize("mode", ["pct", "preempt"])
def test_ranges_of_an_exploration_run_its_schedules(toy, mode):
    """explore(start=i) runs schedule i of the one exploration, not schedule 0 of
    another: n (pct's points, preempt's opportunities) still comes from seed S's run,
    so one-schedule ranges fail at exactly the indices where one run of 80 fails (the
    lost update needs a preemption between load and store: first at schedule 58)."""
    def cfg():
        return ex.Config(program=toy, mode=mode, seed=1, depth=ex.DEFAULT_DEPTH[mode])
    whole = ex.explore(cfg(), 80, all_=True)
    failing = [i for i in range(50, 80)
               if ex.explore(cfg(), 1, start=i, all_=True).violations]
    assert failing and failing[0] == whole.first >= 50
    assert len(failing) == sum(whole.violations.values())
    # a range's first violation is an absolute schedule index
    tail = ex.explore(cfg(), 80 - 59, start=59)
    assert tail.first == next((i for i in failing if i >= 59), None)


def test_check_determinism_flags_host_randomness(tmp_path):
    path = tmp_path / "urandom.py"
    path.write_text(URANDOM)
    cfg = ex.Config(program=str(path), mode="random", seed=1)
    assert ex.explore(cfg, 3).first is None  # each run alone is fine
    summ = ex.explore(cfg, 5, determinism=True)
    assert summ.first_violation["kind"] == "nondeterminism"
    assert "digest" in summ.first_violation["message"]


def test_replay_refuses_a_changed_program(toy, tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    assert cli.main(["explore", toy, "--schedules", "60", "--quiet",
                     "--out", str(out)]) == 1
    capsys.readouterr()
    pathlib.Path(toy).write_text(TOY.replace("== 2", "== 2 or True"))
    assert cli.main(["replay", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed since the failure was recorded" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    assert cli.main(["replay", str(bad)]) == 2
    assert "not a kmm failure file" in capsys.readouterr().err


def test_two_cpu_fault_runs_clean(capsys):
    assert cli.main(["explore", TWO_CPU_FAULT, "--schedules", "20", "--quiet"]) == 0
    assert "20 schedules" in capsys.readouterr().out
