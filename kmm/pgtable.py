"""x86-64 page-table entries: bits, tests and constructors, swap and migration entries.

arch/x86/include/asm/pgtable_types.h, pgtable.h and pgtable_64.h; include/linux/swapops.h.
Entries are plain 64-bit ints; these helpers are pure (no preemption point). Reading or
writing an entry in a table is a machine operation (``Machine.pte_read`` and friends).
"""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PUD_SHIFT = 30
PGDIR_SHIFT = 39
PTRS_PER_TABLE = 512
HPAGE_PMD_ORDER = PMD_SHIFT - PAGE_SHIFT
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = 1 << PMD_SHIFT
HPAGE_PMD_MASK = ~(HPAGE_PMD_SIZE - 1)
PMD_SIZE = HPAGE_PMD_SIZE
PUD_SIZE = 1 << PUD_SHIFT
PGDIR_SIZE = 1 << PGDIR_SHIFT
TASK_SIZE = 1 << 47

_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PWT = 1 << 3
_PAGE_PCD = 1 << 4
_PAGE_ACCESSED = 1 << 5
_PAGE_DIRTY = 1 << 6
_PAGE_PSE = 1 << 7
_PAGE_GLOBAL = 1 << 8
_PAGE_PROTNONE = _PAGE_GLOBAL  # only meaningful when not present
_PAGE_SPECIAL = 1 << 9
_PAGE_UFFD_WP = 1 << 10
_PAGE_SOFT_DIRTY = 1 << 11
_PAGE_NX = 1 << 63

PTE_PFN_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
PMD_PFN_MASK = ((1 << 52) - 1) & ~(HPAGE_PMD_SIZE - 1)

# A table entry pointing to a lower table (_PAGE_TABLE / _KERNPG_TABLE with USER).
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY

# vm_get_page_prot for private anonymous mappings: never RW (a write fault makes the
# entry writable: copy-on-write), accessed preset (pte_sw_mkyoung), no-exec.
PAGE_NONE = _PAGE_PROTNONE | _PAGE_ACCESSED
PAGE_READONLY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
PAGE_COPY = PAGE_READONLY
PAGE_SHARED = PAGE_READONLY | _PAGE_RW


def vm_page_prot(vm_flags: int) -> int:
    from kmm.mm_types import VM_READ, VM_SHARED, VM_WRITE
    if not vm_flags & (VM_READ | VM_WRITE):
        return PAGE_NONE
    if vm_flags & VM_SHARED and vm_flags & VM_WRITE:
        return PAGE_SHARED  # a shared writable mapping needs no write notification
    return PAGE_COPY


# ----------------------------------------------------------------------- PTEs
def pfn_pte(pfn: int, prot: int) -> int:
    return (pfn << PAGE_SHIFT) | prot


def pte_pfn(pte: int) -> int:
    return (pte & PTE_PFN_MASK) >> PAGE_SHIFT


def pte_none(pte: int) -> bool:
    return pte == 0


def pte_present(pte: int) -> bool:
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_protnone(pte: int) -> bool:
    return pte & (_PAGE_PRESENT | _PAGE_PROTNONE) == _PAGE_PROTNONE


def pte_write(pte: int) -> bool:
    return bool(pte & _PAGE_RW)


def pte_dirty(pte: int) -> bool:
    return bool(pte & _PAGE_DIRTY)


def pte_young(pte: int) -> bool:
    return bool(pte & _PAGE_ACCESSED)


def pte_special(pte: int) -> bool:
    return bool(pte & _PAGE_SPECIAL)


def pte_mkwrite(pte: int) -> int:
    return pte | _PAGE_RW


def pte_wrprotect(pte: int) -> int:
    return pte & ~_PAGE_RW


def pte_mkdirty(pte: int) -> int:
    return pte | _PAGE_DIRTY | _PAGE_SOFT_DIRTY


def pte_mkclean(pte: int) -> int:
    return pte & ~_PAGE_DIRTY


def pte_mkyoung(pte: int) -> int:
    return pte | _PAGE_ACCESSED


def pte_mkold(pte: int) -> int:
    return pte & ~_PAGE_ACCESSED


def pte_mkspecial(pte: int) -> int:
    return pte | _PAGE_SPECIAL


def pte_modify(pte: int, prot: int) -> int:
    """Keep the pfn, dirty, young and soft-dirty; take the rest from ``prot``."""
    keep = PTE_PFN_MASK | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY | _PAGE_SPECIAL
    return (pte & keep) | (prot & ~PTE_PFN_MASK & ~_PAGE_ACCESSED) | (pte & _PAGE_ACCESSED)


# ----------------------------------------------------------------------- PMDs
def pmd_none(pmd: int) -> bool:
    return pmd == 0


def pmd_present(pmd: int) -> bool:
    # An invalidated huge PMD (present cleared by pmdp_invalidate, PSE kept) still
    # reads as present and trans-huge: lockless readers keep treating it as huge.
    return bool(pmd & (_PAGE_PRESENT | _PAGE_PROTNONE | _PAGE_PSE))


def pmd_protnone(pmd: int) -> bool:
    """A huge PMD made PROT_NONE for NUMA hinting faults (PROTNONE without PRESENT)."""
    return pmd & (_PAGE_PRESENT | _PAGE_PROTNONE) == _PAGE_PROTNONE


def pmd_trans_huge(pmd: int) -> bool:
    return bool(pmd & _PAGE_PSE)


pmd_leaf = pmd_trans_huge


def pmd_pfn(pmd: int) -> int:
    mask = PMD_PFN_MASK if pmd & _PAGE_PSE else PTE_PFN_MASK
    return (pmd & mask) >> PAGE_SHIFT


def pmd_mkinvalid(pmd: int) -> int:
    return pmd & ~(_PAGE_PRESENT | _PAGE_PROTNONE)


pmd_write, pmd_dirty, pmd_young, pmd_special = pte_write, pte_dirty, pte_young, pte_special
pmd_mkwrite, pmd_wrprotect, pmd_mkdirty = pte_mkwrite, pte_wrprotect, pte_mkdirty
pmd_mkyoung, pmd_mkold, pmd_mkclean = pte_mkyoung, pte_mkold, pte_mkclean


def pmd_modify(pmd: int, prot: int) -> int:
    keep = PMD_PFN_MASK | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY | _PAGE_PSE | _PAGE_SPECIAL
    return (pmd & keep) | (prot & ~PTE_PFN_MASK & ~_PAGE_ACCESSED)


def pfn_pmd(pfn: int, prot: int) -> int:
    return (pfn << PAGE_SHIFT) | prot | _PAGE_PSE


def mk_table_entry(table_pfn: int) -> int:
    """pmd_populate / pud_populate / pgd_populate: an entry pointing to a table."""
    return (table_pfn << PAGE_SHIFT) | _PAGE_TABLE


def table_pfn(entry: int) -> int:
    return (entry & PTE_PFN_MASK) >> PAGE_SHIFT


# ------------------------------------------------------- swap-format entries
# Non-present entries: type in bits 59..63, offset bit-inverted in bits 9..58 (the L1TF
# mitigation keeps a non-present entry from naming real memory). PSE and PROTNONE stay
# clear so pmd_present and pte_protnone do not misfire.
SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = 9
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
SWP_OFFSET_BITS = 64 - SWP_OFFSET_SHIFT
_U64 = (1 << 64) - 1
_PAGE_SWP_SOFT_DIRTY = _PAGE_RW
_PAGE_SWP_UFFD_WP = _PAGE_USER
_PAGE_SWP_EXCLUSIVE = _PAGE_PWT

# Special types at the top of the type space (all options on, as the 6.18 config).
MAX_SWAPFILES = 23
SWP_HWPOISON = 23
SWP_MIGRATION_READ = 24
SWP_MIGRATION_READ_EXCLUSIVE = 25
SWP_MIGRATION_WRITE = 26
SWP_PTE_MARKER = 31
MIGRATION_TYPES = (SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE)

# Migration entries carry young and dirty above the pfn (4-level: 46 physical bits).
SWP_PFN_BITS = 46 - PAGE_SHIFT
SWP_MIG_YOUNG = 1 << SWP_PFN_BITS
SWP_MIG_DIRTY = 1 << (SWP_PFN_BITS + 1)
SWP_PFN_MASK = SWP_MIG_YOUNG - 1


def swp_entry(type_: int, offset: int) -> int:
    """__swp_entry: the x86-64 non-present encoding of (type, offset)."""
    inv = (~offset << SWP_OFFSET_SHIFT) & _U64
    return (inv >> SWP_TYPE_BITS) | (type_ << (64 - SWP_TYPE_BITS))


def swp_type(entry: int) -> int:
    return entry >> (64 - SWP_TYPE_BITS)


def swp_offset(entry: int) -> int:
    return (((~entry & _U64) << SWP_TYPE_BITS) & _U64) >> SWP_OFFSET_SHIFT


def is_swap_pte(pte: int) -> bool:
    return pte != 0 and not pte_present(pte)


def is_swap_pmd(pmd: int) -> bool:
    return pmd != 0 and not pmd_present(pmd)


def is_migration_entry(entry: int) -> bool:
    return is_swap_pte(entry) and swp_type(entry) in MIGRATION_TYPES


def is_pmd_migration_entry(pmd: int) -> bool:
    return is_swap_pmd(pmd) and swp_type(pmd) in MIGRATION_TYPES


def make_migration_entry(pfn: int, writable: bool, exclusive: bool,
                         young: bool, dirty: bool) -> int:
    """make_{writable,readable_exclusive,readable}_migration_entry (+ young, dirty)."""
    if writable:
        t = SWP_MIGRATION_WRITE
    elif exclusive:
        t = SWP_MIGRATION_READ_EXCLUSIVE
    else:
        t = SWP_MIGRATION_READ
    off = pfn | (SWP_MIG_YOUNG if young else 0) | (SWP_MIG_DIRTY if dirty else 0)
    return swp_entry(t, off)


def migration_entry_pfn(entry: int) -> int:
    return swp_offset(entry) & SWP_PFN_MASK


def is_writable_migration_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_MIGRATION_WRITE


def pmd_index(addr: int) -> int:
    return (addr >> PMD_SHIFT) & 511


def pte_index(addr: int) -> int:
    return (addr >> PAGE_SHIFT) & 511


def pud_index(addr: int) -> int:
    return (addr >> PUD_SHIFT) & 511


def pgd_index(addr: int) -> int:
    return (addr >> PGDIR_SHIFT) & 511
