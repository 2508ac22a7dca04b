"""The collapse itself: mm/khugepaged.c collapse_huge_page and its helpers.

``collapse_huge_page`` turns one PTE table's worth of small pages (and PTE-mapped large
folios) into a new PMD-mapped THP, with the kernel's lock sequence: allocate with no
mmap lock, revalidate under the read lock, swap in what the scan allowed, then take the
mmap write lock, revalidate again, the anon_vma write lock, the PMD lock to clear and
flush the PMD (``pmdp_collapse_flush``), the PTE lock of the now detached table to lock
and isolate every source folio; copy (zero-filling none and zero-page entries), and
install the new folio's PMD over the old table, deposited. Every failure after the PMD
was cleared puts the old table back and the sources back on the LRU. The result is
always a new, exclusive, writable THP; shared sources stay mapped elsewhere.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, khugepaged, mmdebug, page_alloc, pgtable_generic as pgg, rmap, swap, tlb,
)
from kmm.cost import COST_CLEAR_PAGE, COST_COPY_PAGE
from kmm.mm_types import PG_swapcache, PG_uptodate
from kmm.pgtable import (
    HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SIZE, is_swap_pte, mk_table_entry, pmd_index,
    pmd_none, pmd_present, pmd_trans_huge, pte_none, pte_pfn, pte_present, pte_special,
    table_pfn,
)

R = khugepaged.ScanResult


def hpage_collapse_find_target_node(m, cc) -> int:
    """hpage_collapse_find_target_node: the first node holding the most of the scanned
    pages; every node that ties with it goes into cc->alloc_nmask (the allocation may
    fall back to those only). With no tally (no page present) that is node 0 and every
    node."""
    load = cc.node_load
    target, best = 0, 0
    for nid in sorted(load):
        if load[nid] > best:
            target, best = nid, load[nid]
    cc.alloc_nmask.clear()
    cc.alloc_nmask.update(n for n in range(len(m.node_data)) if load.get(n, 0) == best)
    return target


async def alloc_charge_folio(m, mm, cc) -> tuple[khugepaged.ScanResult, object]:
    """alloc_charge_folio: the order-9 folio to collapse into. khugepaged may reclaim
    and compact only with khugepaged/defrag set; MADV_COLLAPSE always may. Counts
    thp_collapse_alloc (even if the collapse fails later) or thp_collapse_alloc_failed."""
    if cc.is_khugepaged and not m.sysfs["khugepaged/defrag"]:
        gfp = "GFP_TRANSHUGE_LIGHT"
    else:
        gfp = "GFP_TRANSHUGE"
    node = hpage_collapse_find_target_node(m, cc)
    pfn = await page_alloc.alloc_pages(m, HPAGE_PMD_ORDER, gfp, "thp", node, cc.alloc_nmask)
    if pfn < 0:
        m.vmstat.count_vm_event("thp_collapse_alloc_failed")
        return R.SCAN_ALLOC_HUGE_PAGE_FAIL, None
    m.vmstat.count_vm_event("thp_collapse_alloc")
    return R.SCAN_SUCCEED, m.physmem.page(pfn)


async def collapse_huge_page(m, mm, address: int, referenced: int, unmapped: int,
                             cc) -> khugepaged.ScanResult:
    """collapse_huge_page: collapse the 2 MiB block at address (see the module note).
    Emits mm_collapse_huge_page.

    Context: called with the mmap lock held for read; returns with it released.
    """
    await mm.mmap_lock.up_read()  # no mmap lock across a possibly slow allocation
    result, folio = await alloc_charge_folio(m, mm, cc)
    if result == R.SCAN_SUCCEED:
        result = await _collapse(m, mm, address, folio, referenced, unmapped, cc)
        if result == R.SCAN_SUCCEED:
            folio = None  # mapped now
    if folio is not None:
        await swap.folio_put(m, folio)
    await khugepaged.trace_event(m, "mm_collapse_huge_page", mm=mm.id,
                                 isolated=int(result == R.SCAN_SUCCEED), status=result.status)
    return result


async def _collapse(m, mm, address: int, folio, referenced: int, unmapped: int, cc):
    """From mmap_read_lock to mmap_write_unlock (out_up_write / out_nolock)."""
    await mm.mmap_lock.down_read("collapse_huge_page")
    result, vma = khugepaged.hugepage_vma_revalidate(m, mm, address, True, cc)
    if result == R.SCAN_SUCCEED:
        result, pmd_tbl = khugepaged.find_pmd_or_thp_or_none(m, mm, address)
    if result != R.SCAN_SUCCEED:
        await mm.mmap_lock.up_read()
        return result
    if unmapped:
        result = await __collapse_huge_page_swapin(m, mm, vma, address, pmd_tbl, referenced)
        if result != R.SCAN_SUCCEED:
            return result  # the swap-in released the mmap lock
    await mm.mmap_lock.up_read()
    if m.bugs and "collapse_mmap_read_lock" in m.bugs:  # kmm.bugs: faults not excluded
        await mm.mmap_lock.down_read("collapse_huge_page")
        # no finally: a KernelBug leaves the read lock to madvise's own release
        result = await _collapse_write_locked(m, mm, address, folio, pmd_tbl, cc)
        await mm.mmap_lock.up_read()
        return result
    # stops every fault (and UFFDIO_MOVE): from here the VMA and the page tables are ours
    await mm.mmap_lock.down_write("collapse_huge_page")
    try:
        return await _collapse_write_locked(m, mm, address, folio, pmd_tbl, cc)
    finally:
        await mm.mmap_lock.up_write()


def check_pmd_still_valid(m, mm, address: int, pmd_tbl: int) -> khugepaged.ScanResult:
    """check_pmd_still_valid: the PMD is still a page table, in the same PMD table."""
    result, new = khugepaged.find_pmd_or_thp_or_none(m, mm, address)
    if result != R.SCAN_SUCCEED:
        return result
    return R.SCAN_SUCCEED if new == pmd_tbl else R.SCAN_FAIL


async def _collapse_write_locked(m, mm, address: int, folio, pmd_tbl: int, cc):
    result, vma = khugepaged.hugepage_vma_revalidate(m, mm, address, True, cc)
    if result == R.SCAN_SUCCEED:
        result = check_pmd_still_valid(m, mm, address, pmd_tbl)
    if result != R.SCAN_SUCCEED:
        return result
    # vma_start_write: per-VMA-lock faults are not modelled (faults take the mmap lock)
    mmdebug.mmap_assert_write_locked(m, mm, "collapse_huge_page (vma_start_write)")
    await m.sched.point("vma_start_write", vma=vma.start)
    anon_rwsem = vma.anon_vma.root.rwsem
    await anon_rwsem.down_write("collapse_huge_page")  # stops rmap walkers
    idx = pmd_index(address)
    pmd_ptl = m.table_lock(pmd_tbl)
    await pmd_ptl.lock("collapse_huge_page")
    orig_pmd = await pgg.pmdp_collapse_flush(m, vma, address, pmd_tbl, idx)
    await pmd_ptl.unlock()
    # GUP-fast may still walk the detached table with IRQs off: wait for it
    await tlb.tlb_remove_table_sync_one(m)
    # pte_offset_map_lock through the saved _pmd: no table behind a none (or huge, or
    # non-present) entry, which check_pmd_still_valid under the write lock rules out
    pte_tbl = table_pfn(orig_pmd)
    compound: list = []
    if pmd_none(orig_pmd) or pmd_trans_huge(orig_pmd) or not pmd_present(orig_pmd):
        result = R.SCAN_PMD_NULL
    else:
        pte_ptl = m.table_lock(pte_tbl)
        await pte_ptl.lock("collapse_huge_page")
        result = await __collapse_huge_page_isolate(m, vma, address, pte_tbl, cc, compound)
        await pte_ptl.unlock()
    if result != R.SCAN_SUCCEED:
        await pmd_ptl.lock("collapse_huge_page")
        if not pmd_none(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
            m.bug(f"collapse_huge_page: PMD {pmd_tbl:#x}[{idx}] refilled while cleared")
        # pmd_populate(pmd_pgtable(_pmd)): the table the saved entry names, whatever
        # it is (the page of pfn 0 for a none entry)
        await atomic.entry_set(m, "pmd", pmd_tbl, idx, mk_table_entry(pte_tbl))
        await pmd_ptl.unlock()
        await anon_rwsem.up_write()
        return result
    # every source is isolated and locked: rmap walkers can no longer reach them
    await anon_rwsem.up_write()
    result = await __collapse_huge_page_copy(m, pte_tbl, folio, pmd_tbl, idx, vma, address,
                                             pte_ptl, compound)
    if result != R.SCAN_SUCCEED:
        return result
    # __folio_mark_uptodate: the copy before the PMD write
    atomic.folio_set_flags_locked(folio, PG_uptodate)
    await pmd_ptl.lock("collapse_huge_page")
    if not pmd_none(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
        m.bug(f"collapse_huge_page: PMD {pmd_tbl:#x}[{idx}] refilled while cleared")
    await pgg.pgtable_trans_huge_deposit(m, mm, pmd_tbl, pte_tbl)
    await huge_memory.map_anon_folio_pmd_nopf(m, folio.pfn, pmd_tbl, idx, vma, address)
    await pmd_ptl.unlock()
    return R.SCAN_SUCCEED


# ------------------------------------------------------------------ swap-in
async def __collapse_huge_page_swapin(m, mm, vma, haddr: int, pmd_tbl: int,
                                      referenced: int) -> khugepaged.ScanResult:
    """__collapse_huge_page_swapin: fault every swap PTE of the block back in
    (do_swap_page, as a read fault), so the collapse finds present pages. On failure
    the mmap lock is released (the kernel's VM_FAULT_RETRY convention). Emits
    mm_collapse_huge_page_swapin. Context: mmap lock held for read."""
    from kmm import memory
    idx = pmd_index(haddr)
    swapped_in = 0
    result = R.SCAN_SUCCEED
    for i in range(HPAGE_PMD_NR):
        pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)  # pte_offset_map_nolock
        if pmd_none(pmdval) or pmd_trans_huge(pmdval) or not pmd_present(pmdval):
            await mm.mmap_lock.up_read()
            result = R.SCAN_PMD_NULL
            break
        tbl = table_pfn(pmdval)
        pte = await atomic.entry_read(m, "pte", tbl, i)  # ptep_get_lockless
        if not is_swap_pte(pte):
            continue
        vmf = memory.Vmf(vma, haddr + i * PAGE_SIZE, False)
        vmf.pmd_tbl, vmf.pmd_idx, vmf.orig_pmd = pmd_tbl, idx, pmdval
        vmf.pte_tbl, vmf.pte_idx, vmf.orig_pte = tbl, i, pte
        ret = await memory.do_swap_page(m, vmf)
        if ret & (memory.VM_FAULT_OOM | memory.VM_FAULT_SIGSEGV):  # VM_FAULT_ERROR
            await mm.mmap_lock.up_read()
            result = R.SCAN_FAIL
            break
        swapped_in += 1
    await khugepaged.trace_event(m, "mm_collapse_huge_page_swapin", mm=mm.id,
                                 swapped_in=swapped_in, referenced=referenced, ret=int(result))
    return result


# ---------------------------------------------------------------- isolate
async def release_pte_folio(m, folio) -> None:
    """release_pte_folio: unlock an isolated source and put it back on the LRU."""
    await m.folio_lock_of(folio).unlock()
    await swap.folio_putback_lru(m, folio)


async def __collapse_huge_page_isolate(m, vma, address: int, tbl: int, cc,
                                       compound: list) -> khugepaged.ScanResult:
    """__collapse_huge_page_isolate: with the PMD cleared, re-check every PTE of the
    detached table with the scan's limits (a swap entry now is SCAN_PTE_NON_PRESENT),
    then lock (trylock: never sleep on a folio under the PTE lock) and isolate each
    source folio from the LRU, a large one once (``compound``). On failure the folios
    isolated so far are released. Emits mm_collapse_huge_page_isolate.

    Context: the detached table's PTE lock held.
    """
    none_or_zero = shared = referenced = 0
    result = R.SCAN_FAIL
    pfn = -1
    khugepaged_cc = cc.is_khugepaged
    max_none = m.sysfs["khugepaged/max_ptes_none"]
    max_shared = m.sysfs["khugepaged/max_ptes_shared"]
    cache: dict = {}
    small: list = []
    for i in range(HPAGE_PMD_NR):
        pte = await atomic.entry_read(m, "pte", tbl, i)
        if pte_none(pte) or (pte_present(pte) and m.is_zero_pfn(pte_pfn(pte))):
            none_or_zero += 1
            if not khugepaged_cc or none_or_zero <= max_none:
                continue
            result = R.SCAN_EXCEED_NONE_PTE
            m.vmstat.count_vm_event("thp_scan_exceed_none_pte")
            break
        if not pte_present(pte):
            result = R.SCAN_PTE_NON_PRESENT
            break
        if pte_special(pte):
            result = R.SCAN_PAGE_NULL
            break
        folio = m.physmem.folio(pte_pfn(pte))
        pfn = folio.pfn
        if folio.anon_vma is None:
            m.bug(f"__collapse_huge_page_isolate: {folio!r} is not anonymous")
        if khugepaged.folio_maybe_mapped_shared(m, folio, cache):
            shared += 1
            if khugepaged_cc and shared > max_shared:
                result = R.SCAN_EXCEED_SHARED_PTE
                m.vmstat.count_vm_event("thp_scan_exceed_share_pte")
                break
        if not (folio.order and folio in compound):
            lk = m.folio_lock_of(folio)
            if not await lk.trylock("__collapse_huge_page_isolate"):
                result = R.SCAN_PAGE_LOCK
                break
            # no GUP pin can come from this mm now (its table is detached)
            if not khugepaged.is_refcount_suitable(folio):
                await lk.unlock()
                result = R.SCAN_PAGE_COUNT
                break
            if not await swap.folio_isolate_lru(m, folio):
                await lk.unlock()
                result = R.SCAN_DEL_PAGE_LRU
                break
            (compound if folio.order else small).append(folio)
        if khugepaged_cc and khugepaged.pte_referenced(pte, folio):
            referenced += 1
    else:
        if khugepaged_cc and not referenced:
            result = R.SCAN_LACK_REFERENCED_PAGE
        else:
            result = R.SCAN_SUCCEED
    if result != R.SCAN_SUCCEED:  # release_pte_pages
        for folio in small + compound:
            await release_pte_folio(m, folio)
        compound.clear()
    await khugepaged.trace_event(m, "mm_collapse_huge_page_isolate", pfn=pfn,
                                 none_or_zero=none_or_zero, referenced=referenced,
                                 status=result.status)
    return result


# ------------------------------------------------------------------- copy
async def __collapse_huge_page_copy(m, tbl: int, folio, pmd_tbl: int, idx: int, vma,
                                    address: int, ptl, compound: list) -> khugepaged.ScanResult:
    """__collapse_huge_page_copy: copy each present page into the new folio and clear
    the slots of none and zero-page entries; then empty the old table: drop each
    source's mapping and reference, free what nobody else maps, put the large sources
    back on the LRU (__collapse_huge_page_copy_succeeded). The emulated copy cannot meet
    a poisoned page, so SCAN_COPY_MC never happens. Context: the table is detached."""
    pm = m.physmem
    entries = pm.tables[tbl]  # nobody else can reach the detached table
    for i in range(HPAGE_PMD_NR):
        pte = entries[i]
        dst = folio.pfn + i
        if pte_none(pte) or m.is_zero_pfn(pte_pfn(pte)):
            pm.clear(dst)
            atomic.step_owned(m, "clear_user_highpage", COST_CLEAR_PAGE, dst)
        else:
            pm.copy(dst, pte_pfn(pte))
            await m.sched.point("copy_mc_user_highpage", COST_COPY_PAGE, dst=dst,
                                src=pte_pfn(pte))
    await __collapse_huge_page_copy_succeeded(m, tbl, vma, address, ptl, compound)
    return R.SCAN_SUCCEED


async def __collapse_huge_page_copy_succeeded(m, tbl: int, vma, address: int, ptl,
                                              compound: list) -> None:
    """__collapse_huge_page_copy_succeeded: the old table ends empty. A none or zero
    slot now counts in MM_ANONPAGES (the THP covers it); a small source goes back to
    the LRU and loses the mapping's reference (freed unless shared); a large one loses a
    mapping per entry and is put back once at the end."""
    mm = vma.mm
    entries = m.physmem.tables[tbl]
    i = 0
    while i < HPAGE_PMD_NR:
        pte = await atomic.entry_read(m, "pte", tbl, i)
        if pte_none(pte) or m.is_zero_pfn(pte_pfn(pte)):
            mm.rss_anon += 1
            if not pte_none(pte):
                await ptl.lock("__collapse_huge_page_copy_succeeded")
                await atomic.entry_get_and_clear(m, "pte", tbl, i)  # ptep_clear
                await ptl.unlock()
            i += 1
            continue
        pfn = pte_pfn(pte)
        src = m.physmem.folio(pfn)
        nr = 1
        if src.order:
            # folio_pte_batch: the following entries mapping the next pages of the same
            # folio go in one rmap update, so a fully mapped source is never seen
            # partially mapped (no deferred split for it)
            end = src.pfn + src.nr_pages
            while (i + nr < HPAGE_PMD_NR and pte_present(entries[i + nr])
                   and pte_pfn(entries[i + nr]) == pfn + nr and pfn + nr < end):
                nr += 1
        else:
            await release_pte_folio(m, src)
        await ptl.lock("__collapse_huge_page_copy_succeeded")
        for j in range(i, i + nr):  # clear_ptes: the PMD flush covered them
            await atomic.entry_get_and_clear(m, "pte", tbl, j)
        await rmap.folio_remove_rmap_ptes(m, src, pfn, nr)
        await ptl.unlock()
        await free_page_and_swap_cache(m, src, nr)
        i += nr
    for src in compound:
        await m.folio_lock_of(src).unlock()
        if src.flags & PG_swapcache:
            from kmm import swap_state
            await swap_state.free_swap_cache(m, src)
        await swap.folio_putback_lru(m, src)
    compound.clear()


async def free_page_and_swap_cache(m, folio, nr: int = 1) -> None:
    """free_swap_cache + folio_put_refs: drop the folio from the swap cache if nothing
    maps it any more, then drop ``nr`` references (the mappings just removed)."""
    if folio.flags & PG_swapcache:
        from kmm import swap_state
        await swap_state.free_swap_cache(m, folio)
    await swap.folio_put(m, folio, nr)
