"""Large-folio swap-in on a synchronous device: mm/memory.c alloc_swap_folio (6.10+).

On a SWP_SYNCHRONOUS_IO device (zram; what kmm's swap device is) a swap fault whose slot
only this PTE references skips the swap cache. 6.18 then tries to read back a whole
mTHP: of the orders below PMD that the per-size knobs allow for the VMA and whose block
fits the VMA (as for a fresh fault), it keeps those whose swap offset is aligned like
the address (``thp_swap_suitable_orders``), and takes the highest order whose PTE block
holds swap entries of consecutive offsets, alike in their other bits, none of them in
the swap cache and all or none zero-filled (``can_swapin_thp``). An allocation failure
counts ``swpin_fallback`` and tries the next order; order 0 is the fallback.
``do_swap_page`` (memory.py) then maps all the folio's pages at once if the PTEs are
still that batch under the PTE lock. Left out: zswap (never enabled on the host runs),
memcg charging (swpin_fallback_charge never moves).
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, huge_memory_mthp as mthp, page_alloc, page_io, swap, swapfile,
)
from kmm.mm_types import PG_swapbacked, PG_swapcache, Page
from kmm.pgtable import (
    HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, pmd_none, pmd_present, pmd_trans_huge,
    pte_index, swp_entry, swp_offset, swp_type, table_pfn,
    _PAGE_SWP_EXCLUSIVE, _PAGE_SWP_SOFT_DIRTY, _PAGE_SWP_UFFD_WP,
)

EEXIST = 17
_SWP_PTE_BITS = _PAGE_SWP_EXCLUSIVE | _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP


def pte_move_swp_offset(pte: int, delta: int) -> int:
    """pte_move_swp_offset: the same swap PTE (its PTE-only bits kept) for the slot
    ``delta`` away."""
    return swp_entry(swp_type(pte), swp_offset(pte) + delta) | (pte & _SWP_PTE_BITS)


def thp_swap_suitable_orders(offset: int, addr: int, orders: int) -> int:
    """thp_swap_suitable_orders: keep the orders for which the slot and the address
    sit at the same place within a block of that order."""
    out = 0
    o = orders
    while o:
        order = mthp.highest_order(o)
        o &= ~(1 << order)
        nr = 1 << order
        if (addr >> PAGE_SHIFT) % nr == offset % nr:
            out |= 1 << order
    return out


async def swap_pte_batch(m, tbl: int, idx: int, nr: int, pte: int) -> int:
    """swap_pte_batch: how many PTEs from idx are ``pte`` with the offset counting up.
    One shared-state read of the block."""
    # shared-state op: a read of nr consecutive PTEs
    await m.sched.point("swap_pte_batch", pt=tbl, i=idx, nr=nr)
    t = m.physmem.tables[tbl]
    n = 0
    while n < nr and t[idx + n] == pte_move_swp_offset(pte, n):
        n += 1
    return n


def _slots_alike(m, entry: int, nr: int) -> bool:
    """swap_zeromap_batch and non_swapcache_batch over the block: all or none of the
    slots zero-filled, and none in the swap cache."""
    si = m.swap_info
    off = swp_offset(entry)
    zero = [o in si.zeromap for o in range(off, off + nr)]
    if any(zero) and not all(zero):
        return False
    return not any(si.swap_map[o] & swapfile.SWAP_HAS_CACHE for o in range(off, off + nr))


async def can_swapin_thp(m, vmf, tbl: int, order: int) -> bool:
    """can_swapin_thp: the block of ``order`` around the fault holds the faulting swap
    PTE's neighbours, slot by slot."""
    nr = 1 << order
    addr = vmf.address & ~((PAGE_SIZE << order) - 1)
    i = (vmf.address - addr) // PAGE_SIZE
    first = pte_move_swp_offset(vmf.orig_pte, -i)
    if await swap_pte_batch(m, tbl, pte_index(addr), nr, first) != nr:
        return False
    return _slots_alike(m, swapfile.pte_to_swp_entry(first), nr)


async def alloc_swap_folio(m, vmf, entry: int) -> Page | None:
    """alloc_swap_folio: a large folio for the block around the fault when an allowed
    order fits, else one page (__alloc_swap_folio). Not zeroed: the read fills it."""
    vma = vmf.vma
    orders = mthp.thp_vma_allowable_orders(m, vma, "pagefault", (1 << HPAGE_PMD_ORDER) - 1)
    orders = mthp.thp_vma_suitable_orders(vma, vmf.address, orders)
    orders = thp_swap_suitable_orders(swp_offset(entry), vmf.address, orders)
    if orders:
        pmdval = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
        if pmd_none(pmdval) or pmd_trans_huge(pmdval) or not pmd_present(pmdval):
            orders = 0
        else:
            tbl = table_pfn(pmdval)
            ptl = m.table_lock(tbl)
            await ptl.lock("alloc_swap_folio")
            order = mthp.highest_order(orders)
            while orders:
                if await can_swapin_thp(m, vmf, tbl, order):
                    break
                orders, order = mthp.next_order(orders, order)
            await ptl.unlock()
        if orders:
            gfp = huge_memory.vma_thp_gfp_mask(m, vma)
            while orders:
                addr = vmf.address & ~((PAGE_SIZE << order) - 1)
                pfn = await page_alloc.vma_alloc_folio(m, gfp, order, vma, addr)
                if pfn >= 0:
                    return m.physmem.page(pfn)
                mthp.count_mthp_stat(m, order, "swpin_fallback")
                orders, order = mthp.next_order(orders, order)
    pfn = await page_alloc.vma_alloc_folio(m, "GFP_HIGHUSER_MOVABLE", 0, vma, vmf.address)
    return m.physmem.page(pfn) if pfn >= 0 else None


async def swapin_direct(m, vmf, entry: int):
    """do_swap_page's SWP_SYNCHRONOUS_IO path: read the slots into a new folio (an mTHP
    when alloc_swap_folio found one fits) that never enters the swap cache. The slots
    are claimed (swapcache_prepare) until swapcache_clear, so a racing fault on them
    backs off. Returns (folio, first entry): the folio on the LRU, read, unlocked, one
    reference; (None, entry) when out of memory; (-EEXIST, entry) when another swap-in
    holds a slot."""
    folio = await alloc_swap_folio(m, vmf, entry)
    if folio is None:
        return None, entry
    nr = folio.nr_pages
    if nr > 1:
        entry = swp_entry(swp_type(entry), swp_offset(entry) & ~(nr - 1))
    lk = m.folio_lock_of(folio)
    await lk.lock("do_swap_page")  # __folio_set_locked: a new folio, uncontended
    atomic.folio_set_flags_locked(folio, PG_swapbacked)  # a new folio nobody else sees
    if await swapfile.swapcache_prepare(m, entry, nr) < 0:
        await lk.unlock()
        await swap.folio_put(m, folio)
        return -EEXIST, entry
    await swap.folio_add_lru(m, folio)
    atomic.folio_set_field_locked(folio, "swap", entry)  # to give swap_read_folio its slots
    await page_io.swap_read_folio(m, folio)
    atomic.folio_set_field_locked(folio, "swap", 0)
    return folio, entry


def folio_span(vmf, folio, entry: int, direct: bool) -> tuple[int, int]:
    """do_swap_page: how many PTEs, from which slot of the PTE table, the folio is to
    map at once: all of a large folio read in directly; all of a large swap-cache folio
    when its block lies within the VMA and the PMD (the caller then checks, under the
    PTE lock, that the PTEs are still its swap entries); else the faulting PTE alone."""
    nr = folio.nr_pages
    if nr == 1:
        return 1, vmf.pte_idx
    if direct:
        return nr, vmf.pte_idx - (pte_index(vmf.address) & (nr - 1))
    if not folio.flags & PG_swapcache:
        return 1, vmf.pte_idx
    idx = swp_offset(entry) - swp_offset(folio.swap)
    start = vmf.address - idx * PAGE_SIZE
    pmd_start = vmf.address & ~(PMD_SIZE - 1)
    vma = vmf.vma
    if start < max(pmd_start, vma.start) or start + nr * PAGE_SIZE > min(pmd_start + PMD_SIZE,
                                                                       vma.end):
        return 1, vmf.pte_idx
    return nr, vmf.pte_idx - idx
