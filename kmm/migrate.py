"""Migration entries: mm/migrate.c.

A folio being split or migrated is unmapped by ``try_to_migrate`` (rmap.py): each PTE
that mapped it becomes a migration entry naming the page, so no CPU can reach it while
it changes. A fault on such an entry sleeps until the folio is unlocked
(``migration_entry_wait``) and then retries. ``remove_migration_ptes`` turns the entries
back into present PTEs, pointing at the same pages (after a split) or at the new ones
(after a move), with the write, dirty, young and exclusive state the entries kept; a
PMD migration entry (kmm.huge_memory_migrate) becomes a huge PMD again.
``migrate_pages`` moves order-0 folios, mTHPs and PMD-mapped THPs (whole) to new
frames, for compaction, the migration syscalls (kmm.migrate_syscalls) and NUMA
balancing (``migrate_misplaced_folio``); a large folio without a target is split.
Left out: file and hugetlb folios, MIGRATE_SYNC's waiting for locks and writeback (every
caller migrates as MIGRATE_ASYNC does), the retry passes (a busy folio fails at once),
the batched unmap/move with one TLB flush for the batch, and -ENOMEM aborting the rest
of a batch of small folios.
"""

from __future__ import annotations

from kmm import atomic, mmdebug, swap
from errno import EACCES, EAGAIN, EBUSY, ENOMEM  # the host is Linux: the kernel's numbers
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
                if not first <= migration_entry_pfn(pmdval) < last:
                    continue
                if await _remove_migration_pmd_at(m, vma, pmd_tbl, idx, addr, pmdval, dst):
                    continue
                # page_vma_mapped_walk: split meanwhile (its PTEs are migration
                # entries now): walk the table
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


async def _remove_migration_pmd_at(m, vma, pmd_tbl: int, idx: int, addr: int, pmdval: int,
                                   dst) -> bool:
    """remove_migration_pte's PMD case: under the PMD lock, if the entry is still
    there, remove_migration_pmd to the head of ``dst``. False if it changed meanwhile
    (a split made it a table of PTE migration entries: the caller walks those)."""
    from kmm import huge_memory_migrate
    from kmm.pgtable import HPAGE_PMD_MASK
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("remove_migration_pte")
    same = await atomic.entry_read(m, "pmd", pmd_tbl, idx) == pmdval
    if same:
        await huge_memory_migrate.remove_migration_pmd(m, vma, addr & HPAGE_PMD_MASK,
                                                       pmd_tbl, idx, dst)
    await ptl.unlock()
    return same


async def migrate_pages(m, folios: list, get_new_folio, reason: str) -> tuple[int, int]:
    """migrate_pages -> migrate_pages_batch for anonymous folios: order 0, mTHPs and
    PMD-mapped THPs (moved whole through a PMD migration entry). Each isolated folio
    goes to a frame from ``get_new_folio(folio) -> pfn | -1`` (or an awaitable of it);
    the mappings are frozen into migration entries (try_to_migrate), the contents and
    flags copied, and the entries pointed at the new folio (remove_migration_ptes). A
    folio locked by someone else or with extra references stays where it is and goes
    back on the LRU. A large folio that gets no frame (-ENOMEM) is split
    (try_split_folio, thp_migration_split) and its pieces migrated once, in a batch of
    their own, unless the reason is "numa_misplaced" (a NUMA hinting fault never
    splits). Returns (folios migrated, folios not migrated: a split THP counts as
    one unless every piece moved) and counts pgmigrate_success / _fail in pages and
    thp_migration_success / _fail / _split in PMD-order folios, as migrate_pages does.
    Context: the folios are isolated (off the LRU, one reference each); takes folio
    locks and anon_vma rwsems for read.
    """
    from kmm import swap
    from kmm.pgtable import HPAGE_PMD_ORDER
    st = {"ok": 0, "failed": 0, "ok_pages": 0, "failed_pages": 0, "thp_ok": 0,
          "thp_failed": 0, "thp_split": 0}
    split: list = []
    nosplit = reason == "numa_misplaced"
    for folio in folios:
        nr = folio.nr_pages
        is_thp = folio.order == HPAGE_PMD_ORDER
        rc = await _migrate_folio(m, folio, get_new_folio, st)
        if rc == 0:
            continue
        if rc == -ENOMEM and folio.order and not nosplit:
            st["failed"] += 1  # the large folio counts as not migrated, split or not
            st["thp_failed"] += is_thp
            if await _try_split_folio(m, folio, split) == 0:
                st["thp_split"] += is_thp
                continue
        else:
            st["failed"] += 1
            st["thp_failed"] += is_thp
        st["failed_pages"] += nr
        await swap.folio_putback_lru(m, folio)
    if split:
        # "Failure isn't counted since all split folios of a large folio is counted as
        # 1 failure already": the pieces are tried once, their pages counted
        pieces = dict(st, ok=0)
        left = 0
        for folio in split:
            if await _migrate_folio(m, folio, get_new_folio, pieces) != 0:
                pieces["failed_pages"] += folio.nr_pages
                await swap.folio_putback_lru(m, folio)
                left += 1
        st.update({k: v for k, v in pieces.items() if k != "ok"})
        st["ok"] += pieces["ok"]
        if not left and st["failed"] == st["thp_split"]:
            st["failed"] = 0  # "Return 0 in case all split folios ... are migrated"
    m.vmstat.count_vm_event("pgmigrate_success", st["ok_pages"])
    m.vmstat.count_vm_event("pgmigrate_fail", st["failed_pages"])
    m.vmstat.count_vm_event("thp_migration_success", st["thp_ok"])
    m.vmstat.count_vm_event("thp_migration_fail", st["thp_failed"])
    m.vmstat.count_vm_event("thp_migration_split", st["thp_split"])
    await m.sched.point("mm_migrate_pages", succeeded=st["ok"], failed=st["failed"],
                        reason=reason)
    return st["ok"], st["failed"]


async def _migrate_folio(m, folio, get_new_folio, st: dict) -> int:
    """One folio of migrate_pages_batch: 0 when it moved (or was freed under us: only
    the isolation reference was left), else the errno of migrate_folio_unmap /
    migrate_folio_move (-ENOMEM: no new folio; -EAGAIN: locked or referenced)."""
    from kmm import swap
    from kmm.pgtable import HPAGE_PMD_ORDER
    nr = folio.nr_pages
    is_thp = folio.order == HPAGE_PMD_ORDER
    if folio.refcount == 1:
        # migrate_folio_unmap: "Folio was freed from under us. So we are done."
        atomic.folio_clear_flags_locked(folio, PG_isolated)
        await swap.folio_put(m, folio)
        rc = 0
    else:
        rc = await _migrate_one(m, folio, get_new_folio)
    if rc == 0:
        st["ok"] += 1
        st["ok_pages"] += nr
        st["thp_ok"] += is_thp
    return rc


async def _try_split_folio(m, folio, split: list) -> int:
    """try_split_folio (MIGRATE_ASYNC: folio_trylock): split the isolated large folio;
    the head and its pieces go on ``split``, each isolated with one reference."""
    from kmm import huge_memory_split
    lk = m.folio_lock_of(folio)
    if not await lk.trylock("try_split_folio"):
        return -EAGAIN
    pieces: list = []
    rc = await huge_memory_split.split_folio_to_list(m, folio, pieces)
    await lk.unlock()
    if rc == 0:
        split.append(folio)
        split.extend(pieces)
    return rc


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


async def _migrate_one(m, folio, get_new_folio) -> int:
    """migrate_folio_unmap + migrate_folio_move for one anonymous folio: order 0, an
    mTHP (PTE-mapped) or a THP (PMD-mapped: one PMD migration entry per mapping); the
    new folio comes from get_new_folio at the same order (kmm asks once the source is
    locked; the kernel just before). 0 when moved; -ENOMEM (no new folio), -EAGAIN
    (locked by someone else, or referenced beyond its mappings) or -EBUSY (not
    migratable)."""
    from kmm import huge_memory_mthp, huge_memory_split, rmap, swap
    if folio.flags & (PG_swapcache | PG_writeback) or folio.anon_vma is None:
        return -EBUSY
    lk = m.folio_lock_of(folio)
    if not await lk.trylock("migrate_folio_unmap"):
        return -EAGAIN
    new_pfn = get_new_folio(folio)
    if not isinstance(new_pfn, int):
        new_pfn = await new_pfn
    if new_pfn < 0:
        await lk.unlock()
        return -ENOMEM
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
        if m.__dict__.get("numab") is not None:  # folio_migrate_flags: the last cpupid
            from kmm import numa_balancing
            numa_balancing.folio_migrate_cpupid(m, new, folio)
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
        await swap.folio_put(m, m.physmem.page(new_pfn))
        return -EAGAIN
    atomic.folio_clear_flags_locked(folio, PG_isolated)
    await swap.folio_put(m, folio)  # the old frame goes back to the buddy
    if requeue is not None:  # migrate_folio_move: requeue the destination
        await huge_memory_split.deferred_split_folio(m, new, requeue)
    # onto the LRU, dropping the allocation's reference; the mappings keep theirs
    await swap.folio_putback_lru(m, new)
    return 0


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


# ------------------------------------------------------------ NUMA misplaced
async def migrate_misplaced_folio_prepare(m, folio, vma, node: int) -> int:
    """migrate_misplaced_folio_prepare: 0 once the folio is isolated for a move to
    node; -EAGAIN when the node is nearly full (migrate_balanced_pgdat: free pages
    above its high watermark plus the folio) or the folio is not on the LRU; -EACCES
    for a shared folio of an executable mapping.
    Context: the page-table lock mapping the folio is held."""
    from kmm import mmzone, rmap
    from kmm.mm_types import VM_EXEC
    if vma.flags & VM_EXEC and rmap.folio_maybe_mapped_shared(m, folio):
        return -EACCES
    zone = mmzone.NODE_DATA(m, node).zone
    if not zone.zone_watermark_ok(0, zone.wmark["high"] + folio.nr_pages):
        return -EAGAIN
    if not await swap.folio_isolate_lru(m, folio):
        return -EAGAIN
    return 0


async def alloc_misplaced_dst_folio(m, src, node: int) -> int:
    """alloc_misplaced_dst_folio: a folio of the source's order on node only
    (__GFP_THISNODE); a large one GFP_TRANSHUGE_LIGHT (no reclaim, no compaction
    stall), a small one without reclaim retries or reserves."""
    from kmm import page_alloc
    from kmm.gfp import GFP, __GFP_NORETRY, __GFP_THISNODE
    from kmm.pgtable import HPAGE_PMD_ORDER
    if src.order:
        gfp = GFP["GFP_TRANSHUGE_LIGHT"] | __GFP_THISNODE
    else:
        gfp = GFP["GFP_HIGHUSER_MOVABLE"] | __GFP_THISNODE | __GFP_NORETRY
    purpose = "thp" if src.order == HPAGE_PMD_ORDER else "anon"
    return await page_alloc.alloc_pages(m, src.order, gfp, purpose, node)


async def migrate_misplaced_folio(m, folio, node: int) -> int:
    """migrate_misplaced_folio: migrate the isolated folio to node (MIGRATE_ASYNC,
    MR_NUMA_MISPLACED: a THP is never split for it); numa_pages_migrated counts the
    pages moved. 0, or -EAGAIN (it stays, back on the LRU).
    Context: no page-table lock held; the folio is isolated."""
    ok, _ = await migrate_pages(m, [folio], lambda f: alloc_misplaced_dst_folio(m, f, node),
                                "numa_misplaced")
    if ok:
        m.vmstat.count_vm_event("numa_pages_migrated", folio.nr_pages)
        return 0
    return -EAGAIN
