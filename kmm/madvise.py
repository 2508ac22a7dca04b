"""madvise: mm/madvise.c (and hugepage_madvise from mm/khugepaged.c).

MADV_HUGEPAGE / MADV_NOHUGEPAGE change VM flags (splitting VMAs, and with them a huge
PMD straddling an unaligned boundary); MADV_HUGEPAGE also registers the mm with
khugepaged. MADV_DONTNEED zaps the range under the mmap read lock, splitting a huge
PMD it covers only partly; with CONFIG_PT_RECLAIM (on for x86-64) a PTE table the range
covers wholly and leaves empty is freed. A range with holes is handled where mapped and
returns ENOMEM.

MADV_COLD deactivates and MADV_PAGEOUT reclaims (reclaim_pages) the folios only this mm
maps in the range; MADV_FREE makes them lazyfree (clean, off the swap-backed LRU, so
reclaim may drop them) and throws away swapped-out pages. A THP the range covers whole
is handled whole; one it covers partly is split first (split_folio), if it is not
shared. COLLAPSE comes with the khugepaged issue.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, khugepaged, memory, memory_zap, mmap, pgtable_generic, rmap, swap,
)
from kmm import hugetlb_fault, swapfile, tlb, vmscan
from kmm.mm_types import (
    PG_dirty, PG_lru, PG_referenced, PG_swapcache, VM_HUGEPAGE, VM_HUGETLB, VM_LOCKED,
    VM_NOHUGEPAGE,
)
from kmm.pgtable import (
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_RW, _PAGE_SOFT_DIRTY, HPAGE_PMD_MASK,
    HPAGE_PMD_SIZE, PAGE_SIZE, PMD_SIZE, TASK_SIZE, pmd_dirty, pmd_index, pmd_mkclean,
    pmd_mkold, pmd_pfn, pmd_present, pmd_trans_huge, pmd_young, pte_dirty, pte_index,
    pte_mkclean, pte_mkold, pte_none, pte_pfn, pte_present, pte_special, pte_young,
    table_pfn,
)

ADVICE = {"dontneed": 4, "free": 8, "cold": 20, "pageout": 21, "hugepage": 14,
          "nohugepage": 15, "collapse": 25}
NOT_YET: dict[str, str] = {}


class NotYetSupported(Exception):
    """An advice whose mechanism a later issue brings."""


async def do_madvise(m, task, start: int, length: int, advice: str) -> int | str:
    if advice in NOT_YET:
        raise NotYetSupported(f"madvise {advice} is not yet supported (comes with "
                              f"{NOT_YET[advice]})")
    if advice not in ADVICE or start & (PAGE_SIZE - 1) or length < 0:
        return "EINVAL"
    end = start + mmap.page_align(length)
    if end < start or end > TASK_SIZE:
        return "EINVAL"
    if end == start:
        return 0
    mm = task.mm
    if advice == "collapse":  # madvise_collapse may drop and retake the mmap lock
        return await khugepaged.do_madvise_collapse(m, mm, start, end)
    write = advice in ("hugepage", "nohugepage")
    if write:
        await mm.mmap_lock.down_write("do_madvise")
    else:
        await mm.mmap_lock.down_read("do_madvise")
    try:
        covered = start
        hole = False
        for vma in mmap.vmas_in(mm, start, end):
            if vma.start > covered:
                hole = True
            s, e = max(start, vma.start), min(end, vma.end)
            if vma.flags & VM_HUGETLB:
                err = await hugetlb_fault.madvise_hugetlb(m, vma, s, e, advice)
                if err:
                    return err
            elif write:
                await hugepage_madvise(m, vma, s, e, advice)
            elif advice == "dontneed":
                await madvise_dontneed_single_vma(m, vma, s, e)
            else:
                err = await madvise_lru_advice(m, vma, s, e, advice)
                if err:
                    return err
            covered = e
        if covered < end:
            hole = True
        return "ENOMEM" if hole else 0
    finally:
        if write:
            await mm.mmap_lock.up_write()
        else:
            await mm.mmap_lock.up_read()


async def hugepage_madvise(m, vma, start: int, end: int, advice: str) -> None:
    flags = vma.flags
    if advice == "hugepage":
        flags = (flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE
    else:
        flags = (flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE
    if advice == "hugepage" and vma.vm_file is not None:
        # 6.18: shmem's order check reads vma->vm_flags, which lack VM_HUGEPAGE until
        # the update below, so under shmem_enabled=advise this registers nothing
        khugepaged.khugepaged_enter_vma(m, vma)
    if flags != vma.flags:
        vma = await mmap.vma_modify_flags(m, vma, start, end, flags)
    if advice == "hugepage" and vma.vm_file is None:
        khugepaged.khugepaged_enter_vma(m, vma)


async def madvise_dontneed_single_vma(m, vma, start: int, end: int) -> None:
    """zap_page_range_single_batched(..., reclaim_pt = true)."""
    tlbg = memory_zap.MmuGather(vma.mm)
    await memory_zap.unmap_page_range(m, tlbg, vma, start, end)
    await tlbg.finish(m)
    await reclaim_empty_pte_tables(m, vma, start, end)


async def reclaim_empty_pte_tables(m, vma, start: int, end: int) -> None:
    """try_to_free_pte (mm/pt_reclaim.c): a PTE table the zap covered wholly and left
    empty is detached from its PMD and freed. The emptiness check and the PMD clear
    happen under the PMD lock *and* the table's PTE lock (pte_offset_map_rw_nolock,
    spin_lock_nested): a fault that refilled the table after the zap holds that PTE
    lock while it installs, so it either finishes first (the table is kept) or finds
    the PMD gone when it rechecks pmd_same, and retries."""
    mm = vma.mm
    addr = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    while addr + PMD_SIZE <= end:
        pmd_tbl = memory.pmd_lookup(m, mm, addr)
        if pmd_tbl >= 0:
            idx = pmd_index(addr)
            pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
            if pmd and pmd_present(pmd) and not pmd_trans_huge(pmd):
                ptl = m.table_lock(pmd_tbl)
                await ptl.lock("try_get_and_clear_pmd")
                pte_tbl = table_pfn(pmd)
                cleared = False
                if await atomic.entry_read(m, "pmd", pmd_tbl, idx) == pmd:
                    pte_ptl = m.table_lock(pte_tbl)
                    await pte_ptl.lock("try_to_free_pte", subclass=1)
                    if not any(m.physmem.tables[pte_tbl]):
                        await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, idx)
                        mm.nr_ptes -= 1
                        cleared = True
                    await pte_ptl.unlock()
                await ptl.unlock()
                if cleared:  # free_pte: pte_free_tlb, freed after an RCU grace period
                    await tlb.tlb_remove_table(m, mm, pte_tbl)
        addr += PMD_SIZE


# ------------------------------------------------- COLD, PAGEOUT and FREE
_BATCH_IGNORED = _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_RW | _PAGE_ACCESSED


async def madvise_lru_advice(m, vma, start: int, end: int, advice: str) -> str | int:
    """madvise_cold / madvise_pageout / madvise_dontneed_free(MADV_FREE) for one VMA:
    walk its PMDs in [start, end). EINVAL for a VM_LOCKED VMA (can_madv_lru_vma,
    madvise_dontneed_free_valid_vma). Context: mmap_lock held for read."""
    if vma.flags & VM_LOCKED:
        return "EINVAL"
    if advice == "free" and vma.vm_file is not None:
        return "EINVAL"  # madvise_dontneed_free_valid_vma: MADV_FREE is for anonymous VMAs
    addr = start
    while addr < end:
        nxt = min((addr & HPAGE_PMD_MASK) + HPAGE_PMD_SIZE, end)  # pmd_addr_end
        pmd_tbl = memory.pmd_lookup(m, vma.mm, addr)
        if pmd_tbl >= 0 and await atomic.entry_read(m, "pmd", pmd_tbl, pmd_index(addr)):
            if advice == "free":
                await madvise_free_pte_range(m, vma, pmd_tbl, addr, nxt)
            else:
                await madvise_cold_or_pageout_pte_range(m, vma, pmd_tbl, addr, nxt,
                                                        advice == "pageout")
        addr = nxt
    return 0


async def madvise_folio_pte_batch(m, tbl: int, addr: int, end: int, folio, ptent: int):
    """madvise_folio_pte_batch (folio_pte_batch with FPB_MERGE_YOUNG_DIRTY): how many
    PTEs from addr map consecutive pages of the folio alike (dirty, soft-dirty, write
    and young ignored, and merged into any_young/any_dirty). Context: PTE lock held."""
    pfn = pte_pfn(ptent)
    max_nr = min((end - addr) // PAGE_SIZE, folio.pfn + folio.nr_pages - pfn)
    want = ptent & ~_BATCH_IGNORED
    any_young, any_dirty = pte_young(ptent), pte_dirty(ptent)
    i = pte_index(addr)
    nr = 1
    while nr < max_nr:
        e = await atomic.entry_read(m, "pte", tbl, i + nr)
        if not pte_present(e) or e & ~_BATCH_IGNORED != want + (nr << 12):
            break
        any_young |= pte_young(e)
        any_dirty |= pte_dirty(e)
        nr += 1
    return nr, any_young, any_dirty


async def _split_folio_unlocked(m, folio) -> int:
    """folio_get; (PTE or PMD lock dropped by the caller); split_folio; folio_put.
    Context: the folio lock held by the caller."""
    await atomic.folio_ref_add(m, folio, 1)
    err = await huge_memory.split_folio_to_list(m, folio, None)
    await m.folio_lock_of(folio).unlock()
    await swap.folio_put(m, folio)
    return err


async def _split_partly_covered(m, folio, tbl: int, ptl, pmd_tbl: int, idx: int,
                                site: str):
    """A large folio the range covers only in part is split (if only this mm maps it
    and it can be locked at once), dropping the PTE lock meanwhile; the walk then looks
    at the same address again. Returns (table, ptl, split?) with the PTE lock held
    again, or None when the PTE table went away."""
    split = False
    lk = m.folio_lock_of(folio)
    if not rmap.folio_maybe_mapped_shared(m, folio) and await lk.trylock(site):
        await ptl.unlock()
        split = not await _split_folio_unlocked(m, folio)
        res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
        if res is None:
            return None
        tbl, ptl = res
    return tbl, ptl, split


async def madvise_cold_or_pageout_pte_range(m, vma, pmd_tbl: int, addr: int, end: int,
                                            pageout: bool) -> None:
    """madvise_cold_or_pageout_pte_range: deactivate (COLD: also clearing the young
    bits) or isolate and reclaim (PAGEOUT) the folios of one PMD range that only this
    mm maps. A PMD-mapped THP inside the range is handled whole; one the range covers
    partly, and a PTE-mapped THP the range does not cover whole, is split first.
    Context: mmap_lock held for read; takes the PMD or PTE lock."""
    mm = vma.mm
    idx = pmd_index(addr)
    folios = []
    pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if pmd_trans_huge(pmdval):
        ptl = m.table_lock(pmd_tbl)
        await ptl.lock("madvise_cold_or_pageout_pte_range")  # pmd_trans_huge_lock
        orig = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if not pmd_trans_huge(orig):
            await ptl.unlock()
            return
        split = False
        if (pmd_present(orig) and not huge_memory.is_huge_zero_pmd(m, orig)
                and not rmap.folio_maybe_mapped_shared(m, m.physmem.page(pmd_pfn(orig)))):
            folio = m.physmem.page(pmd_pfn(orig))
            if end - addr != HPAGE_PMD_SIZE:
                split = True
            else:
                if not pageout and pmd_young(orig):
                    haddr = addr & HPAGE_PMD_MASK
                    await pgtable_generic.pmdp_invalidate(m, vma, haddr, pmd_tbl, idx)
                    await atomic.entry_set(m, "pmd", pmd_tbl, idx, pmd_mkold(orig))
                atomic.folio_clear_flags_locked(folio, PG_referenced)
                if pageout:
                    if await swap.folio_isolate_lru(m, folio):
                        folios.append(folio)
                else:
                    await swap.folio_deactivate(m, folio)
        await ptl.unlock()
        if not split:
            if pageout:
                await vmscan.reclaim_pages(m, folios)
            return
        await atomic.folio_ref_add(m, folio, 1)
        lk = m.folio_lock_of(folio)
        await lk.lock("madvise_cold_or_pageout_pte_range")
        err = await huge_memory.split_folio_to_list(m, folio, None)
        await lk.unlock()
        await swap.folio_put(m, folio)
        if err:
            return
    # regular_folio
    res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
    if res is None:
        return
    tbl, ptl = res
    a = addr
    flushed_from = None
    while a < end:
        nr = 1
        i = pte_index(a)
        ptent = await atomic.entry_read(m, "pte", tbl, i)
        if pte_none(ptent) or not pte_present(ptent) or pte_special(ptent):
            a += PAGE_SIZE
            continue
        folio = m.physmem.folio(pte_pfn(ptent))
        if folio.order:
            nr, any_young, _ = await madvise_folio_pte_batch(m, tbl, a, end, folio, ptent)
            if any_young:
                ptent |= _PAGE_ACCESSED
            if nr < folio.nr_pages:  # not covered whole: split it, then look again
                res = await _split_partly_covered(m, folio, tbl, ptl, pmd_tbl, idx,
                                                  "madvise_cold_or_pageout_pte_range")
                if res is None:  # the PTE table went away meanwhile: done
                    ptl = None
                    break
                tbl, ptl, split = res
                a += 0 if split else nr * PAGE_SIZE
                continue
        # a large folio here is mapped whole by this range: mapcount == nr_pages
        # means nobody else maps any of it
        if not folio.flags & PG_lru or rmap.folio_mapcount(folio) != folio.nr_pages:
            a += nr * PAGE_SIZE
            continue
        if not pageout and pte_young(ptent):  # clear_young_dirty_ptes(CYDP_CLEAR_YOUNG)
            for j in range(nr):
                e = await atomic.entry_read(m, "pte", tbl, i + j)
                if pte_young(e):
                    await atomic.entry_set(m, "pte", tbl, i + j, pte_mkold(e))
            flushed_from = a if flushed_from is None else flushed_from
        atomic.folio_clear_flags_locked(folio, PG_referenced)
        if pageout:
            if await swap.folio_isolate_lru(m, folio):
                folios.append(folio)
        else:
            await swap.folio_deactivate(m, folio)
        a += nr * PAGE_SIZE
    if flushed_from is not None:  # tlb_remove_tlb_entries, flushed before the unlock
        await tlb.flush_tlb_mm_range(m, mm, flushed_from, end)
    if ptl is not None:
        await ptl.unlock()
    if pageout:
        await vmscan.reclaim_pages(m, folios)


async def madvise_free_huge_pmd(m, vma, pmd_tbl: int, addr: int, end: int) -> bool:
    """madvise_free_huge_pmd (mm/huge_memory.c): a THP mapped only here and covered
    whole becomes lazyfree, its PMD clean and old; one covered partly is split (False:
    the caller goes on with its PTEs). Context: mmap_lock read; takes the PMD lock."""
    idx = pmd_index(addr)
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("madvise_free_huge_pmd")  # pmd_trans_huge_lock
    orig = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if (not pmd_trans_huge(orig) or not pmd_present(orig)
            or huge_memory.is_huge_zero_pmd(m, orig)):
        await ptl.unlock()
        return False
    folio = m.physmem.page(pmd_pfn(orig))
    lk = m.folio_lock_of(folio)
    if (rmap.folio_maybe_mapped_shared(m, folio)
            or not await lk.trylock("madvise_free_huge_pmd")):
        await ptl.unlock()
        return False
    if end - addr != HPAGE_PMD_SIZE:  # discard part of the THP: split it
        await ptl.unlock()
        await _split_folio_unlocked(m, folio)
        return False
    atomic.folio_clear_flags_locked(folio, PG_dirty)  # folio_clear_dirty
    await lk.unlock()
    if pmd_young(orig) or pmd_dirty(orig):
        haddr = addr & HPAGE_PMD_MASK
        await pgtable_generic.pmdp_invalidate(m, vma, haddr, pmd_tbl, idx)
        await atomic.entry_set(m, "pmd", pmd_tbl, idx, pmd_mkclean(pmd_mkold(orig)))
    await swap.folio_mark_lazyfree(m, folio)
    await ptl.unlock()
    return True


async def madvise_free_pte_range(m, vma, pmd_tbl: int, addr: int, end: int) -> None:
    """madvise_free_pte_range: in one PMD range, swapped-out pages are dropped (their
    slots freed), and each folio only this mm maps becomes lazyfree: its PTEs clean
    and old, its swap cache copy dropped, the folio clean and on the file LRU without
    PG_swapbacked. A THP not covered whole is split first. Context: mmap_lock held for
    read; takes the PTE lock."""
    mm = vma.mm
    idx = pmd_index(addr)
    if pmd_trans_huge(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
        if await madvise_free_huge_pmd(m, vma, pmd_tbl, addr, end):
            return
    res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
    if res is None:
        return
    tbl, ptl = res
    cleared_from = None
    a = addr
    while a < end:
        nr = 1
        i = pte_index(a)
        ptent = await atomic.entry_read(m, "pte", tbl, i)
        if pte_none(ptent):
            a += PAGE_SIZE
            continue
        if not pte_present(ptent):
            # a swap entry: just clear it; swap-in would cost more than a new page
            if swapfile.is_swap_entry(m, ptent):
                await atomic.entry_get_and_clear(m, "pte", tbl, i)
                mm.swapents -= 1
                await swapfile.free_swap_and_cache(m, swapfile.pte_to_swp_entry(ptent))
            a += PAGE_SIZE
            continue
        if pte_special(ptent):
            a += PAGE_SIZE
            continue
        folio = m.physmem.folio(pte_pfn(ptent))
        if folio.order:
            nr, any_young, any_dirty = await madvise_folio_pte_batch(m, tbl, a, end, folio,
                                                                     ptent)
            if nr < folio.nr_pages:
                res = await _split_partly_covered(m, folio, tbl, ptl, pmd_tbl, idx,
                                                  "madvise_free_pte_range")
                if res is None:  # the PTE table went away meanwhile: done
                    ptl = None
                    break
                tbl, ptl, split = res
                a += 0 if split else nr * PAGE_SIZE
                continue
            if any_young:
                ptent |= _PAGE_ACCESSED
            if any_dirty:
                ptent |= _PAGE_DIRTY
        if folio.flags & (PG_swapcache | PG_dirty):
            lk = m.folio_lock_of(folio)
            if not await lk.trylock("madvise_free_pte_range"):
                a += nr * PAGE_SIZE
                continue
            # a large folio here is mapped whole by this range: mapcount == nr_pages
            # means it is exclusive
            if rmap.folio_mapcount(folio) != folio.nr_pages or (
                    folio.flags & PG_swapcache and not await swapfile.folio_free_swap(m, folio)):
                await lk.unlock()
                a += nr * PAGE_SIZE
                continue
            atomic.folio_clear_flags_locked(folio, PG_dirty)
            await lk.unlock()
        if pte_young(ptent) or pte_dirty(ptent):  # CYDP_CLEAR_YOUNG | CYDP_CLEAR_DIRTY
            for j in range(nr):
                e = await atomic.entry_read(m, "pte", tbl, i + j)
                if pte_young(e) or pte_dirty(e):
                    await atomic.entry_set(m, "pte", tbl, i + j, pte_mkclean(pte_mkold(e)))
            cleared_from = a if cleared_from is None else cleared_from
        await swap.folio_mark_lazyfree(m, folio)
        a += nr * PAGE_SIZE
    if cleared_from is not None:
        # no CPU may keep writing through a dirty translation once the PTE is clean
        await tlb.flush_tlb_mm_range(m, mm, cleared_from, end)
    if ptl is not None:
        await ptl.unlock()
