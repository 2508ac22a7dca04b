"""Modelled kernel locks (kmm/locking.py, kmm/lockdep.py): lockdep's reports, the
mm/rmap.c lock order, lock_stat in /proc/lock_stat's fields, and rw_semaphore fairness.

lockdep (kernel/locking/lockdep.c) reports a possible deadlock from the order in which
lock classes were taken, even on a run that did not deadlock, and names the acquisition
sites; lock_stat (Documentation/locking/lockstat.rst) counts contentions, acquisitions,
bounces and wait/hold times per class.
"""

from __future__ import annotations

import functools

from conftest import run as crun

from kmm import testing

import pytest

from kmm.locking import COST_LOCK, LOCK_STAT_FIELDS
from kmm.lockdep import ORDER, LockdepSplat

MiB = 1 << 20


quiet_check = testing.check_between_ops

run = functools.partial(crun, memory=64 * MiB, cpus=2, check=testing.check_between_ops,
                        machine=True)

together = testing.together

# ---------------------------------------------------------------------- lockdep
def test_abba_between_two_classes_is_reported_without_a_deadlock():
    """lockdep records the class order A -> B from the first actor; the second actor
    taking B then A closes a cycle and is reported as a possible circular locking
    dependency, naming the sites of both orders, although the run itself never
    deadlocked (the first actor had released both locks long before)."""
    async def fn(m, k):
        la = m.locks.spinlock("i_mmap_rwsem", "i_mmap:1")
        lb = m.locks.spinlock("swap_lock", "swap_lock")

        async def first():
            await la.lock("first_takes_A")
            await lb.lock("first_takes_B")
            await lb.unlock()
            await la.unlock()

        async def second():
            await lb.lock("second_takes_B")
            await la.lock("second_takes_A")

        await together(m, first=first, second=second)

    with pytest.raises(LockdepSplat) as ei:
        run(fn)
    msg = str(ei.value)
    assert msg.startswith("WARNING: possible circular locking dependency detected")
    for site in ("second_takes_A", "second_takes_B", "first_takes_A", "first_takes_B"):
        assert site in msg
    assert "second is trying to acquire i_mmap_rwsem" in msg


def test_abba_is_reported_whichever_actor_runs_first():
    """In random mode the two orders meet in either sequence; a splat in every seed."""
    async def fn(m, k):
        la = m.locks.spinlock("i_mmap_rwsem", "i_mmap:1")
        lb = m.locks.spinlock("swap_lock", "swap_lock")

        async def ab():
            await la.lock("ab_1")
            await lb.lock("ab_2")
            await lb.unlock()
            await la.unlock()

        async def ba():
            await lb.lock("ba_1")
            await la.lock("ba_2")
            await la.unlock()
            await lb.unlock()

        await together(m, ab=ab, ba=ba)

    for seed in range(6):
        with pytest.raises(LockdepSplat, match="circular locking dependency"):
            run(fn, mode="random", seed=seed)


def test_recursive_locking_of_one_lock():
    """Taking a lock one already holds is a self-deadlock: "possible recursive locking
    detected", naming where it was taken first."""
    async def fn(m, k):
        lk = m.locks.spinlock("ptlock_pmd", "ptl_pmd:0x10")
        await lk.lock("outer_site")
        await lk.lock("inner_site")

    with pytest.raises(LockdepSplat) as ei:
        run(fn)
    msg = str(ei.value)
    assert msg.startswith("WARNING: possible recursive locking detected")
    assert "ptl_pmd:0x10 at inner_site" in msg and "taken at outer_site" in msg


def test_same_class_without_nesting_annotation_is_recursive():
    """Two PTE locks of the same class without spin_lock_nested: lockdep cannot tell it
    from an ABBA between two instances, so it warns."""
    async def fn(m, k):
        a = m.locks.spinlock("ptlock_pte", "ptl_pte:0x1")
        b = m.locks.spinlock("ptlock_pte", "ptl_pte:0x2")
        await a.lock("dst")
        await b.lock("src")

    with pytest.raises(LockdepSplat, match="(?s)recursive locking.*of the same class"):
        run(fn)


def test_nested_same_class_with_subclass_1_is_allowed():
    """copy_pte_range / copy_huge_pmd: spin_lock_nested(src_ptl, SINGLE_DEPTH_NESTING)
    under the destination lock of the same class is the annotated, allowed nesting."""
    async def fn(m, k):
        a = m.locks.spinlock("ptlock_pte", "ptl_pte:0x1")
        b = m.locks.spinlock("ptlock_pte", "ptl_pte:0x2")
        await a.lock("copy_pte_range")
        await b.lock("copy_pte_range", subclass=1)
        await b.unlock()
        await a.unlock()
        return m.sched.current.held

    m, held = run(fn)
    assert held == []
    assert m.locks.stats["ptlock_pte"].acquisitions == 2


def test_outer_lock_under_inner_lock_violates_the_rmap_order():
    """mm/rmap.c: mmap_lock is taken before the page-table locks. Taking mmap_lock with
    a PTE lock held is reported at once, naming both classes and sites."""
    assert ORDER.index("mmap_lock") < ORDER.index("ptlock_pte")

    async def fn(m, k):
        mm = (await k.process()).task.mm
        ptl = m.locks.spinlock("ptlock_pte", "ptl_pte:0x99")
        await ptl.lock("zap_pte_range")
        await mm.mmap_lock.down_read("do_user_addr_fault")

    with pytest.raises(LockdepSplat) as ei:
        run(fn)
    msg = str(ei.value)
    assert msg.startswith("WARNING: lock order violation (mm/rmap.c order)")
    assert "mmap_lock:main (mmap_lock) at do_user_addr_fault" in msg
    assert "ptl_pte:0x99 (ptlock_pte), taken at zap_pte_range" in msg
    assert "mmap_lock must be taken before ptlock_pte" in msg


def test_rmap_order_taken_outermost_first_is_silent():
    """The documented order itself (mmap_lock -> folio lock -> anon_vma -> ptl ->
    split_queue_lock -> zone lock) raises nothing and leaves its edges in the graph."""
    async def fn(m, k):
        mm = (await k.process()).task.mm
        chain = [
            mm.mmap_lock,
            m.locks.spinlock("folio_lock", "folio:0x200"),
            m.locks.rwsem("anon_vma", "anon_vma:1"),
            m.locks.spinlock("ptlock_pmd", "ptl_pmd:0x3"),
            m.locks.spinlock("ptlock_pte", "ptl_pte:0x4"),
            m.split_queue_lock,
        ]
        for lk in chain:
            if hasattr(lk, "down_write"):
                await lk.down_write("chain")
            else:
                await lk.lock("chain")
        for lk in reversed(chain):
            if hasattr(lk, "up_write"):
                await lk.up_write()
            else:
                await lk.unlock()
        return m.locks.lockdep.graph()

    m, graph = run(fn)
    edges = {(a, b) for a, b, _, _ in graph}
    assert ("mmap_lock", "ptlock_pte") in edges and ("anon_vma", "split_queue_lock") in edges
    assert all(ORDER.index(a) < ORDER.index(b) for a, b in edges)


def test_a_real_workload_respects_the_order():
    """Faults, THP faults, splits, fork and exit on two CPUs: lockdep stays silent and
    its graph only has edges going inward in the rmap.c order."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(8 * MiB)
        await p.madvise(a, 4 * MiB, "hugepage")
        await k.parallel(lambda cpu: p.on(cpu).touch(a, 4 * MiB, value=1),
                         lambda cpu: p.on(cpu).touch(a + 4 * MiB, 4 * MiB, value=2))
        await p.madvise(a + 4096, 4096, "dontneed")
        c = await p.fork("c")
        await k.parallel(lambda cpu: c.on(cpu).touch(a, 8 * MiB, value=3, stride=MiB),
                         lambda cpu: p.on(cpu).touch(a, 8 * MiB, value=4, stride=MiB))
        await c.exit()
        await p.exit()
        return m.locks.lockdep.graph()

    for seed in (1, 2):
        m, graph = run(fn, mode="random", seed=seed)
        assert graph
        for a, b, _, _ in graph:
            assert ORDER.index(a) < ORDER.index(b), (a, b)


# -------------------------------------------------------------------- lock_stat
def test_lock_stat_counts_a_contention_and_its_wait():
    """A holds L across an emulated sleep of 1000 ns; B asks for L meanwhile. lock_stat:
    2 acquisitions, 1 contention, the wait is the time from B's attempt to A's release
    (the sleep), and B's acquisition and contention both moved the lock to another CPU
    (acq-bounces, con-bounces). Times in microseconds, as /proc/lock_stat prints them."""
    SLEEP = 1000

    async def fn(m, k):
        lk = m.locks.spinlock("test_class", "L")

        async def a():
            await lk.lock("a")       # t = t0 + C
            await m.sched.sleep(SLEEP)
            await lk.unlock()        # t = t0 + C + SLEEP + C: hands L to B

        async def b():
            await lk.lock("b")       # t = t0 + 2C: contended, blocks
            await lk.unlock()        # + C

        await together(m, A=a, B=b)

    m, _ = run(fn)
    (row,) = [r for r in m.locks.lock_stat() if r["class name"] == "test_class"]
    assert tuple(row) == LOCK_STAT_FIELDS
    us = lambda ns: round(ns / 1000, 2)  # noqa: E731
    C = COST_LOCK
    wait = (SLEEP + C) - C          # from B's attempt (t0+2C) to the hand-off (t0+C+SLEEP+C)
    hold_a = SLEEP + C              # A: from t0+C to its unlock at t0+C+SLEEP+C
    hold_b = C                      # B: from the hand-off to its own unlock
    assert row == {
        "class name": "test_class",
        "con-bounces": 1, "contentions": 1,
        "waittime-min": us(wait), "waittime-max": us(wait), "waittime-total": us(wait),
        "waittime-avg": us(wait),
        "acq-bounces": 1, "acquisitions": 2,
        "holdtime-min": us(hold_b), "holdtime-max": us(hold_a),
        "holdtime-total": us(hold_a + hold_b), "holdtime-avg": us((hold_a + hold_b) / 2),
    }


def test_lock_stat_of_two_cpus_faulting_one_thp():
    """Two CPUs write-fault the same PMD in random mode: somewhere the PMD lock or the
    allocator's zone lock is contended, and every row keeps lock_stat's arithmetic
    (avg = total / count, min <= avg <= max)."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await k.parallel(lambda cpu: p.on(cpu).touch(a, 2 * MiB, value=1, stride=8192),
                         lambda cpu: p.on(cpu).touch(a + 4096, 2 * MiB - 4096, value=2,
                                                     stride=8192))

    contended = 0
    for seed in range(4):
        m, _ = run(fn, mode="random", seed=seed)
        rows = m.locks.lock_stat()
        assert {r["class name"] for r in rows} >= {"mmap_lock", "ptlock_pmd", "zone_lock"}
        for r in rows:
            assert tuple(r) == LOCK_STAT_FIELDS
            assert r["acquisitions"] >= r["contentions"] >= 0
            if r["contentions"]:
                contended += 1
                assert r["waittime-min"] <= r["waittime-avg"] <= r["waittime-max"]
                assert r["waittime-avg"] == pytest.approx(
                    r["waittime-total"] / r["contentions"], abs=0.01)
            else:
                assert r["waittime-total"] == 0 and r["con-bounces"] == 0
    assert contended > 0


# ------------------------------------------------------------------------ rwsem
def test_rwsem_readers_share():
    """down_read by two actors at once: both hold it, no contention."""
    async def fn(m, k):
        sem = m.locks.rwsem("anon_vma", "anon_vma:7")
        inside = []

        def reader(name):
            async def go():
                await sem.down_read(name)
                inside.append(sorted(a.name for a in sem.readers))
                await m.sched.sleep(100)
                await sem.up_read()
            return go

        await together(m, R1=reader("R1"), R2=reader("R2"))
        return inside

    m, inside = run(fn)
    assert inside == [["R1"], ["R1", "R2"]]
    assert m.locks.stats["anon_vma"].contentions == 0
    assert m.locks.stats["anon_vma"].acquisitions == 2


def test_rwsem_queued_writer_blocks_new_readers():
    """A writer waiting behind a reader stops later readers from joining (rwsem's
    writer-starvation rule): the order of entry is R1, W, R2 though R2 asked while only
    a reader held the semaphore; readers woken together once the writer leaves."""
    async def fn(m, k):
        sem = m.locks.rwsem("mmap_lock", "mmap_lock:x")
        order = []

        async def r1():
            await sem.down_read("r1")
            order.append("R1")
            await m.sched.sleep(10_000)   # W and R2 queue meanwhile
            await sem.up_read()

        # the sleeps dwarf the few points R1 needs to take the semaphore, whatever the
        # scheduler runs first: emulated time only jumps when no actor is runnable
        async def w():
            await m.sched.sleep(1_000)
            await sem.down_write("w")
            order.append("W")
            assert not sem.readers
            await m.sched.sleep(100)
            await sem.up_write()

        async def r2():
            await m.sched.sleep(2_000)
            await sem.down_read("r2")  # a reader holds it, but W is queued
            order.append("R2")
            assert sem.writer is None
            await sem.up_read()

        await together(m, R1=r1, W=w, R2=r2)
        return order

    for mode, seed in (("free", 1), ("random", 3)):
        m, order = run(fn, mode=mode, seed=seed)
        assert order == ["R1", "W", "R2"]
        assert m.locks.stats["mmap_lock"].contentions == 2
