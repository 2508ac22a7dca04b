"""The mTHP part of the anonymous fault: mm/memory.c alloc_anon_folio and its helpers.

``do_anonymous_page`` (memory.py) asks ``alloc_anon_folio`` for the folio a write fault
maps. It takes the orders below PMD order that the per-size knobs allow for the VMA
(``thp_vma_allowable_orders``), keeps those whose naturally aligned block around the
address lies in the VMA (``thp_vma_suitable_orders``), drops, from the highest down,
every order whose block already has a PTE that is not none (``pte_range_none``, read
without the PTE lock), then tries to allocate the remaining orders highest first with
the THP gfp mask of the ``defrag`` knob, counting ``anon_fault_fallback`` for each order
that could not be had. With no order left it allocates one 4 KiB page.

Because the range was checked without the lock, ``do_anonymous_page`` checks it again
under the PTE lock before ``set_ptes`` (a racing fault may have mapped a page inside
it meanwhile; kmm.bugs ``mthp_no_pte_range_recheck`` removes that check).
Left out: userfaultfd, memcg charging (so anon_fault_fallback_charge never moves).
"""

from __future__ import annotations

from kmm import atomic, huge_memory, huge_memory_mthp as mthp, page_alloc
from kmm.cost import COST_CLEAR_PAGE
from kmm.pgtable import (
    HPAGE_PMD_ORDER, PAGE_SIZE, pmd_none, pmd_present, pmd_trans_huge, pte_dirty,
    pte_index, pte_pfn, pte_present, table_pfn, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_RW,
    _PAGE_SOFT_DIRTY,
)

EAGAIN = "EAGAIN"  # ERR_PTR(-EAGAIN): the PTE table went away, refault


async def pte_range_none(m, tbl: int, idx: int, nr: int) -> bool:
    """pte_range_none: every PTE of [idx, idx + nr) is none. One shared-state read of
    the nr entries (the kernel's ptep_get_lockless loop; no other actor runs between
    them here, which only narrows the windows the lock recheck closes)."""
    # shared-state op: a read of nr consecutive PTEs
    await m.sched.point("pte_range_none", pt=tbl, i=idx, nr=nr)
    t = m.physmem.tables[tbl]
    for i in range(idx, idx + nr):
        if t[i]:
            return False
    return True


# folio_pte_batch's FPB flags for zap: dirty and soft-dirty (and here write and young,
# which zap does not look at) may differ along the batch
_ZAP_IGNORED = _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_RW | _PAGE_ACCESSED


async def folio_pte_batch(m, tbl: int, idx: int, max_nr: int, folio, pte: int):
    """folio_pte_batch (mm/internal.h), as zap_present_ptes uses it: how many PTEs from
    idx map consecutive pages of the folio, alike but for the dirty/young/write bits;
    and whether any is dirty. One shared-state read of the run. Context: PTE lock."""
    # shared-state op: a read of up to max_nr consecutive PTEs
    await m.sched.point("folio_pte_batch", pt=tbl, i=idx, nr=max_nr)
    t = m.physmem.tables[tbl]
    max_nr = min(max_nr, folio.pfn + folio.nr_pages - pte_pfn(pte))
    want = pte & ~_ZAP_IGNORED
    dirty = pte_dirty(pte)
    nr = 1
    while nr < max_nr:
        e = t[idx + nr]
        if not pte_present(e) or e & ~_ZAP_IGNORED != want + (nr << 12):
            break
        dirty |= pte_dirty(e)
        nr += 1
    return nr, dirty


async def alloc_anon_folio(m, vmf):
    """alloc_anon_folio: the folio for a write fault on a none PTE; the largest
    allowed, suitable order whose aligned range is all none and can be allocated,
    else order 0. Returns the head page (zeroed), None when out of memory, or EAGAIN.

    Context: mmap_lock held for read; no PTE lock.
    """
    vma = vmf.vma
    orders = mthp.thp_vma_allowable_orders(m, vma, "pagefault", (1 << HPAGE_PMD_ORDER) - 1)
    orders = mthp.thp_vma_suitable_orders(vma, vmf.address, orders)
    if orders:
        pmdval = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
        if pmd_none(pmdval) or pmd_trans_huge(pmdval) or not pmd_present(pmdval):
            return EAGAIN  # pte_offset_map failed
        tbl = table_pfn(pmdval)
        order = mthp.highest_order(orders)
        while orders:
            addr = vmf.address & ~((PAGE_SIZE << order) - 1)
            if await pte_range_none(m, tbl, pte_index(addr), 1 << order):
                break
            orders, order = mthp.next_order(orders, order)
        if orders:
            gfp = huge_memory.vma_thp_gfp_mask(m, vma)
            while orders:
                addr = vmf.address & ~((PAGE_SIZE << order) - 1)
                pfn = await page_alloc.vma_alloc_folio(m, gfp, order, vma, addr)
                if pfn >= 0:  # folio_zero_user: the folio is ours alone until mapped
                    atomic.step_owned(m, "folio_zero_user", COST_CLEAR_PAGE << order, pfn)
                    return m.physmem.page(pfn)
                mthp.count_mthp_stat(m, order, "anon_fault_fallback")
                orders, order = mthp.next_order(orders, order)
    # folio_prealloc(mm, vma, addr, true): one zeroed page
    pfn = await page_alloc.vma_alloc_folio(m, "GFP_HIGHUSER_MOVABLE", 0, vma, vmf.address)
    if pfn < 0:
        return None
    atomic.step_owned(m, "clear_page", COST_CLEAR_PAGE, pfn)
    return m.physmem.page(pfn)
