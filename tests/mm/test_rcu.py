"""RCU-deferred freeing of page tables (kmm/rcupdate.py, pgtable_generic.pte_free_defer).

6.18's MADV_DONTNEED frees the PTE tables it empties (mm/pt_reclaim.c) through
tlb_remove_table, i.e. after an RCU grace period, because the fault path reads the PMD
and the PTE table it points to locklessly under rcu_read_lock (__pte_offset_map). Before
kmm modelled that, a PCT schedule of race_dontneed_fault made handle_pte_fault read a
table pt_reclaim had just returned to the buddy allocator (a KeyError).
"""

from __future__ import annotations

import pathlib

from kmm import atomic, memory, rcupdate
from kmm.pgtable import pmd_index, table_pfn
from kmm.testing import run_machine, together
from kmm.tools import explore as ex

MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parents[2]


async def _four_kib_pages(k):
    p = await k.process("main")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "nohugepage")
    a2 = (a + 2 * MiB - 1) & ~(2 * MiB - 1)
    await p.touch(a2, 2 * MiB)  # one full PTE table, which DONTNEED empties
    return p, a2


def test_pt_reclaim_frees_the_table_only_after_the_readers_grace_period():
    """A reader inside rcu_read_lock that saw the PMD keeps the detached table (its
    entries, its lock, its page) allocated; its rcu_read_unlock ends the grace period
    and frees it. Without RCU the table was freed at once under the reader."""
    seen = {}

    async def fn(m, k):
        p, a = await _four_kib_pages(k)
        mm = p.task.mm
        pmd_tbl = memory.pmd_lookup(m, mm, a)
        rcupdate.rcu_read_lock(m)
        pte_tbl = table_pfn(await atomic.entry_read(m, "pmd", pmd_tbl, pmd_index(a)))
        pages_before = m.vmstat.node["nr_page_table_pages"]

        async def dropper():
            assert await p.on(1).madvise(a, 2 * MiB, "dontneed") == 0

        await together(m, dropper=dropper)
        # detached: the PMD is clear and the mm no longer counts the table ...
        assert m.physmem.tables[pmd_tbl][pmd_index(a)] == 0
        assert mm.pgtables_bytes == 3 * 4096  # pgd, pud, pmd, and no PTE table
        # ... but the reader may still read it and take its lock
        assert not any(m.physmem.tables[pte_tbl])
        assert m.table_lock(pte_tbl) is not None
        assert not m.zone.is_free(pte_tbl)
        assert m.vmstat.node["nr_page_table_pages"] == pages_before
        assert len(m.rcu.pending) == 1
        await rcupdate.rcu_read_unlock(m)
        seen["freed"] = m.zone.is_free(pte_tbl) and pte_tbl not in m.physmem.tables
        seen["pages"] = pages_before - m.vmstat.node["nr_page_table_pages"]
        seen["pending"] = len(m.rcu.pending)

    run_machine(fn, cpus=2)
    assert seen == {"freed": True, "pages": 1, "pending": 0}


def test_call_rcu_with_no_reader_frees_at_once():
    """With no actor inside a read-side section the callback runs in call_rcu: a run
    without a concurrent walker frees exactly when it did before RCU was modelled."""
    seen = {}

    async def fn(m, k):
        p, a = await _four_kib_pages(k)
        pte_tbl = table_pfn(m.physmem.tables[memory.pmd_lookup(m, p.task.mm, a)][pmd_index(a)])
        assert await p.madvise(a, 2 * MiB, "dontneed") == 0
        seen["freed"] = m.zone.is_free(pte_tbl)
        seen["pending"] = len(m.rcu.pending)

    run_machine(fn)
    assert seen == {"freed": True, "pending": 0}


def test_nested_read_sections_end_the_grace_period_at_the_outermost_unlock():
    log = []

    async def fn(m, k):
        async def cb():
            log.append("freed")

        rcupdate.rcu_read_lock(m)
        rcupdate.rcu_read_lock(m)
        await rcupdate.call_rcu(m, cb)
        await rcupdate.rcu_read_unlock(m)
        log.append("inner unlock")
        assert rcupdate.rcu_read_lock_held(m)
        await rcupdate.rcu_read_unlock(m)
        assert not rcupdate.rcu_read_lock_held(m)
        # a section that starts after call_rcu does not delay the callback
        rcupdate.rcu_read_lock(m)
        await rcupdate.call_rcu(m, cb)
        rcupdate.rcu_read_lock(m)
        await rcupdate.rcu_read_unlock(m)
        await rcupdate.rcu_read_unlock(m)

    run_machine(fn)
    assert log == ["inner unlock", "freed", "freed"]


def test_race_dontneed_fault_pct_schedule_that_read_a_freed_table():
    """The PCT schedule (seed 203, depth 3) in which handle_pte_fault read the PTE
    table MADV_DONTNEED's pt_reclaim had freed (KeyError) now runs clean. (It also
    caught the incremental data check reading a byte through a freed table's stale
    place: kmm/checks_data.py forgets every place whose path changed.)"""
    cfg = ex.Config(program=str(ROOT / "workloads" / "race_dontneed_fault.py"), mode="pct",
                    depth=3)
    cfg.n, _ = ex.measure(cfg)
    mode, seed, params = ex.schedule_params(cfg, 202)
    out = ex.run_schedule(cfg, mode, seed, params)
    assert (out.kind, out.message) == (None, "")
