"""The lock study (kmm/tools/locks.py, ``kmm locks``): lock_stat, the lock-order graph and
who waited on whom, rebuilt from a run's trace alone.

lock_stat's fields are Documentation/locking/lockstat.rst's; the order graph is the one
lockdep (kernel/locking/lockdep.c) builds, one dependency per class held when another
is taken; collapse_huge_page (mm/khugepaged.c) takes mmap_lock for write, then the
anon_vma lock for write, then the PMD lock, the order of the comment atop mm/rmap.c.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kmm.machine import Machine, MachineConfig
from kmm.locking import COST_LOCK, LOCK_STAT_FIELDS
from kmm.runtime.trace import Trace
from kmm.testing import together
from kmm.tools import cli, locks, runner
from kmm.workload import Kernel

ROOT = Path(__file__).resolve().parents[2]
TWO_CPU_FAULT = str(ROOT / "workloads" / "two_cpu_fault.py")
COLLAPSE_RACE = str(ROOT / "workloads" / "khugepaged_collapse_race_fault.py")


def traced_program(path: str, seed: int) -> tuple[dict, list[dict]]:
    buf = io.StringIO()
    rep = runner.run_program(path, cpus=2, seed=seed, mode="random", trace_file=buf)
    return rep, [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.fixture(scope="module")
def collapse_run(tmp_path_factory):
    """One random run of the collapse race, its trace in a file: (report, path)."""
    path = tmp_path_factory.mktemp("locks") / "collapse.jsonl"
    with open(path, "w") as f:
        rep = runner.run_program(COLLAPSE_RACE, cpus=2, seed=2, mode="random", trace_file=f)
    return rep, path


def traced_machine(fn, *, mode: str = "free", seed: int = 1):
    """Run ``await fn(m, k)`` on a small machine writing its trace; (machine, events)."""
    buf = io.StringIO()
    m = Machine(MachineConfig(memory=64 << 20, cpus=2, seed=seed), mode=mode, seed=seed,
                trace=Trace(buf))
    k = Kernel(m)

    async def driver() -> None:
        await fn(m, k)

    m.run(driver)
    return m, [json.loads(line) for line in buf.getvalue().splitlines()]


# ------------------------------------------------------------- trace == machine
def test_lock_stat_from_the_trace_equals_the_machines(collapse_run):
    """For each run, the rows rebuilt from the trace are the report's "locks" rows
    (Locks.lock_stat()) field for field, and somewhere a lock was contended."""
    rep, path = collapse_run
    runs = [(rep, list(locks.read_events(str(path))))]
    runs += [traced_program(TWO_CPU_FAULT, seed) for seed in range(4)]
    for rep, events in runs:
        st = locks.study(events)
        assert st.lock_stat() == rep["locks"]
        assert st.open_at_end == 0
        assert all(tuple(r) == LOCK_STAT_FIELDS for r in st.lock_stat())
        assert any(r["acquisitions"] for r in rep["locks"])
    assert sum(r["contentions"] for rep, _ in runs for r in rep["locks"]) > 0
    assert sum(r["contentions"] for r in runs[0][0]["locks"]) > 0  # the collapse race


def test_contended_run_names_waiter_owner_and_wait():
    """A contended random run of two CPUs faulting one THP: the waits name a waiter and
    a different owner, both actors of the run, and for the split page-table locks (one
    owner each) the waits add up to lock_stat's contentions and total wait."""
    for seed in range(8):
        rep, events = traced_program(TWO_CPU_FAULT, seed)
        st = locks.study(events)
        if st.waits:
            break
    else:
        pytest.fail("no contended run in seeds 0..7")
    actors = {e["actor"] for e in events}
    rows = {r["class name"]: r for r in st.lock_stat()}
    for w in st.wait_rows():
        assert w["waiter"] != w["owner"]
        assert {w["waiter"], w["owner"]} <= actors
        assert w["count"] >= 1
    for cls, r in rows.items():
        if cls.startswith("ptlock_") and r["contentions"]:
            mine = [w for w in st.wait_rows() if w["class"] == cls]
            assert sum(w["count"] for w in mine) == r["contentions"]
            assert sum(w["wait-total"] for w in mine) == pytest.approx(r["waittime-total"],
                                                                       abs=0.01)


def test_trace_lines_carry_the_wait_and_hold_of_a_handoff():
    """A holds L across an emulated sleep of 1000 ns, B asks for L meanwhile: B's
    ``unlock`` line says it was contended, owned by A, and waited from its attempt to
    the hand-off (the sleep); A's hold runs from its lock to its unlock line."""
    SLEEP = 1000

    async def fn(m, k):
        lk = m.locks.spinlock("test_class", "L")

        async def a():
            await lk.lock("site_a")
            await m.sched.sleep(SLEEP)
            await lk.unlock()

        async def b():
            await lk.lock("site_b")
            await lk.unlock()

        await together(m, A=a, B=b)

    m, events = traced_machine(fn)
    mine = [e for e in events if e.get("lock") == "L"]
    assert [(e["actor"], e["event"]) for e in mine] == [
        ("A", "lock"), ("B", "lock"), ("A", "unlock"), ("B", "unlock")]
    lock_a, lock_b, unlock_a, unlock_b = mine
    assert lock_a["class"] == "test_class" and lock_a["site"] == "site_a"
    assert unlock_a["hold"] == unlock_a["t"] - lock_a["t"] == SLEEP + COST_LOCK
    assert "contended" not in unlock_a
    assert unlock_b["contended"] is True and unlock_b["owners"] == ["A"]
    assert unlock_b["wait"] == SLEEP  # from B's attempt to A's unlock
    assert unlock_b["site"] == "site_b" and unlock_b["acq_bounce"] == 1
    st = locks.study(events)
    assert st.wait_rows() == [{"waiter": "B", "class": "test_class", "owner": "A",
                               "count": 1, "wait-total": SLEEP / 1000,
                               "wait-max": SLEEP / 1000}]
    assert st.lock_stat() == m.locks.lock_stat()


def test_rwsem_mode_and_trylock_in_the_order_graph():
    """An rwsem's lines carry read/write; a lock taken by trylock is held (what is taken
    under it depends on it) but adds no dependency of its own; a failed trylock holds
    nothing."""
    async def fn(m, k):
        sem = m.locks.rwsem("mmap_lock", "mmap_lock:t")
        fl = m.locks.spinlock("folio_lock", "folio:1")
        busy = m.locks.spinlock("zone_lock", "zone:2")
        lru = m.locks.spinlock("lru_lock", "lru")

        async def a():
            await busy.lock("a_holds_zone2")
            await m.sched.sleep(10_000)
            await busy.unlock()

        async def b():
            await m.sched.sleep(100)
            await sem.down_read("b_reads")
            assert await fl.trylock("b_trylocks_folio1")
            assert not await busy.trylock("b_fails_zone2")
            await sem.up_read()
            await lru.lock("b_takes_lru")
            await lru.unlock()
            await fl.unlock()

        await together(m, A=a, B=b)

    m, events = traced_machine(fn)
    modes = {(e["event"], e.get("mode")) for e in events if e.get("lock") == "mmap_lock:t"}
    assert modes == {("lock", "read"), ("unlock", "read")}
    st = locks.study(events)
    assert {(e.outer, e.inner) for e in st.graph()} == {("folio_lock", "lru_lock")}
    (edge,) = st.graph()
    assert (edge.outer_site, edge.inner_site, edge.actor) == (
        "b_trylocks_folio1", "b_takes_lru", "B")
    assert set(m.locks.lockdep.edges) == {("folio_lock", "lru_lock")}
    assert st.lock_stat() == m.locks.lock_stat()


def test_order_graph_of_a_collapse():
    """MADV_COLLAPSE racing a writer: the graph holds collapse_huge_page's chain
    mmap_lock -> anon_vma -> ptlock_pmd, is exactly lockdep's own edge set, and no
    pair was taken in both orders."""
    mod = runner.load_program(COLLAPSE_RACE)
    m, events = traced_machine(lambda m, k: mod.main(k), mode="random", seed=2)
    st = locks.study(events)
    edges = {(e.outer, e.inner): e for e in st.graph()}
    assert ("mmap_lock", "anon_vma") in edges
    chain = edges[("anon_vma", "ptlock_pmd")]
    assert chain.outer_site == chain.inner_site == "collapse_huge_page"
    assert set(edges) == set(m.locks.lockdep.edges)
    assert st.both_orders() == [] and st.against_order() == []
    assert st.lock_stat() == m.locks.lock_stat()


def test_locks_held_when_the_run_stops_are_counted_by_neither():
    """A daemon still holding locks when the run ends (it is cancelled, as kswapd may be
    mid-shrink) is in neither table: lock_stat counts an acquisition when its hold ends,
    at the unlock line that carries its figures; the lock request stays open."""
    async def fn(m, k):
        held = m.locks.spinlock("held_class", "H")
        tried = m.locks.spinlock("tried_class", "T")
        done = m.locks.spinlock("done_class", "D")

        async def daemon():
            await held.lock("daemon_holds")
            assert await tried.trylock("daemon_trylocks")
            await m.sched.sleep(10 ** 9)

        m.sched.spawn(m.sched.nursery, "d", daemon, daemon=True, cpu=1)
        await m.sched.sleep(100)
        await done.lock("main_takes")
        await done.unlock()

    m, events = traced_machine(fn)
    st = locks.study(events)
    assert [r["class name"] for r in m.locks.lock_stat()] == ["done_class"]
    assert st.lock_stat() == m.locks.lock_stat()
    assert st.open_at_end == 1  # the lock line of H; a trylock's success is not known


def test_both_orders_are_flagged():
    """Two actors taking two classes in opposite orders (lockdep off, as an injected bug
    would leave it): the pair is flagged."""
    async def fn(m, k):
        m.locks.lockdep.enabled = False
        x = m.locks.spinlock("class_x", "X")
        y = m.locks.spinlock("class_y", "Y")

        async def first():
            await x.lock("first_x")
            await y.lock("first_y")
            await y.unlock()
            await x.unlock()

        async def second():
            await m.sched.sleep(1000)
            await y.lock("second_y")
            await x.lock("second_x")
            await x.unlock()
            await y.unlock()

        await together(m, first=first, second=second)

    _, events = traced_machine(fn)
    st = locks.study(events)
    assert st.both_orders() == [("class_x", "class_y")]


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content,why", [
    ('description = "x"\n', ":1: not a kmm trace (not a JSON line"),
    ('{"seq": 1, "t": 2, "actor": "a", "event": "x"}\n[1, 2]\n',
     ":2: not a kmm trace (a JSON line must be an object)"),
    ('{"vmstat": {}, "regions": {}}\n', ":1: not a kmm trace event (no int field 'seq'"),
    ('{"seq": 1, "t": 2, "actor": "a", "event": "lock", "lock": "L"}\n',
     ":1: lock event without a lock 'class'"),
    ("", ": empty file, not a kmm trace"),
    (b"\xff\xfe\x00junk", ":1: not a kmm trace (not UTF-8 text)"),
])
def test_a_file_that_is_not_a_trace_is_refused(tmp_path, capsys, content, why):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(locks.TraceError) as ei:
        locks.study_file(str(path))
    assert str(ei.value) == f"{path}{why}" or str(ei.value).startswith(f"{path}{why}")
    assert "\n" not in str(ei.value)
    assert cli.main(["locks", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kmm locks: {path}{why}") and err.count("\n") == 1


# ------------------------------------------------------------------------- CLI
def test_kmm_locks_prints_the_three_sections(collapse_run, capsys):
    rep, path = collapse_run
    assert cli.main(["locks", str(path)]) == 0
    out = capsys.readouterr().out
    for head in ("lock_stat (/proc/lock_stat fields, emulated us)",
                 "lock-order graph", "who waited on whom"):
        assert head in out
    assert "mmap_lock -> anon_vma" in out and "anon_vma -> ptlock_pmd" in out
    assert cli.main(["locks", str(path), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["lock_stat"] == rep["locks"]
    assert {"outer": "anon_vma", "inner": "ptlock_pmd"}.items() <= next(
        e for e in js["order"] if e["outer"] == "anon_vma" and e["inner"] == "ptlock_pmd"
    ).items()
    assert js["waits"] and all(w["waiter"] != w["owner"] for w in js["waits"])
