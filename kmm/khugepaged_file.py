"""khugepaged and MADV_COLLAPSE for shmem: the page-cache side of mm/khugepaged.c.

``hpage_collapse_scan_file`` looks at the 512 page-cache slots of an aligned block
without locks: a PMD-size folio already there is SCAN_PTE_MAPPED_HUGEPAGE (only the
mapping is missing); folios off the LRU or with references beyond the cache's and the
mappings' stop it; khugepaged wants at least ``512 - max_ptes_none`` pages present
(``thp_scan_exceed_none_pte``), MADV_COLLAPSE does not. ``collapse_file`` then
allocates the new folio (``thp_collapse_alloc``), locks and isolates every small
folio, unmaps it from every mapper, checks that only the cache, the isolation and
itself hold it (SCAN_PAGE_COUNT), copies (holes are zero), replaces the small folios
by the new one in the page cache at once (SCAN_PAGE_FILLED if a hole was filled
meanwhile), and removes the now empty PTE tables of every mapper without an anon_vma
(``retract_page_tables``) while the new folio is still locked, so no fault can map a
page of it into a table being retracted. The PMD is mapped by the next fault, or at
once by MADV_COLLAPSE (``collapse_pte_mapped_thp`` with install_pmd).

Swapped-out pages are counted by the scan (khugepaged stops beyond ``max_ptes_swap``,
``thp_scan_exceed_swap_pte``) and read back by collapse_file (``shmem_get_folio_gfp``
with SGP_NOALLOC) before they are isolated like the others.

Left out: fallocated-not-uptodate pages,
userfaultfd, non-shmem files (CONFIG_READ_ONLY_THP_FOR_FS).
"""

from __future__ import annotations

from kmm import (
    atomic, filemap, khugepaged, memory, pgtable_generic as pgg, shmem, swap, tlb, truncate,
)
from kmm.khugepaged import ScanResult as R
from kmm.cost import COST_COPY_PAGE
from kmm.mm_types import PG_dirty, PG_isolated, PG_lru, PG_swapbacked, PG_uptodate, Page
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, pmd_index,
    pmd_none, pmd_present, pmd_trans_huge, pte_index, pte_none, pte_pfn, pte_present,
    table_pfn,
)


async def hpage_collapse_scan_file(m, mm, addr: int, inode, start: int, cc) -> R:
    """hpage_collapse_scan_file: may the page cache at [start, start+512) collapse?
    SCAN_SUCCEED goes on to collapse_file. Emits mm_khugepaged_scan_file."""
    mapping = inode.mapping
    end = start + HPAGE_PMD_NR
    present = swap = 0
    result = R.SCAN_SUCCEED
    cc.node_load.clear()  # memset(cc->node_load); nodes_clear(cc->alloc_nmask)
    cc.alloc_nmask.clear()
    await m.sched.point("xas_for_each", pt=mapping.id, index=start)
    from kmm import mmzone, rmap
    for folio, entry in _entries_in_block(m, mapping, start, end):
        if folio is None:  # xa_is_value: a swap entry, of 1 << order pages
            swap += 1 << entry[1]
            if cc.is_khugepaged and swap > m.sysfs["khugepaged/max_ptes_swap"]:
                result = R.SCAN_EXCEED_SWAP_PTE
                m.vmstat.count_vm_event("thp_scan_exceed_swap_pte")
                break
            continue
        if folio.order == HPAGE_PMD_ORDER and folio.index == start:
            result = R.SCAN_PTE_MAPPED_HUGEPAGE  # maybe PMD-mapped
            break
        nid = mmzone.folio_nid(m, folio)  # the collapse allocates on the busiest node
        cc.node_load[nid] = cc.node_load.get(nid, 0) + 1
        if not folio.flags & PG_lru:
            result = R.SCAN_PAGE_LRU
            break
        if folio.refcount != folio.nr_pages + rmap.folio_mapcount(folio):
            result = R.SCAN_PAGE_COUNT  # !is_refcount_suitable
            break
        present += folio.nr_pages
    if result == R.SCAN_SUCCEED:
        if cc.is_khugepaged and present < HPAGE_PMD_NR - m.sysfs["khugepaged/max_ptes_none"]:
            result = R.SCAN_EXCEED_NONE_PTE
            m.vmstat.count_vm_event("thp_scan_exceed_none_pte")
        else:
            result = await collapse_file(m, mm, addr, inode, start, cc)
    m.khugepaged_scan.results[("khugepaged" if cc.is_khugepaged else "madvise",
                               result.name)] += 1
    await khugepaged.trace_event(m, "mm_khugepaged_scan_file", mm=mm.id, ino=inode.id,
                                 present=present, swap=swap, status=result.status)
    return result


def _entries_in_block(m, mapping, start: int, end: int) -> list:
    """xas_for_each over [start, end): (folio, None) for each folio and (None, (entry,
    order, base)) for each swap entry, in index order, a large one once."""
    found = [(f.index, f, None) for f in filemap.folios_in_range(m, mapping, start, end)]
    if mapping.swapped:
        seen = set()
        for i in range(start, end):
            got = mapping.swapped.get(i)
            if got is not None and got[2] not in seen:
                seen.add(got[2])
                found.append((i, None, got))
        found.sort(key=lambda e: e[0])
    return [(f, e) for _, f, e in found]


async def _isolate_range(m, inode, start: int, end: int, pagelist: list) -> tuple[R, int]:
    """collapse_file's first loop: lock, isolate and unmap each small folio of the
    block. Returns (result, holes). Context: the new folio locked."""
    mapping = inode.mapping
    nr_none = swapins = 0
    index = start
    lk = mapping.i_pages_lock
    await lk.lock("collapse_file")
    while index < end:
        folio = filemap.filemap_get_entry(m, mapping, index)
        if folio is None and index in mapping.swapped:
            # a swap entry: read it back (shmem_get_folio with SGP_NOALLOC), which
            # returns the folio locked and referenced, as the trylock below would. The
            # lock is a sleeping one taken with the new folio's and the earlier ones'
            # held: kmm's lockdep (which, unlike the kernel's, sees folio locks) is told
            # each such nesting apart by a subclass of its own
            await lk.unlock()
            swapins += 1
            folio = await shmem.shmem_get_folio_gfp(m, inode, index, 0, shmem.SGP_NOALLOC,
                                                    subclass=swapins)
            if not isinstance(folio, Page):
                return R.SCAN_FAIL, 0  # a hole again (truncated): -ENOENT
            flk = m.folio_lock_of(folio)
        elif folio is None:
            if index == start and not filemap.range_has_entry(mapping, start, end):
                await lk.unlock()
                return R.SCAN_TRUNCATED, 0  # truncated or punched: nothing left
            nr_none += 1
            index += 1
            continue
        else:
            flk = m.folio_lock_of(folio)
            if not await flk.trylock("collapse_file"):
                await lk.unlock()
                return R.SCAN_PAGE_LOCK, 0
            await atomic.folio_ref_add(m, folio, 1)
            await lk.unlock()
        result = R.SCAN_SUCCEED
        if not folio.flags & PG_uptodate:
            result = R.SCAN_FAIL
        elif folio.order == HPAGE_PMD_ORDER and folio.index == start:
            result = R.SCAN_PTE_MAPPED_HUGEPAGE
        elif folio.mapping is not mapping:
            result = R.SCAN_TRUNCATED  # truncated since the lookup
        elif not await swap.folio_isolate_lru(m, folio):
            result = R.SCAN_DEL_PAGE_LRU
        if result != R.SCAN_SUCCEED:
            await flk.unlock()
            await swap.folio_put(m, folio)
            return result, 0
        from kmm import rmap
        if rmap.folio_mapped(folio):  # try_to_unmap
            await truncate.unmap_mapping_folio(m, folio)
        await lk.lock("collapse_file")
        # ours, the isolation's and the page cache's: then every new user must come
        # through the page cache and lock the folio first
        if folio.refcount != 2 + folio.nr_pages or folio.mapping is not mapping:
            await lk.unlock()
            await swap.folio_putback_lru(m, folio)
            await flk.unlock()
            await swap.folio_put(m, folio)
            return R.SCAN_PAGE_COUNT, 0
        pagelist.append(folio)
        index += folio.nr_pages
    await lk.unlock()
    return R.SCAN_SUCCEED, nr_none


async def collapse_file(m, mm, addr: int, inode, start: int, cc) -> R:
    """collapse_file (shmem): replace the small folios of the block by one new
    PMD-size folio in the page cache. Context: no mmap lock (the caller dropped it)."""
    from kmm.khugepaged_collapse import alloc_charge_folio
    mapping = inode.mapping
    end = start + HPAGE_PMD_NR
    result, new = await alloc_charge_folio(m, mm, cc)
    if result != R.SCAN_SUCCEED:
        return result
    nlk = m.folio_lock_of(new)
    await nlk.lock("collapse_file")  # __folio_set_locked: nobody can see it yet
    atomic.folio_set_flags_locked(new, PG_swapbacked)  # __folio_set_swapbacked: ours
    pagelist: list[Page] = []
    result, nr_none = await _isolate_range(m, inode, start, end, pagelist)
    if result == R.SCAN_SUCCEED:
        # copy: the old folios are locked and unmapped, so they change no more
        pm = m.physmem
        await m.sched.point("copy_mc_highpage", COST_COPY_PAGE * HPAGE_PMD_NR, pfn=new.pfn)
        pm.clear(new.pfn, HPAGE_PMD_NR)
        for folio in pagelist:
            for i in range(folio.nr_pages):
                pm.copy(new.pfn + folio.index - start + i, folio.pfn + i)
        result = await _replace_in_page_cache(m, mapping, new, start, pagelist, nr_none)
    if result != R.SCAN_SUCCEED:  # rollback
        for folio in pagelist:
            await swap.folio_putback_lru(m, folio)
            await m.folio_lock_of(folio).unlock()
            await swap.folio_put(m, folio)
        await nlk.unlock()
        await swap.folio_put(m, new)
        return result
    await retract_page_tables(m, mapping, start)
    if not cc.is_khugepaged:
        result = R.SCAN_PTE_MAPPED_HUGEPAGE  # MADV_COLLAPSE maps the PMD itself
    await nlk.unlock()  # only now may a fault map the new folio (into a PMD)
    for folio in pagelist:  # the old folios go: ours, the isolation's, the cache's refs
        atomic.folio_clear_flags_locked(folio, PG_isolated)  # folio locked, off the LRU
        await m.folio_lock_of(folio).unlock()
        await swap.folio_put(m, folio, 2 + folio.nr_pages)
    return result


async def _replace_in_page_cache(m, mapping, new: Page, start: int, pagelist: list,
                                 nr_none: int) -> R:
    """The holes must still be holes (SCAN_PAGE_FILLED); then the new folio takes every
    index at once, dirty and uptodate, with the page cache's 512 references, and the
    old folios leave. Context: i_pages lock taken here; old folios locked."""
    lk = mapping.i_pages_lock
    await lk.lock("collapse_file")
    held = sum(f.nr_pages for f in pagelist)
    # a hole filled meanwhile holds a folio, or its swap entry if that folio was
    # written out since: either way not a NULL entry (xas_next) any more
    if held + nr_none != HPAGE_PMD_NR or any(
            (mapping.i_pages.get(i) is not None and m.physmem.folio(mapping.i_pages[i])
             not in pagelist) or i in mapping.swapped
            for i in range(start, start + HPAGE_PMD_NR)):
        await lk.unlock()
        return R.SCAN_PAGE_FILLED
    for folio in pagelist:
        filemap.__filemap_remove_folio(m, folio)
    atomic.folio_set_field_locked(new, "mapping", mapping)  # i_pages lock held
    atomic.folio_set_field_locked(new, "index", start)
    atomic.folio_set_flags_locked(new, PG_uptodate | PG_dirty)
    atomic.folio_ref_add_locked(new, HPAGE_PMD_NR - 1)  # our reference becomes the cache's
    for i in range(start, start + HPAGE_PMD_NR):
        mapping.i_pages[i] = new.pfn
    mapping.nrpages += HPAGE_PMD_NR
    filemap.shmem_stat(m, new, +1)
    await m.sched.point("xas_store", pt=mapping.id, index=start, pfn=new.pfn)
    await lk.unlock()
    await swap.folio_add_lru(m, new)
    return R.SCAN_SUCCEED


async def retract_page_tables(m, mapping, pgoff: int) -> None:
    """retract_page_tables: every mapper of the block without an anon_vma loses its
    (empty) PTE table, so its next fault maps the new folio by PMD. Context: the new
    folio locked; takes i_mmap_rwsem for read, then the PMD and PTE locks."""
    lk = mapping.i_mmap_rwsem
    await lk.down_read("retract_page_tables")
    for vma in list(mapping.i_mmap):
        if vma.anon_vma is not None:
            continue  # a private mapping written to: not worth it
        addr = vma.address_of(pgoff)
        if addr & ~HPAGE_PMD_MASK or addr < vma.start or vma.end < addr + HPAGE_PMD_SIZE:
            continue
        mm = vma.mm
        res, pmd_tbl = khugepaged.find_pmd_or_thp_or_none(m, mm, addr)
        if res != R.SCAN_SUCCEED or khugepaged.hpage_collapse_test_exit(mm):
            continue
        idx = pmd_index(addr)
        pml = m.table_lock(pmd_tbl)
        await pml.lock("retract_page_tables")
        pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        table = -1
        if pmdval and pmd_present(pmdval) and not pmd_trans_huge(pmdval):
            ptl = m.table_lock(table_pfn(pmdval))
            await ptl.lock("retract_page_tables", subclass=1)
            if vma.anon_vma is None:
                old = await pgg.pmdp_collapse_flush(m, vma, addr, pmd_tbl, idx)
                table = table_pfn(old)
            await ptl.unlock()
        await pml.unlock()
        if table >= 0:
            mm.nr_ptes -= 1
            await tlb.tlb_remove_table(m, mm, table)  # pte_free_defer: after RCU
    await lk.up_read()


async def collapse_pte_mapped_thp(m, mm, addr: int, install_pmd: bool) -> R:
    """collapse_pte_mapped_thp: the page cache holds a PMD-size folio at addr; remove
    this mm's PTE mappings of it and its PTE table, and (install_pmd) map it by PMD.
    Context: mmap lock held for read."""
    from kmm import memory_file
    haddr = addr & HPAGE_PMD_MASK
    vma = mm.vma_lookup(haddr)
    if vma is None or vma.vm_file is None or vma.end < haddr + HPAGE_PMD_SIZE:
        return R.SCAN_VMA_CHECK
    res, pmd_tbl = khugepaged.find_pmd_or_thp_or_none(m, mm, haddr)
    if res == R.SCAN_PMD_MAPPED:
        return res
    from kmm import huge_memory
    if not huge_memory.thp_vma_allowable_order(m, vma, "forced_collapse"):
        return R.SCAN_VMA_CHECK
    inode = vma.vm_file
    index = vma.linear_page_index(haddr)
    folio = await truncate._lock_get(m, inode.mapping, index)
    if folio is None:
        return R.SCAN_PAGE_NULL
    try:
        if folio.order != HPAGE_PMD_ORDER or folio.index != index:
            return R.SCAN_PAGE_COMPOUND
        res, pmd_tbl = khugepaged.find_pmd_or_thp_or_none(m, mm, haddr)
        if res == R.SCAN_SUCCEED:
            if not await _clear_pte_table(m, vma, folio, pmd_tbl, haddr):
                return R.SCAN_FAIL
        elif res not in (R.SCAN_PMD_NULL, R.SCAN_PMD_NONE):
            return res
        if not install_pmd:
            return R.SCAN_SUCCEED
        pmd_tbl = await memory.pmd_alloc(m, mm, haddr)  # set_huge_pmd
        if pmd_tbl < 0:
            return R.SCAN_FAIL
        vmf = memory.Vmf(vma, haddr, False)
        vmf.pmd_tbl, vmf.pmd_idx = pmd_tbl, pmd_index(haddr)
        await atomic.folio_ref_add(m, folio, 1)  # the PMD mapping's reference (folio_get)
        if await memory_file.do_set_pmd(m, vmf, folio):
            await swap.folio_put(m, folio)
            return R.SCAN_FAIL
        return R.SCAN_SUCCEED
    finally:
        await truncate._unlock_put(m, folio)


async def _clear_pte_table(m, vma, folio: Page, pmd_tbl: int, haddr: int) -> bool:
    """Steps 1-4 of collapse_pte_mapped_thp: every present PTE must map the folio's
    page for its index; clear them, drop their rmap and references, free the table."""
    from kmm import rmap
    mm = vma.mm
    idx = pmd_index(haddr)
    pml = m.table_lock(pmd_tbl)
    await pml.lock("collapse_pte_mapped_thp")
    pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if pmd_none(pmdval) or pmd_trans_huge(pmdval) or not pmd_present(pmdval):
        await pml.unlock()
        return not pmd_trans_huge(pmdval)
    tbl = table_pfn(pmdval)
    ptl = m.table_lock(tbl)
    await ptl.lock("collapse_pte_mapped_thp", subclass=1)
    ok = True
    for i in range(HPAGE_PMD_NR):
        e = m.physmem.tables[tbl][i]
        if pte_none(e):
            continue
        if not pte_present(e) or pte_pfn(e) != folio.pfn + i:
            ok = False  # swapped, migrating, or another page (a COW): abort
            break
    nr = 0
    if ok:
        for i in range(HPAGE_PMD_NR):
            e = await atomic.entry_read(m, "pte", tbl, i)
            if pte_none(e):
                continue
            await atomic.entry_get_and_clear(m, "pte", tbl, i)
            await rmap.folio_remove_rmap_ptes(m, folio, folio.pfn + i, 1)
            nr += 1
        await pgg.pmdp_collapse_flush(m, vma, haddr, pmd_tbl, idx)
    await ptl.unlock()
    await pml.unlock()
    if ok:
        if nr:
            await swap.folio_put(m, folio, nr)
            mm.rss_shmem -= nr
        mm.nr_ptes -= 1
        await tlb.tlb_remove_table(m, mm, tbl)  # pte_free_defer
    return ok


async def madvise_collapse_file(m, mm, vma, addr: int, cc) -> R:
    """madvise_collapse's file branch for one block: drop the mmap lock, scan and
    collapse the page cache, then (SCAN_PTE_MAPPED_HUGEPAGE) retake it and map the PMD.
    Returns with the mmap lock released."""
    inode = vma.vm_file
    pgoff = vma.linear_page_index(addr)
    await mm.mmap_lock.up_read()
    result = await hpage_collapse_scan_file(m, mm, addr, inode, pgoff, cc)
    if result == R.SCAN_PTE_MAPPED_HUGEPAGE:
        await mm.mmap_lock.down_read("madvise_collapse")
        result = await collapse_pte_mapped_thp(m, mm, addr, True)
        await mm.mmap_lock.up_read()
    return result


async def khugepaged_scan_file(m, mm, vma, addr: int, cc) -> R:
    """khugepaged_scan_mm_slot's file branch: the same with install_pmd false (the next
    fault maps the PMD); SCAN_PMD_MAPPED counts as success. Returns with the mmap lock
    released."""
    inode = vma.vm_file
    pgoff = vma.linear_page_index(addr)
    await mm.mmap_lock.up_read()
    result = await hpage_collapse_scan_file(m, mm, addr, inode, pgoff, cc)
    if result == R.SCAN_PTE_MAPPED_HUGEPAGE:
        await mm.mmap_lock.down_read("khugepaged_scan_mm_slot")
        if not khugepaged.hpage_collapse_test_exit(mm):
            result = await collapse_pte_mapped_thp(m, mm, addr, False)
            if result == R.SCAN_PMD_MAPPED:
                result = R.SCAN_SUCCEED
        await mm.mmap_lock.up_read()
    return result


assert PAGE_SHIFT == 12 and pte_index(0) == 0
