"""Splitting the huge page itself: split_huge_page_to_list_to_order (__folio_split),
remap_page, the deferred split shrinker and thp_underused (mm/huge_memory.c).

Expected values come from kernel-thp-reference.md section 5 (the __folio_split sequence,
the deferred split queue and the underused shrinker) and 10.2 (split_huge_page_test),
or from arithmetic on HPAGE_PMD_NR; the invariant checker runs after every operation.
"""

from __future__ import annotations

import pathlib

import pytest

from kmm import atomic, huge_memory, swap, testing
from kmm.mm_types import PG_anon_exclusive, PG_lru
from kmm.pgtable import HPAGE_PMD_NR, PAGE_SIZE, pmd_pfn, pmd_trans_huge, pte_pfn
from kmm.task_mmu import smaps_range

from tests.mm.test_huge_memory import MiB, ev, pmd_at, run, thp_region

NR = HPAGE_PMD_NR
WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"


def ptes(m, mm, addr):
    t, pmd = pmd_at(m, mm, addr)
    assert not pmd_trans_huge(pmd)
    from kmm.pgtable import table_pfn
    return m.physmem.tables[table_pfn(pmd)]


def test_split_pmd_mapped_thp_gives_512_order0_folios():
    """__folio_split of a PMD-mapped THP (5.2): try_to_migrate splits the PMD with
    freeze (thp_split_pmd), the folio becomes 512 order-0 folios, remap_page maps each
    by one PTE again (exclusive, refcount 1 = one mapping), on the LRU; counted as
    thp_split_page; Rss unchanged, AnonHugePages gone, every byte intact."""
    async def fn(m, k):
        p, a = await thp_region(k, value=5)
        mm = p.task.mm
        head = pmd_pfn(pmd_at(m, mm, a)[1])
        assert await p.split_huge_page(a) == 1
        assert (ev(m, "thp_split_page"), ev(m, "thp_split_pmd"),
                ev(m, "thp_split_page_failed")) == (1, 1, 0)
        table = ptes(m, mm, a)
        for i in range(NR):
            assert pte_pfn(table[i]) == head + i
            pg = m.physmem.pages[head + i]
            assert (pg.order, pg.head, pg.refcount, pg.mapcount) == (0, head + i, 1, 1)
            assert pg.flags & PG_anon_exclusive and pg.flags & PG_lru
        assert m.lruvec.nr_pages["inactive_anon"] == NR
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 0)
        assert await p.verify() == []
    run(fn)


def test_split_pte_mapped_thp():
    """__folio_split of a PTE-mapped THP (the PMD was split by a partial mprotect):
    try_to_migrate turns its PTEs into migration entries one by one, which leaves the
    folio partially mapped on the way (thp_deferred_split_page, as the host counts for
    split_folio of a PTE-mapped THP in cold_pte_mapped_partial), no further
    thp_split_pmd; 512 order-0 folios come back mapped, every byte intact."""
    async def fn(m, k):
        p, a = await thp_region(k, value=4)
        mm = p.task.mm
        head = pmd_pfn(pmd_at(m, mm, a)[1])
        assert await p.mprotect(a, PAGE_SIZE, "r") == 0
        assert ev(m, "thp_split_pmd") == 1 and m.physmem.pages[head].order == 9
        assert await p.split_huge_page(a) == 1
        assert (ev(m, "thp_split_page"), ev(m, "thp_split_pmd"),
                ev(m, "thp_deferred_split_page")) == (1, 1, 1)
        assert not m.deferred_split_queue  # the split took it off the queue
        table = ptes(m, mm, a)
        for i in range(NR):
            pg = m.physmem.pages[head + i]
            assert (pg.order, pg.refcount, pg.mapcount) == (0, 1, 1)
            assert pte_pfn(table[i]) == head + i
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 0)
        assert await p.verify() == []
    run(fn)


def test_split_zero_subpages_go_to_the_shared_zero_page():
    """RMP_USE_SHARED_ZEROPAGE (5.2 step 9, selftest split_pmd_zero_pages): after a
    successful anonymous split, subpages holding only zeros are remapped to the shared
    zero page and freed: one written page keeps Rss at 4 kB and 511 frames return."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a + 7 * PAGE_SIZE, 1, value=9)
        free_before = m.zone.nr_free
        assert await p.split_huge_page(a) == 1
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (4, 0)
        assert m.zone.nr_free == free_before + NR - 1
        assert await p.load(a + 7 * PAGE_SIZE) == b"\x09"
        assert await p.load(a) == b"\x00"
    run(fn)


def test_split_refused_with_an_extra_pin():
    """can_split_folio (5.2 step 2): a reference beyond the mappings and the caller's
    (a GUP pin) makes the split fail with -EAGAIN before anything is unmapped: the PMD
    stays, thp_split_page_failed counts it."""
    async def fn(m, k):
        p, a = await thp_region(k)
        folio = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
        await atomic.folio_ref_add(m, folio, 1)   # the pin
        lk = m.folio_lock_of(folio)
        await lk.lock("test")
        await atomic.folio_ref_add(m, folio, 1)   # the caller's reference
        assert await huge_memory.split_folio_to_list(m, folio) == -huge_memory.EAGAIN
        await lk.unlock()
        await swap.folio_put(m, folio, 2)
        assert (ev(m, "thp_split_page"), ev(m, "thp_split_page_failed"),
                ev(m, "thp_split_pmd")) == (0, 1, 0)
        assert pmd_trans_huge(pmd_at(m, p.task.mm, a)[1])
        assert await p.verify() == []
    run(fn)


def test_split_pin_taken_after_unmap_leaves_the_thp_pte_mapped():
    """folio_ref_freeze failing (5.2 step 5): the mappings were already frozen into
    migration entries, so remap_page restores them into the still-large folio, now
    PTE-mapped (the PMD split is not undone): -EAGAIN, thp_split_pmd 1."""
    async def fn(m, k):
        p, a = await thp_region(k)
        mm = p.task.mm
        folio = m.physmem.page(pmd_pfn(pmd_at(m, mm, a)[1]))
        orig = huge_memory.rmap.try_to_migrate

        async def pin_after_unmap(m_, f, split_pmd):
            await orig(m_, f, split_pmd)
            atomic.folio_ref_add_locked(f)   # a racing lookup took a reference
        huge_memory.rmap.try_to_migrate = pin_after_unmap
        try:
            lk = m.folio_lock_of(folio)
            await lk.lock("test")
            await atomic.folio_ref_add(m, folio, 1)
            assert await huge_memory.split_folio_to_list(m, folio) == -huge_memory.EAGAIN
            await lk.unlock()
        finally:
            huge_memory.rmap.try_to_migrate = orig
        await swap.folio_put(m, folio, 2)
        assert (ev(m, "thp_split_page_failed"), ev(m, "thp_split_pmd")) == (1, 1)
        assert folio.order == 9 and folio.nr_pages_mapped == NR
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 0)
        assert await p.verify() == []
    run(fn)


@pytest.mark.parametrize("quirk", [False, True])
def test_split_of_a_thp_shared_after_fork(quirk):
    """A THP PMD-mapped by parent and child (5.2 step 3). With the stable fix the rmap
    walk freezes both PMDs and the split succeeds at once: 512 order-0 folios, each
    mapped twice and not exclusive. 6.11-6.18 before the fix ended the walk after the
    first PMD split: the child's PMD stays, the freeze fails (-EAGAIN,
    thp_split_page_failed) and the parent's mapping comes back PTE-mapped; the debugfs
    loop's next address then finds the still-large folio and splits it, freezing the
    child's PMD last. Either way every byte stays."""
    async def fn(m, k):
        if quirk:
            m.quirks.add("split_pmd_ends_walk")
        p, a = await thp_region(k)
        c = await p.fork("child")
        head = pmd_pfn(pmd_at(m, p.task.mm, a)[1])
        assert await p.split_huge_page(a) == 1
        assert (ev(m, "thp_split_page"), ev(m, "thp_split_pmd"),
                ev(m, "thp_split_page_failed")) == (1, 2, 1 if quirk else 0)
        for i in range(NR):
            pg = m.physmem.pages[head + i]
            assert (pg.order, pg.mapcount, pg.refcount) == (0, 2, 2)
            assert not pg.flags & PG_anon_exclusive
        await c.store(a, b"\x33")
        assert await p.load(a) == b"\x01" and await c.load(a) == b"\x33"
        assert await p.verify() == [] and await c.verify() == []
    run(fn)


def test_deferred_split_scan_splits_partially_mapped_thp_and_frees_the_rest():
    """deferred_split_scan (5.4): a THP partly unmapped is queued (thp_deferred_split_page);
    the shrinker splits it (thp_split_page) and the 256 unmapped subpages are freed."""
    async def fn(m, k):
        p, a = await thp_region(k)
        assert await p.munmap(a + 1 * MiB, 1 * MiB) == 0
        assert ev(m, "thp_deferred_split_page") == 1
        assert huge_memory.DeferredSplitShrinker().count_objects(m) == 1
        free_before = m.zone.nr_free
        assert await huge_memory.deferred_split_scan(m, 128) == 1
        assert ev(m, "thp_split_page") == 1
        assert m.zone.nr_free == free_before + NR // 2
        assert not m.deferred_split_queue
        assert smaps_range(m, p.task.mm, a, a + 1 * MiB) == (1024, 0)
        assert await p.verify() == []
    run(fn)


def test_underused_thp_split_honours_max_ptes_none():
    """thp_underused (5.4): with max_ptes_none 511 (default) nothing is underused; at 409
    a fully mapped THP with one written page (511 zero subpages > 409) is split by the
    shrinker (thp_underused_split_page) and the zero pages go to the shared zero page."""
    for max_none, expect in ((511, 0), (409, 1)):
        async def fn(m, k):
            p = await k.process()
            a = await p.mmap(2 * MiB)
            await p.madvise(a, 2 * MiB, "hugepage")
            await p.touch(a, 1, value=3)
            assert len(m.deferred_split_queue) == 1  # shrink_underused queues every THP
            assert await huge_memory.deferred_split_scan(m, 128) == expect
            assert ev(m, "thp_underused_split_page") == expect
            assert ev(m, "thp_deferred_split_page") == 0
            rss = smaps_range(m, p.task.mm, a, a + 2 * MiB)
            assert rss == ((4, 0) if expect else (2048, 2048))
            assert await p.verify() == []
        run(fn, knobs={"khugepaged/max_ptes_none": max_none})


def test_underused_needs_more_zero_pages_than_max_ptes_none():
    """thp_underused stops as soon as HPAGE_PMD_NR - max_ptes_none pages are non-zero:
    103 written pages at max_ptes_none 409 (409 zero, not more) is not underused."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 103 * PAGE_SIZE, value=3)
        assert await huge_memory.deferred_split_scan(m, 128) == 0
        assert ev(m, "thp_underused_split_page") == 0
        assert not m.deferred_split_queue   # dropped: neither partial nor underused
    run(fn, knobs={"khugepaged/max_ptes_none": 409})


@pytest.mark.parametrize("seed", range(12))
def test_split_races_with_writes_on_another_cpu(seed):
    """workloads/split_race.py: a split on one CPU while another writes through the same
    THPs. Faults on the migration entries wait for the split and retry
    (migration_entry_wait); every invariant holds between operations, both THPs are
    split (thp_split_page 2) and no written byte is lost."""
    from kmm.tools.runner import run_program
    rep = run_program(str(WORKLOADS / "split_race.py"), seed=seed, mode="random", cpus=2,
                      check=testing.check_between_ops)
    assert rep["result"] == {"split": 2, "lost_bytes": 0}
    assert rep["vmstat"]["thp_split_page"] == 2


UNDERUSED_RECLAIM = """
from kmm import vmscan_node


async def main(k):
    k.set_knob("khugepaged/max_ptes_none", 409)
    p = await k.process("main")
    a = await p.mmap(4 << 20)
    await p.madvise(a, 4 << 20, "hugepage")
    await p.store(a, b"\\x01")                  # underused: split
    await p.touch(a + (2 << 20), 2 << 20)        # fully used: dropped from the queue
    await vmscan_node.memcg_reclaim(k.machine)
    return k.vmstat()["thp_underused_split_page"]
"""


def test_deferred_split_scan_reference_is_counted_until_the_put(tmp_path):
    """deferred_split_scan holds a folio_try_get reference on each folio of its batch
    until its folio_put; the invariant checker, run at every point where no lock is
    held, must see that reference exactly while it exists, including at folio_put's
    own point, before the decrement (the explorer's race_reclaim_split found a check
    landing there)."""
    from kmm.tools import explore
    prog = tmp_path / "prog.py"
    prog.write_text(UNDERUSED_RECLAIM)
    out = explore.run_schedule(explore.Config(program=str(prog), check="point"),
                               "random", 1, {})
    assert out.kind is None, out.message
    assert out.result == 1


def test_split_keeps_the_new_folios_locked_until_remap():
    """__folio_split (6.18): the after-split folios inherit PG_locked and are unlocked
    only after remap_page, all but the caller's (the head, which the caller unlocks).
    A fault that finds a tail's migration entry in between sleeps on the tail's lock
    (migration_entry_wait_on_locked) instead of refaulting until the soft-lockup
    watchdog fires, which race_cow_split did under PCT when tails were unlocked at
    once."""
    seen = []

    async def fn(m, k):
        p, a = await thp_region(k, value=5)
        head = pmd_pfn(pmd_at(m, p.task.mm, a)[1])
        me = m.sched.current

        def owners():
            return {m.physmem.pages[head + i].lock.owner is me
                    if m.physmem.pages[head + i].lock else None for i in (1, 200, NR - 1)}

        def hook():
            op = m.sched.current.last_op
            if op in ("__split_unmapped_folio", "folio_unlock"):
                seen.append((op, owners()))
            elif op == "mm_split_huge_page":
                seen.append((op, owners(), m.physmem.pages[head].lock.owner is me))

        m.sched.on_point = hook
        assert await p.split_huge_page(a) == 1
        m.sched.on_point = None

    run(fn)
    # locked from the split through remap (the folio_unlock point comes before the
    # unlock takes effect), unlocked after; the head stays with the caller until then
    assert seen == [("__split_unmapped_folio", {True}), ("folio_unlock", {True}),
                    ("mm_split_huge_page", {False}, True)]
