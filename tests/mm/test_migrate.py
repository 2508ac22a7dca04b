"""Moving order-0 anonymous folios through migration entries: migrate_pages,
try_to_migrate and remove_migration_ptes (mm/migrate.c, mm/rmap.c), as compaction
uses them. Expected values follow from the kernel's contract: the same contents at a
new frame, every mapping (in every process) pointing at it, the old frame free."""

from __future__ import annotations

from kmm import migrate, page_alloc, swap
from kmm.mm_types import PG_lru
from kmm.pgtable import PAGE_SIZE, pte_pfn, pte_write

from tests.mm.test_huge_memory import ev, run


def _pte(m, mm, addr):
    from tests.mm.test_split import ptes
    return ptes(m, mm, addr)[(addr >> 12) & 511]


def test_migrate_pages_moves_a_page_shared_by_fork():
    """A 4K page mapped by parent and child moves to a new frame: both PTEs point at
    it (read-only, COW state kept), mapcount 2, the old frame is free, and a later
    write in the child still copies (the page stays shared)."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 << 20)
        await p.touch(a, 4 * PAGE_SIZE, value=6)
        c = await p.fork("child")
        old = pte_pfn(_pte(m, p.task.mm, a))
        folio = m.physmem.page(old)
        assert await swap.folio_isolate_lru(m, folio)
        new = await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "test")
        assert await migrate.migrate_pages(m, [folio], lambda f: new, "compaction") == (1, 0)
        for t in (p.task, c.task):
            e = _pte(m, t.mm, a)
            assert pte_pfn(e) == new and not pte_write(e)
        pg = m.physmem.page(new)
        assert (pg.mapcount, pg.refcount) == (2, 2)
        assert m.zone.is_free(old)
        assert ev(m, "pgmigrate_success") == 1
        await c.store(a, b"\x07")
        assert await p.load(a) == b"\x06" and await c.load(a) == b"\x07"
        assert await p.verify() == [] and await c.verify() == []
    run(fn)


def test_migrate_pages_leaves_a_locked_folio():
    """A folio locked by someone else is not moved (MIGRATE_ASYNC trylock): no frame is
    asked for, it goes back on the LRU, counted as pgmigrate_fail."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 << 20)
        await p.touch(a, PAGE_SIZE, value=6)
        old = pte_pfn(_pte(m, p.task.mm, a))
        folio = m.physmem.page(old)
        lk = m.folio_lock_of(folio)
        await lk.lock("test")
        assert await swap.folio_isolate_lru(m, folio)
        asked = []
        assert await migrate.migrate_pages(m, [folio], lambda f: asked.append(f) or -1,
                                           "compaction") == (0, 1)
        await lk.unlock()
        assert asked == [] and pte_pfn(_pte(m, p.task.mm, a)) == old
        assert folio.flags & PG_lru
        assert ev(m, "pgmigrate_fail") == 1
        assert await p.verify() == []
    run(fn)
