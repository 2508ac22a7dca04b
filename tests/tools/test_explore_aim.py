"""Bounded, spin-aware and aimed schedules (kmm/runtime/sched.py: max_points,
yield_spin, focus) and keep-going exploration (kmm/tools/explore.py)."""

from __future__ import annotations

import pathlib

import pytest

from kmm.runtime import sched as S
from kmm.tools import cli
from kmm.tools import explore as ex

ROOT = pathlib.Path(__file__).resolve().parents[2]

# CPU 1 busy-waits on a byte CPU 0 writes once: under a strict-priority schedule the
# waiter spins forever unless spinning lowers its priority
SPIN = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await p.store(a, bytes([0]))
    await p.store(a + 4096, bytes([0]))

    async def writer(cpu):
        q = p.on(cpu)
        await q.load(a + 4096)
        await q.store(a, bytes([1]))

    async def waiter(cpu):
        q = p.on(cpu)
        while (await q.load(a))[0] != 1:
            RELAX
        return "seen"

    _, seen = await k.parallel(writer, waiter)
    assert seen == "seen"
'''

# the wait never ends: nothing writes the byte
FOREVER = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await p.store(a, bytes([0]))

    async def idle(cpu):
        await p.on(cpu).load(a)

    async def waiter(cpu):
        q = p.on(cpu)
        while (await q.load(a))[0] != 1:
            k.cpu_relax()

    await k.parallel(idle, waiter)
'''

# two distinct bugs: an assertion on odd seeds' schedules, a KeyError on the others
TWO_BUGS = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await p.store(a, bytes([0]))
    order = []

    async def one(cpu):
        await p.on(cpu).load(a)
        order.append(1)

    async def two(cpu):
        await p.on(cpu).load(a)
        order.append(2)

    await k.parallel(one, two)
    if order == [2, 1]:
        assert False, "two before one"
    {}[order[0] * 0x1000]
'''


def _write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("relax", ["k.cpu_relax()", "pass"])
def test_pct_lets_a_busy_wait_end(tmp_path, relax):
    """A busy-wait (explicit cpu_relax, or a load of one address repeated: detected as
    a spin) under pct with no change point: the spinning actor's priority drops below
    the writer's, which then runs; every schedule ends, no livelock."""
    prog = _write(tmp_path, "spin.py", SPIN.replace("RELAX", relax))
    cfg = ex.Config(program=prog, mode="pct", depth=1, max_points=20000)
    summ = ex.explore(cfg, 12, keep_going=True)
    assert summ.schedules == 12 and summ.distinct == []


def test_preempt_bound_0_lets_a_busy_wait_end(tmp_path):
    """Non-preemptive scheduling switches away from a spinning actor (a yield, not a
    preemption), so the schedule with no preemption ends too."""
    prog = _write(tmp_path, "spin.py", SPIN.replace("RELAX", "k.cpu_relax()"))
    cfg = ex.Config(program=prog, mode="preempt", max_points=20000)
    out = ex.run_schedule(cfg, "preempt", 1, {"plan": set()})
    assert out.kind is None and out.preemptions == 0


def test_a_wait_that_never_ends_is_a_livelock_with_its_cycle(tmp_path, capsys):
    prog = _write(tmp_path, "forever.py", FOREVER)
    cfg = ex.Config(program=prog, mode="random", max_points=3000)
    out = ex.run_schedule(cfg, "random", 1, {})
    assert out.kind == "livelock"
    lines = out.message.splitlines()
    assert lines[0].startswith("livelock: schedule exceeded 3000 points")
    waiter = [ln for ln in lines if ln.startswith("  cpu1")]
    assert waiter and "cycle of 1 " in waiter[0] + " "
    assert lines[lines.index(waiter[0]) + 1].strip().startswith("load addr=0x")
    # the CLI: a verdict, a failure file; the default bound is 50x the first run
    out_file = tmp_path / "F.jsonl"
    rc = cli.main(["explore", prog, "--schedules", "2", "--quiet", "--max-points", "2000",
                   "--out", str(out_file)])
    text = capsys.readouterr().out
    assert rc == 1 and "livelock" in text and "exceeded 2000 points" in text
    head, _ = ex.read_failure(str(out_file))
    assert head["max_points"] == 2000 and head["violation"]["kind"] == "livelock"


def test_default_bound_is_50_times_the_first_run():
    prog = str(ROOT / "workloads" / "two_cpu_fault.py")
    cfg = ex.Config(program=prog, mode="random")
    summ = ex.explore(cfg, 1)
    _, points = ex.measure(ex.Config(program=prog, mode="random"))
    assert summ.max_points == ex.LIVELOCK_FACTOR * max(points, 1000)


def test_focus_matcher_terms():
    m = S.focus_matcher(["pmdp_get_and_clear", "lock:ptl_pmd", "fn:test_focus_matcher_terms"])
    assert m("pmdp_get_and_clear", {"i": 1})
    assert m("lock", {"lock": "ptl_pmd:0x4", "class": "ptlock_pmd", "site": "x"})
    assert m("pte_read", {})  # called from inside the named function
    only_lock = S.focus_matcher(["lock:ptl_pmd"])
    assert not only_lock("lock", {"lock": "ptl_pte:0x9", "class": "ptlock_pte"})
    assert not only_lock("pmd_read", {})
    assert S.focus_matcher(["collapse_huge_page"])("lock", {"site": "collapse_huge_page"})
    assert S.focus_matcher([]) is None
    with pytest.raises(ValueError):
        S.focus_matcher(["nosuch:x"])


def _steps(mode, seed, focus, **params):
    """Three actors of 6 points each ("hot" at the 3rd, "step" elsewhere); the order in
    which the points ran."""
    from kmm import testing
    from kmm.machine import Machine, MachineConfig
    m = Machine(MachineConfig(memory=64 << 20, cpus=2, seed=seed), mode="free", seed=seed)
    m.sched.configure(mode, seed, focus=focus, **params)
    log = []

    async def driver():
        def body(name):
            async def go():
                for i in range(6):
                    await m.sched.point("hot" if i == 2 else "step", i=i)
                    log.append((name, i))
            return go
        await testing.together(m, A=body("A"), B=body("B"), C=body("C"))

    m.run(driver)
    return m, log


@pytest.mark.parametrize("mode,params", [("random", {}), ("preempt", {"bound": 2, "n": 3}),
                                          ("pct", {"depth": 3, "n": 3})])
def test_focus_places_every_switch_right_after_a_matching_point(mode, params):
    """With --focus hot, random and preempt switch away from a runnable actor only
    right after a "hot" point, and pct's change points fall only there."""
    for seed in range(1, 9):
        m, log = _steps(mode, seed, S.focus_matcher(["hot"]), **params)
        for (prev, i), (nxt, _) in zip(log, log[1:]):
            # an entry is logged once its point returned: a switch at A's "hot" point
            # shows as A's entry 1 followed by another actor's (or A had finished)
            if nxt != prev and i != 5:
                assert i == 1, (mode, seed, log)
        assert m.sched.focus_points == 3
    m, log = _steps("random", 1, None)
    assert any(a != b and i not in (1, 5) for (a, i), (b, _) in zip(log, log[1:]))


def test_keep_going_groups_violations_by_kind_and_site(tmp_path, capsys):
    prog = _write(tmp_path, "two.py", TWO_BUGS)
    out_file = tmp_path / "F.jsonl"
    rc = cli.main(["explore", prog, "--schedules", "16", "--quiet", "--keep-going",
                   "--out", str(out_file)])
    text = capsys.readouterr().out
    assert rc == 1
    assert "2 distinct violations in 16 schedules" in text
    # the program's own KeyError is its error, not the kernel's
    assert "assertion at" in text and "program-error at" in text and "KeyError: N" in text
    assert out_file.exists() and (tmp_path / "F-2.jsonl").exists()
    summ = ex.explore(ex.Config(program=prog), 16, keep_going=True)
    kinds = {d["kind"]: d for d in summ.distinct}
    assert set(kinds) == {"assertion", "program-error"}
    assert sum(d["count"] for d in summ.distinct) == 16
    assert min(d["first"] for d in summ.distinct) == 0


def test_race_munmap_collapse_finishes_every_pct_schedule():
    """The program's busy-wait (round 2) hung most PCT schedules before spinning lowered
    the waiter's priority (issue 18): each of these ends, clean, within its bound."""
    prog = str(ROOT / "workloads" / "race_munmap_collapse.py")
    summ = ex.explore(ex.Config(program=prog, mode="pct", depth=3), 8, keep_going=True)
    assert summ.schedules == 8 and summ.distinct == []
