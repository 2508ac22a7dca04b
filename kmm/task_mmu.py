"""/proc/PID/smaps figures: fs/proc/task_mmu.c.

Rss counts every page mapped by a present entry whose page is a normal page (the 4K and
huge zero pages are special and count nowhere), plus pages behind migration entries;
AnonHugePages counts each anonymous PMD mapping as 2 MiB (PTE-mapped THPs do not).
"""

from __future__ import annotations

from kmm import pagewalk
from kmm.mm_types import VM_HUGETLB
from kmm.pgtable import (
    HPAGE_PMD_SIZE, PAGE_SIZE, is_migration_entry, is_pmd_migration_entry, migration_entry_pfn,
    pmd_pfn, pmd_present, pte_pfn, pte_present, pte_special,
)


def smaps_range(m, mm, start: int, end: int) -> tuple[int, int]:
    """(Rss kB, AnonHugePages kB) summed over the VMAs of mm inside [start, end)."""
    rss = huge = 0
    for vma in mm.vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        if s >= e or vma.flags & VM_HUGETLB:  # hugetlb: smaps_hugetlb_range, not Rss
            continue
        for _addr, level, entry in pagewalk.walk_leaves(m, mm, s, e):
            if level == "pmd":
                if pmd_present(entry):
                    if m.is_huge_zero_pfn(pmd_pfn(entry)):
                        continue
                    rss += HPAGE_PMD_SIZE
                    if m.physmem.page(pmd_pfn(entry)).mapping is None:  # not ShmemPmdMapped
                        huge += HPAGE_PMD_SIZE
                elif is_pmd_migration_entry(entry):
                    # smaps_pmd_entry: the migration entry's folio, anonymous THP too
                    rss += HPAGE_PMD_SIZE
                    if m.physmem.folio(migration_entry_pfn(entry)).mapping is None:
                        huge += HPAGE_PMD_SIZE
            elif pte_present(entry):
                if not pte_special(entry):
                    rss += PAGE_SIZE
            elif is_migration_entry(entry):
                rss += PAGE_SIZE
    return rss // 1024, huge // 1024


def smaps_swap_kb(m, mm, start: int, end: int) -> int:
    """smaps "Swap": kB of swapped-out pages (swap PTEs, not migration entries) in the
    VMAs of mm inside [start, end). A PMD never holds a swap entry."""
    from kmm import swapfile
    swapped = 0
    for vma in mm.vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        if s >= e:
            continue
        for _addr, level, entry in pagewalk.walk_leaves(m, mm, s, e):
            if level == "pte" and swapfile.is_swap_entry(m, entry):
                swapped += PAGE_SIZE
        if vma.vm_file is not None:  # shmem_swap_usage: the file's swapped pages
            from kmm import shmem
            first = vma.linear_page_index(s)
            swapped += shmem.shmem_swapped_in(vma.vm_file.mapping, first,
                                              first + ((e - s) >> 12)) * PAGE_SIZE
    return swapped // 1024


def smaps_shmem_pmd_kb(m, mm, start: int, end: int) -> int:
    """smaps "ShmemPmdMapped": kB of shmem THPs mapped by a PMD in the VMAs of mm inside
    [start, end)."""
    kb = 0
    for vma in mm.vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        if s >= e or vma.vm_file is None:
            continue
        for _addr, level, entry in pagewalk.walk_leaves(m, mm, s, e):
            if level == "pmd" and pmd_present(entry) \
                    and m.physmem.page(pmd_pfn(entry)).mapping is not None:
                kb += HPAGE_PMD_SIZE // 1024
    return kb


def smaps_hugetlb_kb(m, mm, start: int, end: int) -> tuple[int, int]:
    """smaps "Private_Hugetlb" and "Shared_Hugetlb" (kB) over the hugetlb VMAs of mm
    inside [start, end)."""
    from kmm import hugetlb_fault
    private = shared = 0
    for vma in mm.vmas:
        # as the oracle sums smaps: the VMAs wholly inside the range (a hugetlb VMA
        # rounded up to 2 MiB past a region's size is not the region's)
        if vma.flags & VM_HUGETLB and vma.start >= start and vma.end <= end:
            p, s = hugetlb_fault.smaps_hugetlb_range(m, mm, vma, start, end)
            private += p
            shared += s
    return private, shared


def show_numa_map(m, mm, start: int, end: int) -> dict:
    """show_numa_map (/proc/PID/numa_maps) over the VMAs of mm inside [start, end):
    ``pages``: the N<node>= counts (base pages per node of every present normal page;
    a PMD-mapped THP counts its 512, as gather_pte_stats does), and ``huge``: the
    PMD-mapped THPs per node (the model's addition). Node ids as strings; only nodes
    with pages. The zero pages are special (not counted); hugetlb VMAs are left out."""
    from kmm import mmzone
    pages: dict[int, int] = {}
    huge: dict[int, int] = {}
    for vma in mm.vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        if s >= e or vma.flags & VM_HUGETLB:
            continue
        for _addr, level, entry in pagewalk.walk_leaves(m, mm, s, e):
            if level == "pmd":
                if not pmd_present(entry) or m.is_huge_zero_pfn(pmd_pfn(entry)):
                    continue
                nid = mmzone.page_to_nid(m, pmd_pfn(entry))
                pages[nid] = pages.get(nid, 0) + HPAGE_PMD_SIZE // PAGE_SIZE
                huge[nid] = huge.get(nid, 0) + 1
            elif pte_present(entry) and not pte_special(entry):
                nid = mmzone.page_to_nid(m, pte_pfn(entry))
                pages[nid] = pages.get(nid, 0) + 1
    out: dict = {"pages": {str(n): pages[n] for n in sorted(pages)}}
    if huge:
        out["huge"] = {str(n): huge[n] for n in sorted(huge)}
    return out
