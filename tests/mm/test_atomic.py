"""The shared-state layer (kmm/atomic.py): strict mode rejects a change made outside it,
and catches an access that a removed point (docs/points.md) assumed impossible."""

from __future__ import annotations

import pytest

from kmm import atomic, testing
from kmm.machine import Machine, MachineConfig
from kmm.mmdebug import StrictError
from kmm.pgtable import pte_index, pte_pfn, table_pfn

from tests.mm.test_huge_memory import MiB, pmd_at


def run(fn, **kw):
    m, value = testing.run_machine(fn, **kw)
    assert m.strict  # tests/conftest.py: strict everywhere
    return value


async def _small_region(k, pages=4):
    p = await k.process()
    a = await p.mmap(pages << 12)
    await p.madvise(a, pages << 12, "nohugepage")
    await p.touch(a, pages << 12)
    return p, a


def test_strict_rejects_a_struct_page_write_outside_the_layer_and_names_it():
    async def fn(m, k):
        p, a = await _small_region(k)
        t, pmd = pmd_at(m, p.task.mm, a)
        folio = m.physmem.folio(pte_pfn(m.physmem.tables[table_pfn(pmd)][pte_index(a)]))
        with pytest.raises(StrictError, match=r"refcount of page .* by .*test_atomic.py"):
            folio.refcount += 1
        with pytest.raises(StrictError, match="flags"):
            folio.flags = 0
        atomic.folio_ref_add_locked(folio)   # through the door: fine
        atomic.folio_ref_sub_locked(folio)
    run(fn)


def test_strict_rejects_an_entry_store_and_a_queue_change_outside_the_layer():
    async def fn(m, k):
        p, a = await _small_region(k)
        t, pmd = pmd_at(m, p.task.mm, a)
        with pytest.raises(StrictError, match="page-table entry"):
            m.physmem.tables[table_pfn(pmd)][pte_index(a)] = 0
        with pytest.raises(StrictError, match="deferred_split_queue"):
            m.deferred_split_queue[1] = None
        with pytest.raises(StrictError, match="lru:inactive_anon"):
            m.lruvec.lists["inactive_anon"].clear()
        with pytest.raises(StrictError, match="waitqueues"):
            m.waitqueues["kswapd_wait"] = ()
    run(fn)


def test_without_strict_mode_nothing_is_guarded():
    m = Machine(MachineConfig(memory=64 * MiB), strict=False)
    pg = m.physmem.page(100)
    pg.refcount = 3   # no guard, no cost
    assert type(pg).__name__ == "Page" and pg.refcount == 3


def test_an_unpointed_pte_write_needs_the_table_lock_and_an_mm_no_cpu_runs():
    """entry_set_unwalked (fork's child tables) assumes the actor holds the table lock
    and no CPU walks the table: on a running mm's table, it raises."""
    async def fn(m, k):
        p, a = await _small_region(k)
        t, pmd = pmd_at(m, p.task.mm, a)
        tbl = table_pfn(pmd)
        old = m.physmem.tables[tbl][pte_index(a)]
        with pytest.raises(StrictError, match="its lock is not held"):
            atomic.entry_set_unwalked(m, "pte", tbl, pte_index(a), old)
        ptl = m.table_lock(tbl)
        await ptl.lock("test")
        try:  # locked, but the process ran on a CPU: a hardware walker may read it
            with pytest.raises(StrictError, match="runs on CPUs"):
                atomic.entry_set_unwalked(m, "pte", tbl, pte_index(a), old)
        finally:
            await ptl.unlock()
    run(fn)


def test_a_clear_without_a_point_needs_a_page_no_one_else_reaches():
    async def fn(m, k):
        p, a = await _small_region(k)
        t, pmd = pmd_at(m, p.task.mm, a)
        pfn = pte_pfn(m.physmem.tables[table_pfn(pmd)][pte_index(a)])
        with pytest.raises(StrictError, match="assumed page .* owned"):
            atomic.step_owned(m, "clear_page", 1, pfn)
    run(fn)


def test_a_zone_step_without_a_point_needs_the_zone_lock():
    async def fn(m, k):
        with pytest.raises(StrictError, match="assumed zone.Normal held"):
            atomic.step_locked(m, m.zone.lock, "rmqueue", 1, order=0, pfn=0)
    run(fn)


def test_set_ptes_into_a_linked_table_raises():
    """set_ptes_table assumes the table is withdrawn (no PMD entry links it)."""
    async def fn(m, k):
        p, a = await _small_region(k)
        pmd_tbl, pmd = pmd_at(m, p.task.mm, a)
        tbl = table_pfn(pmd)
        ptl = m.table_lock(pmd_tbl)
        await ptl.lock("test")
        try:
            with pytest.raises(StrictError, match="unreachable"):
                atomic.set_ptes_table(m, tbl, list(m.physmem.tables[tbl]), pmd_tbl)
        finally:
            await ptl.unlock()
    run(fn)


def test_a_4k_fault_offers_30_choices_for_33_events():
    """A 4K fault in a mapped table offers 30 scheduling choices for its 33 events."""
    async def fn(m, k):
        p, a = await _small_region(k, pages=1)   # the page tables exist from here on
        b = await p.mmap(64 << 12)
        await p.madvise(b, 64 << 12, "nohugepage")
        await p.touch(b, 1)
        s0, e0 = m.sched.points, m.sched.seq
        await p.touch(b + (10 << 12), 1)
        return m.sched.points - s0, m.sched.seq - e0
    points, events = run(fn, mode="random", cpus=1)
    assert (points, events) == (30, 33)  # handle_mm_fault, rmqueue, clear_page: steps
