"""Reverse mapping of anonymous folios: anon_vma chains and mapcounts.

mm/rmap.c. ``anon_vma_prepare`` gives a VMA its anon_vma on the first fault;
``anon_vma_fork`` links a child's VMA to every anon_vma of the parent's (the chains an
rmap walk follows after fork). The folio_add/remove_rmap family keeps the per-page
mapcount, the entire (PMD) mapcount and the large mapcount of a folio, and notices when
an anonymous large folio becomes partially mapped, queueing it for deferred split.
Each mapcount change is a preemption point.
"""

from __future__ import annotations

from kmm import atomic, huge_memory, huge_memory_mthp, huge_memory_split, swap, tlb
from kmm.mm_types import (
    PG_anon_exclusive, PG_dirty, PG_partially_mapped, PG_swapbacked, AnonVma, Page, VmArea,
)
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_SIZE, PAGE_SIZE, _PAGE_SWP_EXCLUSIVE, swp_entry, swp_offset,
    swp_type,
    make_migration_entry, pmd_index, pmd_mkold, pmd_pfn, pmd_present, pmd_trans_huge,
    pmd_young, pte_dirty, pte_index, pte_mkold, pte_pfn, pte_present, pte_special,
    pte_write, pte_young, table_pfn,
)


async def anon_vma_prepare(m, vma: VmArea) -> bool:
    """anon_vma_prepare: make sure the VMA has an anon_vma (False: out of memory).

    Context: mmap_lock held; takes the anon_vma rwsem and mm->page_table_lock.
    """
    if vma.anon_vma is not None:
        return True
    av = AnonVma(m.new_anon_vma_id(), None, None)
    av.rwsem = m.locks.rwsem("anon_vma", f"anon_vma:{av.id}")
    await av.rwsem.down_write("__anon_vma_prepare")
    await vma.mm.page_table_lock.lock("__anon_vma_prepare")
    if vma.anon_vma is None:
        vma.anon_vma = av
        vma.avc.append(av)
        av.vmas.append(vma)
    await vma.mm.page_table_lock.unlock()
    await av.rwsem.up_write()
    return True


def anon_vma_clone(dst: VmArea, src: VmArea) -> None:
    """anon_vma_clone: dst (a split-off part of src) joins every chain src is on."""
    for av in src.avc:
        dst.avc.append(av)
        av.vmas.append(dst)
    dst.anon_vma = src.anon_vma


def anon_vma_fork(m, child: VmArea, parent: VmArea) -> None:
    """anon_vma_fork: the child's VMA joins the parent's chains and gets its own anon_vma."""
    if parent.anon_vma is None:
        return
    anon_vma_clone(child, parent)
    av = AnonVma(m.new_anon_vma_id(), parent.anon_vma.root, None)
    av.parent = parent.anon_vma
    child.anon_vma = av
    child.avc.append(av)
    av.vmas.append(child)


def unlink_anon_vmas(vma: VmArea) -> None:
    """unlink_anon_vmas: the VMA leaves every chain (it is being unmapped)."""
    for av in vma.avc:
        av.vmas.remove(vma)
    vma.avc = []


def folio_mapcount(folio: Page) -> int:
    return folio.large_mapcount if folio.order else folio.mapcount


def folio_mapped(folio: Page) -> bool:
    return folio_mapcount(folio) > 0


def page_anon_exclusive(page: Page) -> bool:
    return bool(page.flags & PG_anon_exclusive)


def folio_add_new_anon_rmap(m, folio: Page, vma: VmArea, addr: int, pmd: bool):
    """folio_add_new_anon_rmap(..., RMAP_EXCLUSIVE): first mapping of a new folio.
    Awaitable: it is the layer's one-point operation itself (the fault's hot path
    creates one coroutine, not two)."""
    return atomic.mapcount_new_anon(m, folio, vma.anon_vma, vma.linear_page_index(addr),
                                    pmd)


async def folio_add_anon_rmap_ptes(m, folio: Page, pfn: int, nr: int,
                                   exclusive: bool) -> None:
    """folio_add_anon_rmap_ptes: nr PTE mappings of pages pfn.. of an existing folio."""
    newly = await atomic.mapcount_add_ptes(m, folio, pfn, nr, exclusive)
    # __folio_add_rmap: NR_ANON_MAPPED
    if newly and (not folio.order or not folio.entire_mapcount):
        m.vmstat.mod_node_page_state("nr_anon_pages", newly)


async def folio_remove_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_remove_rmap_ptes: nr PTE mappings gone; queue a partially mapped THP."""
    if folio.mapping is not None:
        return await folio_remove_file_rmap_ptes(m, folio, pfn, nr)
    unmapped = await atomic.mapcount_remove_ptes(m, folio, pfn, nr)
    if not folio.order:
        if unmapped:
            m.vmstat.mod_node_page_state("nr_anon_pages", -1)
        return
    if unmapped and not folio.entire_mapcount:  # __folio_remove_rmap: NR_ANON_MAPPED
        m.vmstat.mod_node_page_state("nr_anon_pages", -unmapped)
    # __folio_remove_rmap: pages became unmapped while others stay PTE-mapped, and no
    # PMD mapping covers the whole folio any more; a folio flagged partially mapped is
    # not queued again (the shrinker may hold it off the queue: it requeues it itself)
    if (unmapped and folio.nr_pages_mapped and not folio.entire_mapcount
            and not folio.flags & PG_partially_mapped):
        await huge_memory_split.deferred_split_folio(m, folio, True)


async def folio_add_anon_rmap_pmd(m, folio: Page, exclusive: bool) -> None:
    """folio_add_anon_rmap_pmd: one PMD mapping of an existing anonymous THP (a
    migration entry restored, remove_migration_pmd); the first PMD mapping counts it
    in NR_ANON_THPS and its pages no PTE maps in NR_ANON_MAPPED."""
    await atomic.mapcount_add_pmd(m, folio, exclusive)
    if folio.entire_mapcount == 1:
        m.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", 1)
        m.vmstat.mod_node_page_state("nr_anon_pages",
                                     folio.nr_pages - folio.nr_pages_mapped)


async def folio_remove_rmap_pmd(m, folio: Page) -> None:
    """folio_remove_rmap_pmd: one PMD mapping gone (zap, split)."""
    if folio.mapping is not None:
        return await folio_remove_file_rmap_pmd(m, folio)
    if await atomic.mapcount_remove_pmd(m, folio) == 0:
        m.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", -1)
        # the pages no PTE keeps mapped are unmapped now (NR_ANON_MAPPED)
        m.vmstat.mod_node_page_state("nr_anon_pages",
                                     folio.nr_pages_mapped - folio.nr_pages)
        if (folio.nr_pages_mapped and folio.nr_pages_mapped < folio.nr_pages
                and not folio.flags & PG_partially_mapped):
            # the last PMD mapping went while only some pages stay PTE-mapped
            await huge_memory_split.deferred_split_folio(m, folio, True)


async def folio_try_dup_anon_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_try_dup_anon_rmap_ptes (fork): the pages become shared; never fails here
    (no pins are modelled), so exclusivity is simply cleared."""
    await atomic.mapcount_dup_ptes(m, folio, pfn, nr)


async def folio_try_dup_anon_rmap_pmd(m, folio: Page) -> None:
    """folio_try_dup_anon_rmap_pmd (fork of a PMD-mapped THP)."""
    await atomic.mapcount_dup_pmd(m, folio)


def folio_mapping_mms(m, folio: Page) -> set[int]:
    """The mms whose page tables map any page of the folio, found by an rmap walk.

    Stands in for 6.18's mm-id tracking (folio_maybe_mapped_shared): exact, at the cost
    of a walk, which only the rare paths that ask (COW reuse of a large folio) pay.
    """
    mms: set[int] = set()
    av = folio.anon_vma
    if av is None:
        return mms
    first, last = folio.index, folio.index + folio.nr_pages
    for vma in av.vmas:
        lo = max(vma.start, vma.address_of(first))
        hi = min(vma.end, vma.address_of(last))
        if lo >= hi or vma.mm.id in mms:
            continue
        if any(lo <= a < hi for a in huge_memory_split.mapped_addresses(m, vma.mm, folio, lo, hi)):
            mms.add(vma.mm.id)
    return mms


def folio_maybe_mapped_shared(m, folio: Page) -> bool:
    """folio_maybe_mapped_shared: is any part of the folio mapped by more than one mm?"""
    if not folio.order:
        return folio.mapcount > 1
    return len(folio_mapping_mms(m, folio)) > 1


# ------------------------------------------------------------ rmap walks
def rmap_walk_vmas(folio: Page) -> list[tuple[VmArea, int, int]]:
    """rmap_walk_anon's interval-tree lookup: every VMA on the folio's anon_vma whose
    range covers some page of the folio, with the covered [lo, hi) addresses; for a
    page-cache folio, rmap_walk_file's lookup in the mapping's i_mmap.

    Context: the caller holds the anon_vma rwsem (read for a walk, write for a split),
    or the i_mmap_rwsem for a page-cache folio.
    """
    av = folio.anon_vma
    if folio.mapping is not None:
        vmas = folio.mapping.i_mmap
    elif av is None:
        return []
    else:
        vmas = av.vmas
    first, last = folio.index, folio.index + folio.nr_pages
    out = []
    for vma in vmas:
        lo = max(vma.start, vma.address_of(first))
        hi = min(vma.end, vma.address_of(last))
        if lo < hi:
            out.append((vma, lo, hi))
    return out


async def _pmd_steps(m, vma: VmArea, lo: int, hi: int):
    """page_vma_mapped_walk's descent: (addr, end, pmd table, index, pmd value) for
    each PMD slot of [lo, hi) that has a table above it."""
    from kmm import memory
    addr = lo
    while addr < hi:
        nxt = min((addr & HPAGE_PMD_MASK) + HPAGE_PMD_SIZE, hi)
        pmd_tbl = memory.pmd_lookup(m, vma.mm, addr)
        if pmd_tbl >= 0:
            idx = pmd_index(addr)
            yield addr, nxt, pmd_tbl, idx, await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        addr = nxt


async def _split_huge_pmd_locked_at(m, vma: VmArea, pmd_tbl: int, idx: int, addr: int,
                                    pmdval: int, freeze: bool, site: str) -> None:
    """TTU_SPLIT_HUGE_PMD in an rmap walk: __split_huge_pmd_locked under the PMD lock, if
    the PMD is still the one the walk saw."""
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock(site)
    if await atomic.entry_read(m, "pmd", pmd_tbl, idx) == pmdval:
        await huge_memory.__split_huge_pmd_locked(m, vma, pmd_tbl, idx,
                                                  addr & HPAGE_PMD_MASK, freeze=freeze)
    await ptl.unlock()


async def _set_pmd_migration_entry_at(m, vma: VmArea, pmd_tbl: int, idx: int, addr: int,
                                      pmdval: int, folio: Page) -> bool:
    """page_vma_mapped_walk found the THP's PMD: under the PMD lock, if it is still the
    PMD the walk saw, set_pmd_migration_entry. False if it changed meanwhile."""
    from kmm import huge_memory_migrate
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("try_to_migrate_one")
    same = await atomic.entry_read(m, "pmd", pmd_tbl, idx) == pmdval
    if same:
        await huge_memory_migrate.set_pmd_migration_entry(m, vma, addr & HPAGE_PMD_MASK,
                                                          pmd_tbl, idx, folio)
    await ptl.unlock()
    return same


def _maps(folio: Page, pfn: int) -> bool:
    return folio.pfn <= pfn < folio.pfn + folio.nr_pages


async def try_to_migrate(m, folio: Page, split_pmd: bool) -> None:
    """try_to_migrate: every mapping of the folio becomes a migration entry.

    With ``split_pmd`` (TTU_SPLIT_HUGE_PMD) a PMD mapping is split with freeze, so it
    turns into 512 PTE migration entries at once. 6.11-6.18 ended the whole rmap walk
    after such a split (``m.quirks`` "split_pmd_ends_walk"), leaving other processes'
    PMDs mapped and the split to fail; the stable fix continues the walk.
    Context: folio locked; anon_vma rwsem held (write, for a split).
    """
    for vma, lo, hi in rmap_walk_vmas(folio):
        if not await try_to_migrate_one(m, folio, vma, lo, hi, split_pmd):
            return


async def try_to_migrate_one(m, folio: Page, vma: VmArea, lo: int, hi: int,
                             split_pmd: bool) -> bool:
    """try_to_migrate_one: replace this VMA's mappings of the folio by migration
    entries (young, dirty, write and exclusive kept in the entry), dropping one
    reference and one mapcount per mapping; MM_ANONPAGES still counts them. False ends
    the rmap walk."""
    from kmm import memory
    mm = vma.mm
    async for addr, nxt, pmd_tbl, idx, pmdval in _pmd_steps(m, vma, lo, hi):
        if pmd_trans_huge(pmdval) and pmd_present(pmdval):
            if pmd_pfn(pmdval) != folio.pfn:
                continue
            if not split_pmd:  # a PMD-mapped THP migrates whole: one PMD migration entry
                if await _set_pmd_migration_entry_at(m, vma, pmd_tbl, idx, addr, pmdval,
                                                     folio):
                    continue
                # page_vma_mapped_walk: split meanwhile, walk its PTEs instead
            await _split_huge_pmd_locked_at(m, vma, pmd_tbl, idx, addr, pmdval, True,
                                            "try_to_migrate_one")
            if "split_pmd_ends_walk" in m.quirks:
                return False
            continue
        res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
        if res is None:
            continue
        tbl, ptl = res
        cleared = False
        a = addr
        while a < nxt:
            i = pte_index(a)
            ent = await atomic.entry_read(m, "pte", tbl, i)
            if pte_present(ent) and not pte_special(ent) and _maps(folio, pte_pfn(ent)):
                pfn = pte_pfn(ent)
                page = m.physmem.page(pfn)
                old = await atomic.entry_get_and_clear(m, "pte", tbl, i)  # ptep_clear_flush
                cleared = True
                if pte_dirty(old):
                    atomic.folio_set_flags_locked(folio, PG_dirty)
                holder = page if folio.order else folio
                exclusive = bool(holder.flags & PG_anon_exclusive)
                # folio_try_share_anon_rmap_pte
                atomic.folio_clear_flags_locked(holder, PG_anon_exclusive)
                await atomic.entry_set(m, "pte", tbl, i, make_migration_entry(
                    pfn, pte_write(old), exclusive, pte_young(old), pte_dirty(old)))
                await folio_remove_rmap_ptes(m, folio, pfn, 1)
                await swap.folio_put(m, folio)
            a += PAGE_SIZE
        if cleared:  # TTU_BATCH_FLUSH: one flush per table, before the lock drops
            await tlb.flush_tlb_mm_range(m, mm, addr, nxt)
        await ptl.unlock()
    return True


async def try_to_unmap(m, folio: Page, split_pmd: bool) -> None:
    """try_to_unmap (reclaim): drop every mapping of the folio. A swap-cache folio's
    PTEs become swap entries (MM_ANONPAGES -> MM_SWAPENTS); a clean lazyfree folio's
    are simply cleared; a lazyfree folio dirtied again since MADV_FREE becomes
    swap-backed and keeps its mappings (the caller sees it still mapped).
    Context: folio locked; takes the anon_vma rwsem for read.
    """
    if folio.mapping is not None:
        return await try_to_unmap_file(m, folio, split_pmd)
    av = folio.anon_vma
    if av is None:
        return
    await av.root.rwsem.down_read("try_to_unmap")
    for vma, lo, hi in rmap_walk_vmas(folio):
        if not await try_to_unmap_one(m, folio, vma, lo, hi, split_pmd):
            break
    await av.root.rwsem.up_read()


async def try_to_unmap_one(m, folio: Page, vma: VmArea, lo: int, hi: int,
                           split_pmd: bool) -> bool:
    """try_to_unmap_one: unmap the folio from one VMA. False ends the walk (a dirty
    lazyfree folio must stay)."""
    from kmm import memory, swapfile
    mm = vma.mm
    lazyfree = not folio.flags & PG_swapbacked
    async for addr, nxt, pmd_tbl, idx, pmdval in _pmd_steps(m, vma, lo, hi):
        if pmd_trans_huge(pmdval) and pmd_present(pmdval):
            if pmd_pfn(pmdval) != folio.pfn:
                continue
            if not split_pmd:
                return False
            await _split_huge_pmd_locked_at(m, vma, pmd_tbl, idx, addr, pmdval, False,
                                            "try_to_unmap_one")
        res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
        if res is None:
            continue
        tbl, ptl = res
        cleared = False
        ok = True
        a = addr
        while a < nxt:
            i = pte_index(a)
            ent = await atomic.entry_read(m, "pte", tbl, i)
            if pte_present(ent) and not pte_special(ent) and _maps(folio, pte_pfn(ent)):
                pfn = pte_pfn(ent)
                page = m.physmem.page(pfn)
                if lazyfree:
                    # folio_unmap_pte_batch: a lazyfree folio's consecutive PTEs in this
                    # table go together, so it is never left partially mapped
                    nr = 1
                    while (a + nr * PAGE_SIZE < nxt and pfn + nr < folio.pfn + folio.nr_pages
                           and pte_pfn(m.physmem.tables[tbl][i + nr]) == pfn + nr
                           and pte_present(m.physmem.tables[tbl][i + nr])):
                        nr += 1
                    olds = [await atomic.entry_get_and_clear(m, "pte", tbl, i + j)
                            for j in range(nr)]
                    cleared = True
                    if any(pte_dirty(o) for o in olds):
                        atomic.folio_set_flags_locked(folio, PG_dirty)
                    if folio.flags & PG_dirty:
                        # written since MADV_FREE: it cannot be discarded; remap it and
                        # make it swap-backed again
                        for j, o in enumerate(olds):
                            await atomic.entry_set(m, "pte", tbl, i + j, o)
                        atomic.folio_set_flags_locked(folio, PG_swapbacked)
                        ok = False
                        break
                    mm.rss_anon -= nr
                    await folio_remove_rmap_ptes(m, folio, pfn, nr)
                    await swap.folio_put(m, folio, nr)
                    a += nr * PAGE_SIZE
                    continue
                old = await atomic.entry_get_and_clear(m, "pte", tbl, i)
                cleared = True
                if pte_dirty(old):
                    atomic.folio_set_flags_locked(folio, PG_dirty)
                holder = page if folio.order else folio
                exclusive = bool(holder.flags & PG_anon_exclusive)
                atomic.folio_clear_flags_locked(holder, PG_anon_exclusive)
                # folio->swap names the first page's slot (a PTE-format entry)
                entry = swp_entry(swp_type(folio.swap),
                                  swp_offset(folio.swap) + pfn - folio.pfn)
                await swapfile.swap_duplicate(m, entry)
                if exclusive:
                    entry |= _PAGE_SWP_EXCLUSIVE
                await atomic.entry_set(m, "pte", tbl, i, entry)
                mm.rss_anon -= 1
                mm.swapents += 1
                await folio_remove_rmap_ptes(m, folio, pfn, 1)
                await swap.folio_put(m, folio)
            a += PAGE_SIZE
        if cleared:
            await tlb.flush_tlb_mm_range(m, mm, addr, nxt)
        await ptl.unlock()
        if not ok:
            return False
    return True


async def try_to_unmap_file(m, folio: Page, split_pmd: bool) -> None:
    """try_to_unmap of a page-cache folio: every mapping found through i_mmap goes (a
    PMD mapping is split, and a file PMD's split zaps it); PTEs are cleared, their
    dirty bit passed to the folio, MM_SHMEMPAGES dropped. No swap entry is left: the
    page cache keeps the folio. Context: folio locked; takes i_mmap_rwsem for read."""
    from kmm import memory
    mapping = folio.mapping
    await mapping.i_mmap_rwsem.down_read("try_to_unmap")
    for vma, lo, hi in rmap_walk_vmas(folio):
        async for addr, nxt, pmd_tbl, idx, pmdval in _pmd_steps(m, vma, lo, hi):
            if pmd_trans_huge(pmdval) and pmd_present(pmdval):
                if pmd_pfn(pmdval) == folio.pfn and split_pmd:
                    await _split_huge_pmd_locked_at(m, vma, pmd_tbl, idx, addr, pmdval,
                                                    False, "try_to_unmap_one")
                continue
            res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
            if res is None:
                continue
            tbl, ptl = res
            cleared = False
            a = addr
            while a < nxt:
                i = pte_index(a)
                ent = await atomic.entry_read(m, "pte", tbl, i)
                if pte_present(ent) and not pte_special(ent) and _maps(folio, pte_pfn(ent)):
                    old = await atomic.entry_get_and_clear(m, "pte", tbl, i)
                    cleared = True
                    if pte_dirty(old):
                        atomic.folio_set_flags_locked(folio, PG_dirty)  # folio locked
                    vma.mm.rss_shmem -= 1
                    await folio_remove_rmap_ptes(m, folio, pte_pfn(old), 1)
                    await swap.folio_put(m, folio)
                a += PAGE_SIZE
            if cleared:
                await tlb.flush_tlb_mm_range(m, vma.mm, addr, nxt)
            await ptl.unlock()
    await mapping.i_mmap_rwsem.up_read()


async def folio_referenced(m, folio: Page) -> int:
    """folio_referenced: test and clear the young bit of every mapping of the folio
    (ptep_clear_young_notify: x86 clears the accessed bit without a TLB flush, so a
    CPU holding the translation does not set it again until it walks). Returns the
    number of young mappings. Context: folio locked or isolated; takes the anon_vma
    rwsem for read."""
    from kmm import memory
    av = folio.anon_vma
    if av is None:
        return 0
    young = 0
    await av.root.rwsem.down_read("folio_referenced")
    for vma, lo, hi in rmap_walk_vmas(folio):
        async for addr, nxt, pmd_tbl, idx, pmdval in _pmd_steps(m, vma, lo, hi):
            if pmd_trans_huge(pmdval) and pmd_present(pmdval):
                if pmd_pfn(pmdval) == folio.pfn and pmd_young(pmdval):
                    if await atomic.entry_cmpxchg(m, "pmd", pmd_tbl, idx, pmdval,
                                                  pmd_mkold(pmdval)):
                        young += 1
                continue
            if not pmd_present(pmdval):
                continue
            # page_vma_mapped_walk's map_pte: the table may have been detached (and
            # handed to RCU) since the PMD was read; pte_offset_map_lock rechecks it
            res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
            if res is None:
                continue
            tbl, ptl = res
            a = addr
            while a < nxt:
                i = pte_index(a)
                ent = await atomic.entry_read(m, "pte", tbl, i)
                if (pte_present(ent) and not pte_special(ent) and pte_young(ent)
                        and _maps(folio, pte_pfn(ent))):
                    await atomic.entry_set(m, "pte", tbl, i, pte_mkold(ent))
                    young += 1
                a += PAGE_SIZE
            await ptl.unlock()
    await av.root.rwsem.up_read()
    return young


# ------------------------------------------------------- page-cache folios
# __folio_add_file_rmap / __folio_remove_rmap for a folio with a mapping: the same
# mapcounts as anonymous folios (kmm.atomic's mapcount ops, never exclusive), with the
# file counters (NR_FILE_MAPPED, and NR_SHMEM_PMDMAPPED for a PMD mapping: meminfo
# ShmemPmdMapped). A partially mapped page-cache folio is never queued for deferred
# split (6.18 queues anonymous ones only).
async def folio_add_file_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_add_file_rmap_ptes: nr PTE mappings of pages pfn.. of the folio."""
    newly = await atomic.mapcount_add_ptes(m, folio, pfn, nr, False)
    if newly and (not folio.order or not folio.entire_mapcount):
        m.vmstat.mod_node_page_state("nr_file_mapped", newly)


async def folio_add_file_rmap_pmd(m, folio: Page) -> None:
    """folio_add_file_rmap_pmd: one PMD mapping of the whole folio."""
    await atomic.mapcount_add_pmd(m, folio, False)
    if folio.entire_mapcount == 1:
        m.vmstat.mod_node_page_state("nr_shmem_pmdmapped", folio.nr_pages)
        m.vmstat.mod_node_page_state("nr_file_mapped",
                                     folio.nr_pages - folio.nr_pages_mapped)


async def folio_remove_file_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    unmapped = await atomic.mapcount_remove_ptes(m, folio, pfn, nr)
    if unmapped and (not folio.order or not folio.entire_mapcount):
        m.vmstat.mod_node_page_state("nr_file_mapped", -unmapped)


async def folio_remove_file_rmap_pmd(m, folio: Page) -> None:
    if await atomic.mapcount_remove_pmd(m, folio) == 0:
        m.vmstat.mod_node_page_state("nr_shmem_pmdmapped", -folio.nr_pages)
        m.vmstat.mod_node_page_state("nr_file_mapped",
                                     folio.nr_pages_mapped - folio.nr_pages)


async def folio_dup_file_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_dup_file_rmap_ptes (fork of a private file mapping's PTEs)."""
    await atomic.mapcount_dup_ptes(m, folio, pfn, nr)
