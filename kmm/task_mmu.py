"""/proc/PID/smaps figures: fs/proc/task_mmu.c.

Rss counts every page mapped by a present entry whose page is a normal page (the 4K and
huge zero pages are special and count nowhere), plus pages behind migration entries;
AnonHugePages counts each anonymous PMD mapping as 2 MiB (PTE-mapped THPs do not).
"""

from __future__ import annotations

from kmm import pagewalk
from kmm.pgtable import (
    HPAGE_PMD_SIZE, PAGE_SIZE, is_migration_entry, is_pmd_migration_entry, pmd_pfn,
    pmd_present, pte_present, pte_special,
)


def smaps_range(m, mm, start: int, end: int) -> tuple[int, int]:
    """(Rss kB, AnonHugePages kB) summed over the VMAs of mm inside [start, end)."""
    rss = huge = 0
    for vma in mm.vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        if s >= e or vma.vm_file is not None:  # hugetlb: smaps_hugetlb_range, not Rss
            continue
        for _addr, level, entry in pagewalk.walk_leaves(m, mm, s, e):
            if level == "pmd":
                if pmd_present(entry):
                    if m.is_huge_zero_pfn(pmd_pfn(entry)):
                        continue
                    rss += HPAGE_PMD_SIZE
                    huge += HPAGE_PMD_SIZE
                elif is_pmd_migration_entry(entry):
                    rss += HPAGE_PMD_SIZE
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
    return swapped // 1024


def smaps_hugetlb_kb(m, mm, start: int, end: int) -> tuple[int, int]:
    """smaps "Private_Hugetlb" and "Shared_Hugetlb" (kB) over the hugetlb VMAs of mm
    inside [start, end)."""
    from kmm import hugetlb_fault
    private = shared = 0
    for vma in mm.vmas:
        # as the oracle sums smaps: the VMAs wholly inside the range (a hugetlb VMA
        # rounded up to 2 MiB past a region's size is not the region's)
        if vma.vm_file is not None and vma.start >= start and vma.end <= end:
            p, s = hugetlb_fault.smaps_hugetlb_range(m, mm, vma, start, end)
            private += p
            shared += s
    return private, shared
