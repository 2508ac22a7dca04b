"""Migrating PMD-mapped THPs whole: PMD migration entries (mm/huge_memory.c
set_pmd_migration_entry / remove_migration_pmd, mm/rmap.c try_to_migrate_one's PMD
case), migrate_pages' large-folio paths (mm/migrate.c migrate_pages_batch: success,
-ENOMEM split fallback, the MR_NUMA_MISPLACED nosplit rule) and what zap, fork,
mprotect and smaps do with a PMD migration entry. Expected values follow from the
6.18 source named in each docstring."""

from __future__ import annotations

from kmm import atomic, huge_memory, migrate, page_alloc, rmap, swap
from kmm.mm_types import PG_anon_exclusive
from kmm.pgtable import (
    HPAGE_PMD_NR, SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, is_pmd_migration_entry,
    is_writable_migration_entry, migration_entry_pfn, pmd_pfn, pmd_trans_huge, pmd_write,
    swp_type,
)
from kmm.task_mmu import smaps_range

from tests.mm.test_huge_memory import MiB, deposits, ev, pmd_at, run, thp_region


async def _isolated_thp(m, p, a):
    t, pmd = pmd_at(m, p.task.mm, a)
    folio = m.physmem.page(pmd_pfn(pmd))
    assert folio.order == 9 and await swap.folio_isolate_lru(m, folio)
    return t, folio


def _thp_target(m):
    async def new(f):
        return await page_alloc.alloc_pages(m, f.order, "GFP_TRANSHUGE", "thp")
    return new


def test_migrate_pages_moves_a_pmd_mapped_thp_whole_in_both_processes():
    """migrate_pages_batch, MIGRATEPAGE_SUCCESS for a PMD-mappable folio: nr_succeeded
    += 512 (pgmigrate_success), nr_thp_succeeded += 1 (thp_migration_success); the rmap
    walk turned both processes' PMDs (fork) into PMD migration entries
    (set_pmd_migration_entry) and remove_migration_pmd pointed both at the new head:
    still huge, read-only (copy_huge_pmd write-protected them), the deposited tables in
    place, the old frame free, entire_mapcount 2 on the new folio, contents kept."""
    async def fn(m, k):
        p, a = await thp_region(k, value=5)
        c = await p.fork("child")
        t, folio = await _isolated_thp(m, p, a)
        old = folio.pfn
        assert await migrate.migrate_pages(m, [folio], _thp_target(m), "syscall") == (1, 0)
        for q in (p, c):
            tq, pmd = pmd_at(m, q.task.mm, a)
            assert pmd_trans_huge(pmd) and pmd_pfn(pmd) != old and not pmd_write(pmd)
            assert len(deposits(m, tq)) == 1
        new = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
        assert (new.order, new.entire_mapcount, new.refcount) == (9, 2, 2)
        assert m.zone.is_free(old)
        assert (ev(m, "pgmigrate_success"), ev(m, "thp_migration_success")) == (HPAGE_PMD_NR, 1)
        assert (ev(m, "thp_migration_fail"), ev(m, "thp_migration_split")) == (0, 0)
        assert m.vmstat.node["nr_anon_transparent_hugepages"] == 1
        assert await c.load(a + 8192) == b"\x05"
        await c.store(a, b"\x07")
        assert await p.load(a) == b"\x05" and await p.verify() == [] and await c.verify() == []
    run(fn)


def test_migrate_pages_writable_exclusive_thp_stays_writable():
    """set_pmd_migration_entry keeps write and PageAnonExclusive in the entry
    (make_writable_migration_entry); remove_migration_pmd makes the PMD writable again
    and adds the rmap with RMAP_EXCLUSIVE: a write after migration needs no fault."""
    async def fn(m, k):
        p, a = await thp_region(k, value=3)
        _, folio = await _isolated_thp(m, p, a)
        assert await migrate.migrate_pages(m, [folio], _thp_target(m), "syscall") == (1, 0)
        _, pmd = pmd_at(m, p.task.mm, a)
        new = m.physmem.page(pmd_pfn(pmd))
        assert pmd_write(pmd) and new.flags & PG_anon_exclusive
        faults = ev(m, "pgfault")
        await p.store(a + 4096, b"\x09")
        assert ev(m, "pgfault") == faults  # the TLB was flushed: one walk, no fault
        assert await p.verify() == []
    run(fn)


def test_migrate_pages_splits_a_thp_without_a_2m_target():
    """migrate_pages_batch, -ENOMEM for a large folio with nosplit false (any reason but
    MR_NUMA_MISPLACED): nr_thp_failed += 1, try_split_folio succeeds, nr_thp_split += 1;
    the 512 pieces are migrated in a batch of their own (pgmigrate_success 512) and,
    every piece moved, migrate_pages returns 0 ("Return 0 in case all split folios of
    fail-to-migrate large folios are migrated successfully")."""
    async def fn(m, k):
        p, a = await thp_region(k, value=4)
        _, folio = await _isolated_thp(m, p, a)

        async def small_only(f):
            if f.order:
                return -1
            return await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "anon")
        ok, failed = await migrate.migrate_pages(m, [folio], small_only, "syscall")
        assert (ok, failed) == (HPAGE_PMD_NR, 0)
        assert (ev(m, "thp_migration_fail"), ev(m, "thp_migration_split")) == (1, 1)
        assert (ev(m, "thp_migration_success"), ev(m, "pgmigrate_success")) == (0, HPAGE_PMD_NR)
        assert (ev(m, "thp_split_page"), ev(m, "thp_split_pmd")) == (1, 1)
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (2048, 0)
        assert await p.verify() == []
    run(fn)


def test_numa_misplaced_migration_never_splits():
    """migrate_pages_batch: nosplit = (reason == MR_NUMA_MISPLACED) ("Large folio NUMA
    faulting doesn't split to retry"): no 2 MiB target leaves the THP mapped by its PMD,
    counted thp_migration_fail 1 and pgmigrate_fail 512, no split."""
    async def fn(m, k):
        p, a = await thp_region(k, value=4)
        _, folio = await _isolated_thp(m, p, a)
        assert await migrate.migrate_pages(m, [folio], lambda f: -1, "numa_misplaced") == (0, 1)
        _, pmd = pmd_at(m, p.task.mm, a)
        assert pmd_trans_huge(pmd) and pmd_pfn(pmd) == folio.pfn
        assert (ev(m, "thp_migration_fail"), ev(m, "thp_migration_split")) == (1, 0)
        assert (ev(m, "pgmigrate_fail"), ev(m, "thp_split_page")) == (HPAGE_PMD_NR, 0)
        assert await p.verify() == []
    run(fn)


async def _freeze(m, p, a):
    """migrate_pages up to try_to_migrate: the THP isolated (the migration's own
    reference) and locked, its PMD(s) turned into migration entries."""
    t, pmd = pmd_at(m, p.task.mm, a)
    folio = m.physmem.page(pmd_pfn(pmd))
    assert await swap.folio_isolate_lru(m, folio)
    lk = m.folio_lock_of(folio)
    await lk.lock("test")
    av = folio.anon_vma.root
    await av.rwsem.down_read("test")
    await rmap.try_to_migrate(m, folio, split_pmd=False)
    await av.rwsem.up_read()
    return t, folio, lk


async def _thaw(m, folio, lk):
    """The failed migration's end: remove_migration_ptes(src, src), unlock, back on
    the LRU (dropping the isolation reference: the folio is freed if nothing maps it)."""
    av = folio.anon_vma.root
    await av.rwsem.down_read("test")
    await migrate.remove_migration_ptes(m, folio, folio)
    await av.rwsem.up_read()
    await lk.unlock()
    await swap.folio_putback_lru(m, folio)


async def _while_frozen(m, k, p, a, body):
    """CPU 0 holds the THP frozen (a migration in progress) while CPU 1 runs
    ``body(cpu, t, folio)``; then CPU 0 restores the PMDs."""
    box = {}

    async def migrator(cpu):
        box["t"], box["folio"], lk = await _freeze(m, p, a)
        box["frozen"] = True
        while "done" not in box:
            await k.sleep(1000)
        await _thaw(m, box["folio"], lk)

    async def other(cpu):
        while "frozen" not in box:
            await k.sleep(1000)
        try:
            box["value"] = await body(cpu, box["t"], box["folio"])
        finally:
            box["done"] = True
    await k.parallel(migrator, other)
    return box.get("value")


def test_pmd_migration_entry_in_smaps_fork_and_mprotect():
    """Mid-migration: smaps_pmd_entry counts a PMD migration entry's anonymous folio in
    Rss and AnonHugePages; change_huge_pmd makes a writable entry readable-exclusive ("a
    protection check is difficult so just be safe and disable write"); copy_huge_pmd
    copies the entry to the child; remove_migration_ptes then restores read-only huge
    PMDs in both, entire_mapcount 2."""
    async def fn(m, k):
        p, a = await thp_region(k, value=2)

        async def body(cpu, t, folio):
            q = p.on(cpu)
            e = m.physmem.tables[t][(a >> 21) & 511]
            assert is_pmd_migration_entry(e) and is_writable_migration_entry(e)
            assert migration_entry_pfn(e) == folio.pfn and folio.entire_mapcount == 0
            assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (2048, 2048)
            assert await q.mprotect(a, 2 * MiB, "r") == 0
            e = m.physmem.tables[t][(a >> 21) & 511]
            assert swp_type(e) == SWP_MIGRATION_READ_EXCLUSIVE
            assert await q.mprotect(a, 2 * MiB, "rw") == 0
            c = await q.fork("child")
            _, ec = pmd_at(m, c.task.mm, a)
            assert ec == m.physmem.tables[t][(a >> 21) & 511]
            return c, folio
        c, folio = await _while_frozen(m, k, p, a, body)
        for q in (p, c):
            _, pmd = pmd_at(m, q.task.mm, a)
            assert pmd_trans_huge(pmd) and not pmd_write(pmd)
        assert folio.entire_mapcount == 2
        assert await p.verify() == [] and await c.verify() == []
    run(fn, cpus=2)


def test_munmap_of_a_pmd_migration_entry():
    """zap_huge_pmd on a PMD migration entry (thp_migration_supported): clears it,
    frees the deposited table (zap_deposited_table) and drops MM_ANONPAGES, but takes no
    folio reference (the entry holds none): only the migration's own reference is left,
    remove_migration_ptes finds nothing to restore, and putting the folio back frees
    it."""
    async def fn(m, k):
        p, a = await thp_region(k, value=2)

        async def body(cpu, t, folio):
            assert await p.on(cpu).munmap(a, 2 * MiB) == 0
            assert p.task.mm.rss_anon == 0 and p.task.mm.nr_ptes == 0
            assert folio.refcount == 1 and not rmap.folio_mapped(folio)
            return folio.pfn
        pfn = await _while_frozen(m, k, p, a, body)
        assert m.zone.is_free(pfn)  # putback dropped the last reference
    run(fn, cpus=2)


def test_huge_memory_change_huge_pmd_on_migration_entry_returns_handled():
    """change_huge_pmd returns HPAGE_PMD_NR for a huge PMD it rewrote and 1 (handled,
    nothing counted as updated) for a PMD migration entry."""
    async def fn(m, k):
        p, a = await thp_region(k)
        vma = p.task.mm.find_vma(a)
        t, _ = pmd_at(m, p.task.mm, a)
        idx = (a >> 21) & 511
        assert await huge_memory.change_huge_pmd(m, vma, t, idx, a, vma.page_prot,
                                                 True) == HPAGE_PMD_NR

        async def body(cpu, t, folio):
            return await huge_memory.change_huge_pmd(m, vma, t, idx, a, vma.page_prot, True)
        assert await _while_frozen(m, k, p, a, body) == 1
        assert pmd_trans_huge(m.physmem.tables[t][idx])
    run(fn, cpus=2)


def test_fault_on_a_pmd_migration_entry_waits_for_the_folio_lock():
    """__handle_mm_fault on a PMD migration entry calls pmd_migration_entry_wait, which
    sleeps until the folio under migration is unlocked; the access then refaults onto
    the restored huge PMD: CPU 1's read, made while CPU 0 holds the THP frozen, returns
    the THP's byte only after CPU 0 restored the PMD."""
    async def fn(m, k):
        p, a = await thp_region(k, value=6)
        box = {}

        async def migrator(cpu):
            box["t"], folio, lk = await _freeze(m, p, a)
            box["frozen"] = True
            await k.sleep(1_000_000)  # the reader faults and sleeps on the folio lock
            box["thawed"] = True
            await _thaw(m, folio, lk)

        async def reader(cpu):
            while "frozen" not in box:
                await k.sleep(1000)
            box["got"] = (await p.on(cpu).load(a + 3 * 4096), "thawed" in box)
        await k.parallel(migrator, reader)
        assert box["got"] == (b"\x06", True)
        assert pmd_trans_huge(m.physmem.tables[box["t"]][(a >> 21) & 511])
        assert await p.verify() == []
    run(fn, cpus=2)


def test_split_of_a_pmd_migration_entry_then_restore():
    """__split_huge_pmd_locked on a PMD migration entry (MADV_DONTNEED of one page
    mid-migration): 512 PTE migration entries carrying the entry's write/exclusive
    state; the zap drops one; remove_migration_ptes then walks the PTE table
    (page_vma_mapped_walk after a split) and restores the other 511 (no migration
    entry is left behind for a fault to spin on)."""
    async def fn(m, k):
        p, a = await thp_region(k, value=2)

        async def body(cpu, t, folio):
            assert await p.on(cpu).madvise(a + 4096, 4096, "dontneed") == 0
            assert ev(m, "thp_split_pmd") == 1
        await _while_frozen(m, k, p, a, body)
        from kmm import pagewalk
        from kmm.pgtable import is_migration_entry
        leaves = list(pagewalk.walk_leaves(m, p.task.mm, a, a + 2 * MiB))
        assert len(leaves) == 511 and not any(is_migration_entry(e) for _, _, e in leaves)
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (2044, 0)
        assert await p.load(a) == b"\x02" and await p.verify() == []
    run(fn, cpus=2)


def test_compaction_never_isolates_a_pmd_thp():
    """mm/compaction.c skip_isolation_on_order (6.18): a folio of order >=
    pageblock_order (9 on x86) is never isolated for migration, even by global
    compaction (order -1, is_via_compact_memory): compaction cannot move a THP, so
    thp_migration_* stay 0 however it runs (the THP moves only through move_pages,
    migrate_pages, mbind MPOL_MF_MOVE or NUMA balancing)."""
    from kmm import compaction
    assert compaction.skip_isolation_on_order(9, 9)
    assert compaction.skip_isolation_on_order(9, -1)
    assert not compaction.skip_isolation_on_order(4, -1)
    assert not compaction.skip_isolation_on_order(4, 9)
