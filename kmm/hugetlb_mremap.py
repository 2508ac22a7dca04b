"""mremap of hugetlb mappings: mm/mremap.c's hugetlb checks and mm/hugetlb.c's
move_hugetlb_page_tables, move_huge_pte and clear_vma_resv_huge_pages.

mremap of a hugetlb VMA needs both addresses aligned to the huge page size, and never
grows (the reservation maps cannot be split): EINVAL otherwise (pinned by the host
probe tests/mm/hugetlb_mremap.host.json). A move copies the VMA (the copy keeps the
private reservation map, the old VMA loses it: clear_vma_resv_huge_pages, so unmapping
the old range gives back nothing twice), then moves the huge entries one by one under
both PMD locks, with the hugetlb VMA lock and the file's i_mmap_rwsem held for write; an
entry in a shared PMD table is not moved: the old range unshares it (its pages stay
in the page cache and the other sharers' tables; the new range refaults them).

Left out: the destination's PMD table is never a shared one (the kernel's
huge_pte_alloc for the new VMA would look for one to share while this mm holds the
file's i_mmap_rwsem for write; the model allocates a private table).
"""

from __future__ import annotations

from kmm import atomic, hugetlb_pmd_share, hugetlb_resv, memory, tlb
from kmm.mm_types import VM_MAYSHARE
from kmm.pgtable import pmd_index, pmd_none


def hugetlb_mremap_check(vma, addr: int, old_len: int, new_len: int,
                         new_addr: int) -> str | None:
    """The hugetlb part of mremap's VMA checks: both addresses huge-page aligned and
    no growth (lengths rounded up to the huge page size first). An errno name, or
    None."""
    size = vma.hugetlb_file.hstate.size
    if addr & (size - 1) or new_addr & (size - 1):
        return "EINVAL"
    if (new_len + size - 1) & ~(size - 1) > (old_len + size - 1) & ~(size - 1):
        return "EINVAL"
    return None


def clear_vma_resv_huge_pages(vma) -> None:
    """clear_vma_resv_huge_pages: after a move the old VMA no longer owns the private
    reservation map (the copy does), so closing it returns no reservations;
    hugetlb_dup_vma_private keeps a shared VMA's lock."""
    d = vma.vm_private_data
    if vma.flags & VM_MAYSHARE or d is None:
        return
    if d.resv is not None and d.flags & hugetlb_resv.HPAGE_RESV_OWNER:
        d.resv.refs -= 1
    vma.vm_private_data = None


async def move_huge_pte(m, old_tbl: int, old_addr: int, new_tbl: int,
                        new_addr: int) -> None:
    """move_huge_pte: the entry leaves the old slot for the new one under both PMD
    locks (the source's nested); the caller flushes the old range afterwards."""
    dst_ptl = m.table_lock(new_tbl)
    src_ptl = m.table_lock(old_tbl)
    await dst_ptl.lock("move_huge_pte")
    if src_ptl is not dst_ptl:
        await src_ptl.lock("move_huge_pte", 1)  # SINGLE_DEPTH_NESTING
    pte = await atomic.entry_get_and_clear(m, "pmd", old_tbl, pmd_index(old_addr))
    await atomic.entry_set(m, "pmd", new_tbl, pmd_index(new_addr), pte)
    if src_ptl is not dst_ptl:
        await src_ptl.unlock()
    await dst_ptl.unlock()


async def move_hugetlb_page_tables(m, vma, new_vma, old_addr: int, new_addr: int,
                                   length: int) -> int:
    """move_hugetlb_page_tables: move every huge entry of [old_addr, old_addr+length)
    to the same offset at new_addr; a shared PMD table is unshared instead. Returns
    the length moved. Context: mmap_lock held for write; takes the hugetlb VMA lock and
    the i_mmap_rwsem for write."""
    h = vma.hugetlb_file.hstate
    mm = vma.mm
    sz = h.size
    last_addr_mask = hugetlb_pmd_share.hugetlb_mask_last_page(h)
    old_end = old_addr + length
    flush = hugetlb_pmd_share.adjust_range_if_pmd_sharing_possible(vma, old_addr, old_end)
    shared_pmd = False
    imm = vma.hugetlb_file.i_mmap_rwsem
    await hugetlb_resv.hugetlb_vma_lock_write(vma)
    await imm.down_write("move_hugetlb_page_tables")
    try:
        while old_addr < old_end:
            src = memory.pmd_lookup(m, mm, old_addr)  # hugetlb_walk
            if src < 0:
                old_addr = (old_addr | last_addr_mask) + sz
                new_addr = (new_addr | last_addr_mask) + sz
                continue
            if pmd_none(await atomic.entry_read(m, "pmd", src, pmd_index(old_addr))):
                old_addr += sz
                new_addr += sz
                continue
            if await hugetlb_pmd_share.huge_pmd_unshare(m, mm, vma, old_addr, src):
                shared_pmd = True
                old_addr = (old_addr | last_addr_mask) + sz
                new_addr = (new_addr | last_addr_mask) + sz
                continue
            dst = await memory.pmd_alloc(m, mm, new_addr)  # huge_pte_alloc (no sharing)
            if dst < 0:
                break
            await move_huge_pte(m, src, old_addr, dst, new_addr)
            old_addr += sz
            new_addr += sz
        await tlb.flush_tlb_mm_range(m, mm, *(flush if shared_pmd
                                              else (old_end - length, old_end)))
    finally:
        await imm.up_write()
        await hugetlb_resv.hugetlb_vma_unlock_write(vma)
    return length + old_addr - old_end


__all__ = ["hugetlb_mremap_check", "move_hugetlb_page_tables", "clear_vma_resv_huge_pages"]
