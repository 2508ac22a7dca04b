"""Page-table views and accessed-bit clearing: mm/page_idle.c and the young-bit
helpers of mm/pgtable-generic.c (ptep/pmdp_test_and_clear_young).

``page_table_view`` is a lockless walk's snapshot of a range (pmdp_get_lockless,
ptep_get_lockless), taken between two points: no point of its own, no lock.
``clear_young`` tests and clears the accessed bits of a range as the page-idle
tracker (and reclaim's folio_referenced) does, under the mmap lock for read and each
PMD or PTE lock; every entry read and every clear is a preemption point (kmm.atomic),
since the hardware walker sets the same bits locklessly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmm import atomic, memory, tlb
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE, is_swap_pte, pmd_dirty,
    pmd_index, pmd_mkold, pmd_none, pmd_pfn, pmd_present, pmd_trans_huge, pmd_write,
    pmd_young, pte_dirty, pte_index, pte_mkold, pte_none, pte_pfn, pte_present, pte_young,
    table_pfn,
)


@dataclass(frozen=True, slots=True)
class PmdView:
    """One 2 MiB block of an address space as the page tables map it.

    ``kind`` is "none" (no PMD, or an empty one), "huge" (a PMD-mapped THP: ``pfn`` is
    its head, ``young``/``dirty``/``writable`` the PMD's bits), "table" (a PTE table:
    ``pfn`` is the table page; the counts sum its 512 entries) or "nonpresent" (a PMD
    migration entry). ``ptes``, when asked for, has one ``[present, young, dirty, pfn]``
    per PTE (pfn -1 when not present)."""

    addr: int
    kind: str
    pfn: int = -1
    young: bool = False
    dirty: bool = False
    writable: bool = False
    present: int = 0      # present PTEs (the huge zero page's and the 4K zero page's too)
    young_ptes: int = 0
    dirty_ptes: int = 0
    none_ptes: int = 0
    swap_ptes: int = 0    # swap and migration entries
    zero_ptes: int = 0    # present PTEs of the shared zero page
    ptes: list | None = None


def page_table_view(m, mm, start: int, end: int, ptes: bool = False) -> list[PmdView]:
    """walk_page_range's lockless view of [start, end) of mm: one PmdView per 2 MiB
    block the range touches (``ptes``: with every PTE)."""
    out = []
    tables = m.physmem.tables
    addr = start & HPAGE_PMD_MASK
    while addr < end:
        pmd_tbl = memory.pmd_lookup(m, mm, addr)
        e = tables[pmd_tbl][pmd_index(addr)] if pmd_tbl >= 0 else 0
        if pmd_none(e):
            out.append(PmdView(addr, "none"))
        elif not pmd_present(e):
            out.append(PmdView(addr, "nonpresent"))
        elif pmd_trans_huge(e):
            out.append(PmdView(addr, "huge", pmd_pfn(e), pmd_young(e), pmd_dirty(e),
                               pmd_write(e), present=HPAGE_PMD_NR,
                               young_ptes=HPAGE_PMD_NR if pmd_young(e) else 0,
                               dirty_ptes=HPAGE_PMD_NR if pmd_dirty(e) else 0,
                               zero_ptes=HPAGE_PMD_NR if m.is_huge_zero_pfn(pmd_pfn(e)) else 0))
        else:
            tbl = table_pfn(e)
            present = young = dirty = none = swap = zero = 0
            rows = [] if ptes else None
            for pte in tables[tbl]:
                if pte_present(pte):
                    present += 1
                    young += pte_young(pte)
                    dirty += pte_dirty(pte)
                    zero += m.is_zero_pfn(pte_pfn(pte))
                    if rows is not None:
                        rows.append([True, pte_young(pte), pte_dirty(pte), pte_pfn(pte)])
                    continue
                if pte_none(pte):
                    none += 1
                elif is_swap_pte(pte):
                    swap += 1
                if rows is not None:
                    rows.append([False, False, False, -1])
            out.append(PmdView(addr, "table", tbl, present=present, young_ptes=young,
                               dirty_ptes=dirty, none_ptes=none, swap_ptes=swap,
                               zero_ptes=zero, ptes=rows))
        addr += HPAGE_PMD_NR * PAGE_SIZE
    return out


async def clear_young(m, mm, start: int, end: int, flush: bool = False) -> list:
    """page_idle_clear_pte_refs over [start, end) of mm: ptep_test_and_clear_young on
    each PTE (on x86 ptep_clear_flush_young does not flush either),
    pmdp_clear_flush_young on each huge PMD (which flushes the 2 MiB range when it was
    young). A CPU holding the translation in its TLB keeps using it without setting the
    bit again, so a hot page can read as idle until the entry is evicted or flushed;
    ``flush`` pays for a flush_tlb_mm_range of the range at the end. Returns
    ``[addr, young]`` per 2 MiB block that has a table or a huge PMD.

    Context: takes the mmap lock for read, then each PMD or PTE lock."""
    out = []
    await mm.mmap_lock.down_read("clear_young")
    try:
        addr = start & HPAGE_PMD_MASK
        while addr < end:
            vma = mm.find_vma(addr)
            if vma is None or vma.start >= end:
                break
            if vma.start >= addr + HPAGE_PMD_SIZE:
                addr = vma.start & HPAGE_PMD_MASK
                continue
            pmd_tbl = memory.pmd_lookup(m, mm, addr)
            if pmd_tbl >= 0:
                idx = pmd_index(addr)
                e = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
                if pmd_trans_huge(e) and pmd_present(e):
                    ptl = m.table_lock(pmd_tbl)
                    await ptl.lock("pmdp_clear_flush_young")
                    young = await test_and_clear_young(m, "pmd", pmd_tbl, idx,
                                                       pmd_young, pmd_mkold)
                    await ptl.unlock()
                    if young:
                        await tlb.flush_tlb_mm_range(m, mm, addr, addr + HPAGE_PMD_SIZE)
                    out.append([addr, HPAGE_PMD_NR if young else 0])
                elif e and pmd_present(e):
                    res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
                    if res is not None:
                        tbl, ptl = res
                        lo = pte_index(max(addr, start))
                        hi = pte_index(min(addr + HPAGE_PMD_SIZE, end) - 1) + 1
                        young = 0
                        for i in range(lo, hi):
                            young += await test_and_clear_young(
                                m, "pte", tbl, i, lambda p: pte_present(p) and pte_young(p),
                                pte_mkold)
                        await ptl.unlock()
                        out.append([addr, young])
            addr += HPAGE_PMD_SIZE
    finally:
        await mm.mmap_lock.up_read()
    if flush:
        await tlb.flush_tlb_mm_range(m, mm, start, end)
    return out


async def test_and_clear_young(m, level: str, tbl: int, idx: int, young, mkold) -> bool:
    """ptep_test_and_clear_young / pmdp_test_and_clear_young: test_and_clear_bit of
    _PAGE_BIT_ACCESSED, atomic against the hardware walker, which sets the bit with a
    locked cmpxchg of its own."""
    while True:
        e = await atomic.entry_read(m, level, tbl, idx)
        if not young(e):
            return False
        if await atomic.entry_cmpxchg(m, level, tbl, idx, e, mkold(e)):
            return True
