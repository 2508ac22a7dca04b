"""The NUMA hinting fault on a PTE: mm/memory.c do_numa_page.

A PTE that NUMA balancing made PROT_NONE (kmm.numa_balancing.task_numa_work) faults
on the next access; ``do_numa_page`` rechecks it under the PTE lock, asks
numa_migrate_check where the folio belongs, migrates it there
(migrate_misplaced_folio: the PTEs become migration entries meanwhile) or restores
the PTE's protection (numa_rebuild_single_mapping; for a large folio every PTE of it
in this table that is still PROT_NONE, numa_rebuild_large_mapping).
"""

from __future__ import annotations

from kmm import atomic, memory, migrate, mmzone, numa_balancing as nb
from kmm.mm_types import PG_anon_exclusive, VM_WRITE
from kmm.pgtable import (
    PAGE_SIZE, pte_index, pte_mkwrite, pte_mkyoung, pte_modify, pte_pfn, pte_protnone,
    pte_special,
)


async def do_numa_page(m, vmf) -> int:
    """do_numa_page: a NUMA hinting fault on a PROT_NONE PTE (vmf.orig_pte, read
    without the lock). Context: mmap_lock held for read; takes the PTE lock."""
    vma = vmf.vma
    res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is None:
        return 0
    tbl, ptl = res
    old = await atomic.entry_read(m, "pte", tbl, vmf.pte_idx)
    if old != vmf.orig_pte:  # pte_same: someone fixed or changed it meanwhile
        await ptl.unlock()
        return 0
    pte = pte_modify(old, vma.page_prot)
    folio = None if pte_special(pte) else m.physmem.folio(pte_pfn(pte))
    writable = bool(folio is not None and vma.flags & VM_WRITE
                    and m.physmem.page(pte_pfn(pte)).flags & PG_anon_exclusive)
    nid = mmzone.NUMA_NO_NODE
    flags = 0
    last = None
    task = m.tasks.get(vma.mm.owner)
    if folio is not None:
        nid = mmzone.folio_nid(m, folio)
        target, flags, last = nb.numa_migrate_check(m, task, folio, vma, vmf.address)
        if target != mmzone.NUMA_NO_NODE:
            if await migrate.migrate_misplaced_folio_prepare(m, folio, vma, target) == 0:
                await ptl.unlock()  # the folio is isolated and holds a reference
                if await migrate.migrate_misplaced_folio(m, folio, target) == 0:
                    nb.task_numa_fault(m, task, last, target, folio.nr_pages,
                                       flags | nb.TNF_MIGRATED)
                    return 0
                flags |= nb.TNF_MIGRATE_FAIL
                writable = False
                res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
                if res is None:
                    return 0
                tbl, ptl = res
                if await atomic.entry_read(m, "pte", tbl, vmf.pte_idx) != vmf.orig_pte:
                    await ptl.unlock()
                    return 0
            else:
                flags |= nb.TNF_MIGRATE_FAIL
    # out_map
    if folio is not None and folio.order:
        await numa_rebuild_large_mapping(m, vmf, tbl, folio, writable)
    else:
        entry = pte_mkyoung(pte_modify(old, vma.page_prot))
        if writable:
            entry = pte_mkwrite(entry)
        await atomic.entry_set(m, "pte", tbl, vmf.pte_idx, entry)
    await ptl.unlock()
    if nid != mmzone.NUMA_NO_NODE:
        nb.task_numa_fault(m, task, last, nid, folio.nr_pages, flags)
    return 0


async def numa_rebuild_large_mapping(m, vmf, tbl: int, folio, writable: bool) -> None:
    """numa_rebuild_large_mapping: every PTE of this table that maps the large folio
    inside the VMA and is still PROT_NONE gets the VMA's protection back (young;
    writable where the page is exclusive). Context: PTE lock held."""
    vma = vmf.vma
    nr = folio.nr_pages
    addr = vmf.address - (vmf.address - vma.start) % PAGE_SIZE
    first = pte_pfn(vmf.orig_pte) - folio.pfn
    start = max(vma.start, addr - first * PAGE_SIZE, vmf.address & ~((2 << 20) - 1))
    end = min(vma.end, addr + (nr - first) * PAGE_SIZE,
              (vmf.address & ~((2 << 20) - 1)) + (2 << 20))
    a = start
    while a < end:
        i = pte_index(a)
        e = await atomic.entry_read(m, "pte", tbl, i)
        if pte_protnone(e) and folio.pfn <= pte_pfn(e) < folio.pfn + nr:
            new = pte_mkyoung(pte_modify(e, vma.page_prot))
            if writable and m.physmem.page(pte_pfn(e)).flags & PG_anon_exclusive:
                new = pte_mkwrite(new)
            await atomic.entry_set(m, "pte", tbl, i, new)
        a += PAGE_SIZE
