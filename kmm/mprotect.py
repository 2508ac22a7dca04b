"""mprotect: mm/mprotect.c.

``mprotect_fixup`` splits VMAs at the range's ends (which splits a straddling huge PMD),
then ``change_protection`` rewrites the entries: a huge PMD the range covers wholly keeps
its PMD (``change_huge_pmd``), a partly covered one is split first. Private pages that
are PageAnonExclusive become writable at once when write permission returns
(MM_CP_TRY_CHANGE_WRITABLE); shared ones wait for a write fault.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, huge_memory_migrate, hugetlb_fault, hugetlb_resv, memory, mmap, tlb,
)
from kmm.mm_types import PG_anon_exclusive, VM_HUGETLB, VM_READ, VM_WRITE
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_NONE, PAGE_SIZE, PMD_SIZE, TASK_SIZE, is_swap_pmd, pmd_index,
    pmd_none, pmd_trans_huge, pte_index, pte_mkwrite, pte_modify, pte_pfn, pte_present,
    pte_protnone, pte_special, pte_write, vm_page_prot,
)

PROT = {"none": 0, "r": VM_READ, "rw": VM_READ | VM_WRITE}


async def do_mprotect(m, task, start: int, length: int, prot: str) -> int | str:
    """mprotect(start, length, prot): 0, EINVAL, or ENOMEM at the first hole (the
    VMAs before it keep their new protection, as in do_mprotect_pkey)."""
    if start & (PAGE_SIZE - 1) or length < 0:
        return "EINVAL"
    end = start + mmap.page_align(length)
    if end > TASK_SIZE or end < start:
        return "ENOMEM"
    if end == start:
        return 0
    mm = task.mm
    await mm.mmap_lock.down_write("do_mprotect_pkey")
    try:
        vma = mm.find_vma(start)
        if vma is None or vma.start > start:
            return "ENOMEM"
        nstart = start
        while True:
            newflags = (vma.flags & ~(VM_READ | VM_WRITE)) | PROT[prot]
            tmp = min(vma.end, end)
            vma = await mprotect_fixup(m, vma, nstart, tmp, newflags)
            if isinstance(vma, str):
                return vma
            # vma_iter_end: past the VMA the range was merged into, which may have
            # swallowed the next one (already of the new flags)
            nstart = min(vma.end, end)
            if nstart >= end:
                return 0
            vma = mm.find_vma(nstart)
            if vma is None or vma.start != nstart:
                return "ENOMEM"
    finally:
        await mm.mmap_lock.up_write()


async def mprotect_fixup(m, vma, start: int, end: int, newflags: int):
    if newflags == vma.flags:
        return vma
    for cut in (start, end):  # vm_ops->may_split (hugetlb_vm_op_split)
        if vma.flags & VM_HUGETLB and vma.start < cut < vma.end:
            if hugetlb_resv.hugetlb_vm_op_split(vma, cut):
                return "EINVAL"
    vma = await mmap.vma_modify_flags(m, vma, start, end, newflags)
    await change_protection(m, vma, start, end, bool(newflags & VM_WRITE))
    return vma


async def change_protection(m, vma, start: int, end: int, try_writable: bool,
                            prot_numa: bool = False) -> int:
    """change_protection -> change_pmd_range -> change_huge_pmd / change_pte_range:
    returns the pages whose entry changed. MM_CP_PROT_NUMA (``prot_numa``) makes them
    PAGE_NONE for NUMA hinting faults, skipping what prot_numa_skip names, and counts
    numa_huge_pte_updates for the huge PMDs it changed."""
    mm = vma.mm
    newprot = PAGE_NONE if prot_numa else vm_page_prot(vma.flags)
    if vma.flags & VM_HUGETLB:
        await hugetlb_fault.hugetlb_change_protection(m, vma, start, end, newprot)
        return 0
    addr = start
    pages = nr_huge_updates = 0
    changed = False
    while addr < end:
        nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), end)
        pmd_tbl = memory.pmd_lookup(m, mm, addr)
        if pmd_tbl < 0:
            addr = nxt
            continue
        idx = pmd_index(addr)
        pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if is_swap_pmd(pmd) or pmd_trans_huge(pmd):
            if nxt - addr != PMD_SIZE:
                await huge_memory.__split_huge_pmd(m, vma, pmd_tbl, idx, addr, freeze=False)
            else:
                ret = await huge_memory.change_huge_pmd(m, vma, pmd_tbl, idx, addr, newprot,
                                                        try_writable and not prot_numa,
                                                        prot_numa)
                if ret:
                    if ret == HPAGE_PMD_NR:
                        pages += ret
                        nr_huge_updates += 1
                    addr = nxt
                    continue
        if not pmd_none(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
            n = await change_pte_range(m, vma, pmd_tbl, idx, addr, nxt, newprot,
                                       try_writable and not prot_numa, prot_numa)
            pages += n
            changed |= bool(n)
        addr = nxt
    if changed:
        await tlb.flush_tlb_mm_range(m, mm, start, end)
    if nr_huge_updates:  # change_pmd_range
        m.vmstat.count_vm_event("numa_huge_pte_updates", nr_huge_updates)
    return pages


async def change_prot_numa(m, vma, start: int, end: int) -> int:
    """change_prot_numa (mm/mempolicy.c): change_protection(MM_CP_PROT_NUMA) of the
    range; numa_pte_updates counts the pages it made PROT_NONE (a huge PMD: 512).
    Context: mmap_lock held for read."""
    nr = await change_protection(m, vma, start, end, False, prot_numa=True)
    if nr > 0:
        m.vmstat.count_vm_event("numa_pte_updates", nr)
    return nr


async def change_pte_range(m, vma, pmd_tbl: int, pidx: int, addr: int, end: int,
                           newprot: int, try_writable: bool, prot_numa: bool = False) -> int:
    res = await memory.pte_offset_map_lock(m, pmd_tbl, pidx)
    if res is None:
        return 0
    tbl, ptl = res
    pages = 0
    while addr < end:
        i = pte_index(addr)
        old = await atomic.entry_read(m, "pte", tbl, i)
        if pte_present(old):
            if prot_numa and (pte_special(old) or pte_protnone(old)  # zero page, done
                              or huge_memory_migrate.prot_numa_skip(
                                  m, vma, m.physmem.folio(pte_pfn(old)))):
                addr += PAGE_SIZE
                continue
            new = pte_modify(old, newprot)
            if try_writable and not pte_write(new) and not pte_special(new):
                page = m.physmem.page(pte_pfn(new))
                if page.flags & PG_anon_exclusive:  # can_change_pte_writable
                    new = pte_mkwrite(new)
            if new != old:
                await atomic.entry_set(m, "pte", tbl, i, new)
                pages += 1
        addr += PAGE_SIZE
    await ptl.unlock()
    return pages
