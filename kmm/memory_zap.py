"""Page-table teardown: mm/memory.c's unmap_page_range side, with the mmu_gather batch
(mm/mmu_gather.c) and free_pgtables.

``unmap_page_range`` walks the range down to ``zap_pmd_range``/``zap_pte_range``,
splitting a huge PMD the range covers only part of; ``zap_nonpresent_ptes`` drops
migration entries and gives swap slots back; the ``MmuGather`` batch defers the freeing
of pages until the TLB flush, as tlb_finish_mmu does; ``free_pgtables`` frees the
empty tables below a range once its VMAs are gone. The fault and fork paths stay in
kmm/memory.py.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, hugetlb_fault, memory, memory_anon, mmdebug, rmap, swap, swap_state,
    swapfile, tlb,
)
from kmm.mm_types import PG_dirty, PG_swapcache, VM_HUGETLB, MmStruct, VmArea
from kmm.pgtable import (
    PAGE_SIZE, PMD_SIZE, PUD_SIZE, PGDIR_SIZE, pmd_index, pmd_none, pmd_present, pmd_trans_huge,
    pte_dirty, pte_index, pte_pfn, pte_present, pte_special, pud_index, pgd_index, table_pfn,
    is_swap_pmd, is_migration_entry,
)


# ------------------------------------------------------------------- zap
class MmuGather:
    """struct mmu_gather: pages are freed only after the TLB flush of the range."""

    __slots__ = ("mm", "start", "end", "folios", "tables", "even_cows", "i_mmap_locked")

    def __init__(self, mm: MmStruct, even_cows: bool = True) -> None:
        self.mm = mm
        self.even_cows = even_cows  # zap_details: False keeps a private file COW's pages
        # unmap_mapping_range zaps under the file's i_mmap_rwsem, not the mmap_lock
        self.i_mmap_locked = False
        self.start = 1 << 63
        self.end = 0
        self.folios: list = []
        self.tables: list[int] = []

    def track(self, start: int, end: int) -> None:
        self.start = min(self.start, start)
        self.end = max(self.end, end)

    async def finish(self, m) -> None:
        """tlb_finish_mmu: flush, then drop the references the mappings held."""
        if self.end > self.start:
            await tlb.flush_tlb_mm_range(m, self.mm, self.start, self.end)
        for folio, n in self.folios:  # free_pages_and_swap_cache
            if folio.flags & PG_swapcache:
                await swap_state.free_swap_cache(m, folio)
            await swap.folio_put(m, folio, n)
        for t in self.tables:
            await m.pte_free(self.mm, t)
        self.folios.clear()
        self.tables.clear()


async def unmap_page_range(m, tlbg: MmuGather, vma: VmArea, start: int, end: int) -> None:
    """unmap_page_range: clear every mapping in [start, end) of vma.

    Context: mmap_lock held (read suffices for MADV_DONTNEED, write for munmap).
    """
    if vma.flags & VM_HUGETLB:  # unmap_single_vma
        return await hugetlb_fault.unmap_hugepage_range(m, tlbg, vma, start, end)
    mm = vma.mm
    if not tlbg.i_mmap_locked:
        mmdebug.mmap_assert_locked(m, mm, "unmap_page_range")
    addr = start
    while addr < end:
        nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), end)
        pmd_tbl = memory.pmd_lookup(m, mm, addr)
        if pmd_tbl < 0:
            addr = min((addr + PUD_SIZE) & ~(PUD_SIZE - 1), end)
            continue
        await zap_pmd_range(m, tlbg, vma, pmd_tbl, addr, nxt)
        addr = nxt


async def zap_pmd_range(m, tlbg: MmuGather, vma: VmArea, pmd_tbl: int, addr: int,
                        nxt: int) -> None:
    idx = pmd_index(addr)
    pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if is_swap_pmd(pmdval) or pmd_trans_huge(pmdval):
        if nxt - addr != PMD_SIZE:
            await huge_memory.__split_huge_pmd(m, vma, pmd_tbl, idx, addr, freeze=False)
        elif await huge_memory.zap_huge_pmd(m, tlbg, vma, pmd_tbl, idx, addr):
            return
    if pmd_none(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
        return
    await zap_pte_range(m, tlbg, vma, pmd_tbl, idx, addr, nxt)


async def zap_pte_range(m, tlbg: MmuGather, vma: VmArea, pmd_tbl: int, pidx: int,
                        addr: int, end: int) -> None:
    """zap_pte_range: clear PTEs under the PTE lock; rmap removal now, the references
    after the TLB flush (the mmu_gather). The PTEs of one large folio go as a batch
    (zap_present_ptes), so a folio unmapped whole is never seen partially mapped."""
    res = await memory.pte_offset_map_lock(m, pmd_tbl, pidx)
    if res is None:
        return
    tbl, ptl = res
    mm = vma.mm
    tlbg.track(addr, end)
    a = addr
    while a < end:
        i = pte_index(a)
        ent = await atomic.entry_read(m, "pte", tbl, i)
        nr = 1
        if ent and not tlbg.even_cows and (
                not pte_present(ent) or pte_special(ent)
                or m.physmem.folio(pte_pfn(ent)).mapping is None):
            ent = 0  # should_zap_folio / should_zap_cows: a private COW's page stays
        if ent:
            if pte_present(ent) and not pte_special(ent):
                pfn = pte_pfn(ent)
                folio = m.physmem.folio(pfn)
                dirty = pte_dirty(ent)
                if folio.order and folio.mapping is None:
                    nr, dirty = await memory_anon.folio_pte_batch(
                        m, tbl, i, (end - a) // PAGE_SIZE, folio, ent)
                for j in range(nr):
                    await atomic.entry_get_and_clear(m, "pte", tbl, i + j)
                if dirty:
                    atomic.folio_set_flags_locked(folio, PG_dirty)  # folio_mark_dirty
                if folio.mapping is not None:
                    mm.rss_shmem -= nr
                else:
                    mm.rss_anon -= nr
                await rmap.folio_remove_rmap_ptes(m, folio, pfn, nr)
                tlbg.folios.append((folio, nr))
            else:
                await atomic.entry_get_and_clear(m, "pte", tbl, i)
                if not pte_present(ent):
                    await zap_nonpresent_ptes(m, mm, ent)
        a += nr * PAGE_SIZE
    await ptl.unlock()


async def free_pgtables(m, mm: MmStruct, start: int, end: int, floor: int,
                        ceiling: int) -> None:
    """free_pgtables / free_pgd_range: free the tables that only mapped [start, end).

    [floor, ceiling) is the hole the unmapped VMAs leave (the neighbouring VMAs' ends):
    a table is freed only if all the address space it maps lies in the hole. Walks the
    tables that exist, level by level, so a whole-address-space teardown costs what is
    mapped, not 2^47 bytes' worth of slots.
    """
    tables = m.physmem.tables
    pgd = tables[mm.pgd]
    for gi in range(pgd_index(start), pgd_index(end - 1) + 1):
        if not pgd[gi]:
            continue
        pud_tbl = table_pfn(pgd[gi])
        g0 = gi * PGDIR_SIZE
        pud = tables[pud_tbl]
        for ui in range(pud_index(max(start, g0)), pud_index(min(end, g0 + PGDIR_SIZE) - 1) + 1):
            if not pud[ui]:
                continue
            pmd_tbl = table_pfn(pud[ui])
            u0 = g0 + ui * PUD_SIZE
            pmd = tables[pmd_tbl]
            lo, hi = max(start, u0), min(end, u0 + PUD_SIZE)
            for pi in range(pmd_index(lo), pmd_index(hi - 1) + 1):
                e = pmd[pi]
                a0 = u0 + pi * PMD_SIZE
                if (e and pmd_present(e) and not pmd_trans_huge(e)
                        and a0 >= floor and a0 + PMD_SIZE <= ceiling):
                    await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, pi)
                    mm.nr_ptes -= 1
                    await m.pte_free(mm, table_pfn(e))
            if u0 >= floor and u0 + PUD_SIZE <= ceiling and not any(pmd):
                await atomic.entry_get_and_clear(m, "pud", pud_tbl, ui)
                await m.pte_free(mm, pmd_tbl)
        if g0 >= floor and g0 + PGDIR_SIZE <= ceiling and not any(pud):
            await atomic.entry_get_and_clear(m, "pgd", mm.pgd, gi)
            await m.pte_free(mm, pud_tbl)


async def zap_nonpresent_ptes(m, mm: MmStruct, entry: int) -> None:
    """zap_nonpresent_ptes: a migration entry is simply dropped (it holds no reference
    of its own; the rmap walk that made it keeps the page); a swap entry gives its
    slot reference back (free_swap_and_cache: the slot is freed, and its swap cache
    folio dropped, once nothing references it). Context: PTE lock held."""
    if is_migration_entry(entry):
        mm.rss_anon -= 1
        return
    if not swapfile.is_swap_entry(m, entry):
        m.bug(f"zap of unknown non-present PTE {entry:#x}")
    mm.swapents -= 1
    await swapfile.free_swap_and_cache(m, swapfile.pte_to_swp_entry(entry))
