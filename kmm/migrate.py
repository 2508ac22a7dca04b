"""Migration entries: mm/migrate.c.

A folio being split or migrated is unmapped by ``try_to_migrate`` (rmap.py): each PTE
that mapped it becomes a migration entry naming the page, so no CPU can reach it while
it changes. A fault on such an entry sleeps until the folio is unlocked
(``migration_entry_wait``) and then retries. ``remove_migration_ptes`` turns the entries
back into present PTEs, pointing at the same pages (after a split) or at the new ones
(after a move), with the write, dirty, young and exclusive state the entries kept.
``migrate_pages`` moves order-0 folios and mTHPs to new frames, for compaction.
"""

from __future__ import annotations

from kmm import atomic, mmdebug, swap
from kmm.mm_types import (
    PG_active, PG_dirty, PG_head, PG_isolated, PG_partially_mapped, PG_referenced,
    PG_swapbacked, PG_swapcache, PG_uptodate, PG_writeback, VM_LOCKED,
)
from kmm.pgtable import (
    PAGE_SIZE, SWP_MIG_DIRTY, SWP_MIG_YOUNG, SWP_MIGRATION_READ, is_migration_entry,
    is_pmd_migration_entry, is_writable_migration_entry, migration_entry_pfn, pfn_pte,
    pte_index, pte_mkdirty, pte_mkold, pte_mkspecial, pte_mkwrite, swp_offset, swp_type,
)


async def migration_entry_wait(m, vmf) -> None:
    """migration_entry_wait: recheck the PTE under its lock, then sleep on the folio.

    Context: mmap_lock held for read; takes and drops the PTE lock.
    """
    from kmm import huge_memory, memory
    # pte_offset_map_lock: the table read locklessly may have been detached since
    res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is None:
        return
    tbl, ptl = res
    cur = await atomic.entry_read(m, "pte", tbl, vmf.pte_idx)
    await ptl.unlock()
    if cur == vmf.orig_pte and is_migration_entry(cur):
        folio = m.physmem.folio(migration_entry_pfn(cur))
        await huge_memory.migration_entry_wait_on_locked(m, folio)


async def remove_migration_ptes(m, src, dst, use_zero_page: bool = False) -> None:
    """remove_migration_ptes: every migration entry naming a page of ``src`` becomes a
    present PTE mapping the page at the same offset in ``dst`` (the same pages after a
    split, the new ones after a move), with the entry's write, young, dirty and
    exclusive state; each mapping takes a reference and a mapcount on its folio.

    ``src`` spans what was one folio; ``dst`` maps pfns to their (new) folios. With
    ``use_zero_page`` (RMP_USE_SHARED_ZEROPAGE, after a successful anonymous split) an
    order-0 page holding only zeros is mapped as the shared zero page instead and left
    to be freed (try_to_map_unused_to_zeropage). Context: folio(s) locked; the
    anon_vma rwsem held (RMP_LOCKED) or taken here for read.
    """
    from kmm import memory, rmap
    pm = m.physmem
    first, last = src.pfn, src.pfn + src.nr_pages
    for vma, lo, hi in rmap.rmap_walk_vmas(src):
        mm = vma.mm
        async for addr, nxt, pmd_tbl, idx, pmdval in rmap._pmd_steps(m, vma, lo, hi):
            if is_pmd_migration_entry(pmdval):
                m.bug("PMD migration entries are not made (THPs are split to migrate)")
            res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
            if res is None:
                continue
            tbl, ptl = res
            a = addr
            while a < nxt:
                i = pte_index(a)
                ent = await atomic.entry_read(m, "pte", tbl, i)
                if is_migration_entry(ent) and first <= migration_entry_pfn(ent) < last:
                    old_pfn = migration_entry_pfn(ent)
                    pfn = dst.pfn + (old_pfn - first)
                    folio = pm.folio(pfn)
                    if (use_zero_page and not folio.order and pm.is_zero(pfn)
                            and not vma.flags & VM_LOCKED):
                        await atomic.entry_set(m, "pte", tbl, i,
                                          pte_mkspecial(pfn_pte(m.zero_pfn, vma.page_prot)))
                        mm.rss_anon -= 1
                    else:
                        off = swp_offset(ent)
                        pte = pfn_pte(pfn, vma.page_prot)
                        if not off & SWP_MIG_YOUNG:
                            pte = pte_mkold(pte)
                        if off & SWP_MIG_DIRTY:
                            pte = pte_mkdirty(pte)
                        if is_writable_migration_entry(ent):
                            pte = pte_mkwrite(pte)
                        exclusive = swp_type(ent) != SWP_MIGRATION_READ
                        await atomic.folio_ref_add(m, folio, 1)
                        await rmap.folio_add_anon_rmap_ptes(m, folio, pfn, 1, exclusive)
                        await atomic.entry_set(m, "pte", tbl, i, pte)
                a += PAGE_SIZE
            await ptl.unlock()


async def migrate_pages(m, folios: list, get_new_folio, reason: str) -> tuple[int, int]:
    """migrate_pages (MIGRATE_ASYNC, anonymous order-0 folios and mTHPs): move each isolated
    folio to a frame from ``get_new_folio(folio) -> pfn | -1``. The mappings are frozen
    into migration entries (try_to_migrate), the contents and flags copied, and the
    entries pointed at the new page (remove_migration_ptes). A folio that is locked by
    someone else, has extra references or gets no frame stays where it is and goes
    back on the LRU. Returns (nr_succeeded, nr_failed); counts pgmigrate_success /
    pgmigrate_fail. Context: the folios are isolated (off the LRU, one reference
    each); takes folio locks and anon_vma rwsems for read.
    """
    from kmm import swap
    ok = failed = 0
    ok_pages = failed_pages = 0  # the vm events count pages (an mTHP counts its nr)
    for folio in folios:
        nr = folio.nr_pages
        if folio.refcount == 1:
            # freed under us (only the isolation reference is left): done
            atomic.folio_clear_flags_locked(folio, PG_isolated)
            await swap.folio_put(m, folio)
            ok += 1
            ok_pages += nr
            continue
        if await _migrate_one(m, folio, get_new_folio):
            ok += 1
            ok_pages += nr
        else:
            failed += 1
            failed_pages += nr
            await swap.folio_putback_lru(m, folio)
    m.vmstat.count_vm_event("pgmigrate_success", ok_pages)
    m.vmstat.count_vm_event("pgmigrate_fail", failed_pages)
    await m.sched.point("mm_migrate_pages", succeeded=ok, failed=failed, reason=reason)
    return ok, failed


def move_to_new_folio(m, dst, src) -> None:
    """move_to_new_folio (anonymous: migrate_folio): contents and flags move to dst.
    Context: both folios locked (VM_BUG_ON_FOLIO), src frozen and unmapped."""
    mmdebug.VM_BUG_ON_FOLIO(m, not mmdebug.folio_test_locked(src), src,
                          "move_to_new_folio: !folio_test_locked(src)")
    mmdebug.VM_BUG_ON_FOLIO(m, not mmdebug.folio_test_locked(dst), dst,
                          "move_to_new_folio: !folio_test_locked(dst)")
    for i in range(src.nr_pages):  # folio_copy (an mTHP: every page)
        m.physmem.copy(dst.pfn + i, src.pfn + i)
    # folio_migrate_flags, __folio_migrate_mapping: the new folio is still ours alone;
    # like the source it is off the LRU with our reference until it is put back (an
    # isolated folio to the invariant checker, which may run once it is mapped)
    atomic.init_page(dst, flags=(dst.flags & PG_head) | src.flags & (
                         PG_dirty | PG_swapbacked | PG_active | PG_referenced | PG_uptodate)
                     | PG_isolated, anon_vma=src.anon_vma, index=src.index)


async def _migrate_one(m, folio, get_new_folio) -> bool:
    """migrate_folio_unmap + migrate_folio_move for one anonymous folio: order 0, or
    an mTHP (PTE-mapped; its new folio is prepared at the same order by
    get_new_folio). Returns True when moved."""
    from kmm import huge_memory, huge_memory_mthp, rmap, swap
    if folio.flags & (PG_swapcache | PG_writeback) or folio.anon_vma is None:
        return False
    if folio.order and (folio.order >= 9 or folio.entire_mapcount):
        return False  # PMD-mapped THPs are split to migrate, not moved whole here
    lk = m.folio_lock_of(folio)
    if not await lk.trylock("migrate_folio_unmap"):
        return False
    new_pfn = get_new_folio(folio)
    if new_pfn < 0:
        await lk.unlock()
        return False
    # the new folio is locked too (folio_trylock(dst): it is ours alone, so it never
    # fails) until its mappings are in place: a walker that finds it through a new
    # PTE cannot lock it before remove_migration_ptes has finished
    new = m.physmem.page(new_pfn)
    dst_lk = m.folio_lock_of(new)
    if not await dst_lk.trylock("migrate_folio_unmap"):
        m.bug(f"migrate_folio_unmap: new folio {new_pfn:#x} is locked by "
              f"{dst_lk.owner_names()}")
    av = folio.anon_vma.root
    await av.rwsem.down_read("migrate_folio_unmap")
    if rmap.folio_mapped(folio):
        await rmap.try_to_migrate(m, folio, split_pmd=False)
    moved = not rmap.folio_mapped(folio) and folio.refcount == 1  # folio_ref_freeze
    requeue = None
    if moved:
        move_to_new_folio(m, new, folio)
        if folio.order:
            huge_memory_mthp.mod_mthp_stat(m, folio.order, "nr_anon", 1)
            if folio.on_deferred_list:  # the source leaves the queue; the target joins
                requeue = bool(folio.flags & PG_partially_mapped)
                await m.split_queue_lock.lock("__folio_migrate_mapping")
                atomic.ds_queue_del_locked(m, folio)
                huge_memory_mthp.folio_clear_partially_mapped(m, folio)
                await m.split_queue_lock.unlock()
        await remove_migration_ptes(m, folio, new)
    else:
        await remove_migration_ptes(m, folio, folio)
    await av.rwsem.up_read()
    await dst_lk.unlock()
    await lk.unlock()
    if not moved:
        if new_pfn >= 0:
            await swap.folio_put(m, m.physmem.page(new_pfn))
        return False
    atomic.folio_clear_flags_locked(folio, PG_isolated)
    await swap.folio_put(m, folio)  # the old frame goes back to the buddy
    if requeue is not None:  # migrate_folio_move: requeue the destination
        await huge_memory.deferred_split_folio(m, new, requeue)
    # onto the LRU, dropping the allocation's reference; the mappings keep theirs
    await swap.folio_putback_lru(m, new)
    return True


async def do_move_page(m, task, addr: int) -> str:
    """mm/migrate.c do_pages_move for one order-0 page (add_page_for_migration, then
    migrate_pages with the mmap lock dropped): "moved", "busy" (not isolated, or the
    migration failed) or "absent" (no present PTE there). A one-node machine has no
    other node to move to, so the page moves to a new frame, as a migration between
    nodes would.
    Context: takes and drops mmap_lock for read."""
    from kmm import page_alloc, pagewalk
    from kmm.pgtable import pte_pfn, pte_present
    mm = task.mm
    await mm.mmap_lock.down_read("add_page_for_migration")
    folio = None
    for _, level, e in pagewalk.walk_leaves(m, mm, addr, addr + PAGE_SIZE):
        if level == "pte" and pte_present(e):
            folio = m.physmem.folio(pte_pfn(e))
    ok = folio is not None and not folio.order and await swap.folio_isolate_lru(m, folio)
    await mm.mmap_lock.up_read()
    if folio is None:
        return "absent"
    if not ok:
        return "busy"
    new = await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "anon")
    moved, _ = await migrate_pages(m, [folio], lambda f: new, "syscall")
    return "moved" if moved else "busy"
