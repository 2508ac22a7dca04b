"""madvise: mm/madvise.c (and hugepage_madvise from mm/khugepaged.c).

MADV_HUGEPAGE / MADV_NOHUGEPAGE change VM flags (splitting VMAs, and with them a huge
PMD straddling an unaligned boundary); MADV_HUGEPAGE also registers the mm with
khugepaged. MADV_DONTNEED zaps the range under the mmap read lock, splitting a huge
PMD it covers only partly; with CONFIG_PT_RECLAIM (on for x86-64) a PTE table the range
covers wholly and leaves empty is freed. A range with holes is handled where mapped and
returns ENOMEM. COLLAPSE, PAGEOUT, COLD and FREE come with the khugepaged and reclaim
issues.
"""

from __future__ import annotations

from kmm import khugepaged, memory, mmap
from kmm.mm_types import VM_HUGEPAGE, VM_NOHUGEPAGE
from kmm.pgtable import (
    PAGE_SIZE, PMD_SIZE, TASK_SIZE, pmd_index, pmd_present, pmd_trans_huge, table_pfn,
)

ADVICE = {"dontneed": 4, "free": 8, "cold": 20, "pageout": 21, "hugepage": 14,
          "nohugepage": 15, "collapse": 25}
NOT_YET = {"collapse": "the khugepaged issue", "pageout": "the reclaim issue",
           "cold": "the reclaim issue", "free": "the reclaim issue"}


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
            if write:
                await hugepage_madvise(m, vma, s, e, advice)
            else:
                await madvise_dontneed_single_vma(m, vma, s, e)
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
    if flags != vma.flags:
        vma = await mmap.vma_modify_flags(m, vma, start, end, flags)
    if advice == "hugepage":
        khugepaged.khugepaged_enter_vma(m, vma)


async def madvise_dontneed_single_vma(m, vma, start: int, end: int) -> None:
    """zap_page_range_single_batched(..., reclaim_pt = true)."""
    tlbg = memory.MmuGather(vma.mm)
    await memory.unmap_page_range(m, tlbg, vma, start, end)
    await tlbg.finish(m)
    await reclaim_empty_pte_tables(m, vma, start, end)


async def reclaim_empty_pte_tables(m, vma, start: int, end: int) -> None:
    """try_to_free_pte (mm/pt_reclaim.c): a PTE table the zap covered wholly and left
    empty is detached from its PMD and freed."""
    mm = vma.mm
    addr = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    while addr + PMD_SIZE <= end:
        pmd_tbl = memory.pmd_lookup(m, mm, addr)
        if pmd_tbl >= 0:
            idx = pmd_index(addr)
            pmd = await m.entry_read("pmd", pmd_tbl, idx)
            if pmd and pmd_present(pmd) and not pmd_trans_huge(pmd):
                ptl = m.table_lock(pmd_tbl)
                await ptl.lock("try_get_and_clear_pmd")
                pte_tbl = table_pfn(pmd)
                cleared = False
                if (await m.entry_read("pmd", pmd_tbl, idx) == pmd
                        and not any(m.physmem.tables[pte_tbl])):
                    await m.entry_get_and_clear("pmd", pmd_tbl, idx)
                    mm.nr_ptes -= 1
                    cleared = True
                await ptl.unlock()
                if cleared:
                    await m.pte_free(mm, pte_tbl)
        addr += PMD_SIZE

