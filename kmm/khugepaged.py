"""khugepaged's mm_slot registry: mm/khugepaged.c.

``khugepaged_enter_vma`` registers an mm once a VMA of it becomes eligible (a THP fault,
MADV_HUGEPAGE), as 6.18 does; ``khugepaged_exit`` removes it. The scan and the collapse
(``hpage_collapse_scan_pmd``, ``collapse_huge_page``, ``madvise_collapse``) are the
subject of the khugepaged issue; until then scenarios asking for them get a clear
"not yet supported" error.
"""

from __future__ import annotations

from kmm import huge_memory


def hugepage_pmd_enabled(m) -> bool:
    """hugepage_pmd_enabled: the khugepaged thread runs iff PMD THPs may be made."""
    return m.sysfs.enabled != "never"


def khugepaged_enter_vma(m, vma) -> None:
    """khugepaged_enter_vma: register the mm (MMF_VM_HUGEPAGE) if the VMA may collapse."""
    mm = vma.mm
    if mm.khugepaged_slot is not None or "MMF_VM_HUGEPAGE" in mm.flags:
        return
    if hugepage_pmd_enabled(m) and huge_memory.thp_vma_allowable_order(m, vma, "khugepaged"):
        __khugepaged_enter(m, mm)


def __khugepaged_enter(m, mm) -> None:
    # queued at the tail, behind the scan cursor, "to let the area settle"
    mm.flags.add("MMF_VM_HUGEPAGE")
    mm.khugepaged_slot = len(m.khugepaged_mm_slots)
    m.khugepaged_mm_slots.append(mm)


def khugepaged_fork(m, mm, oldmm) -> None:
    """khugepaged_fork: the child inherits the registration."""
    if "MMF_VM_HUGEPAGE" in oldmm.flags:
        __khugepaged_enter(m, mm)


def khugepaged_exit(m, mm) -> None:
    if mm.khugepaged_slot is not None:
        m.khugepaged_mm_slots.remove(mm)
        mm.khugepaged_slot = None
