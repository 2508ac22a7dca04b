"""x86-64 entry encodings (arch/x86/include/asm/pgtable*.h, include/linux/swapops.h).

Expected bit positions come from kernel-thp-reference.md 1.2 and 1.3: a swap-format entry
keeps its type in bits 59..63 and its offset bit-inverted in bits 9..58 (the L1TF
mitigation), with present, PSE (7) and PROTNONE (8) clear; migration entries carry the
pfn and, in the two offset bits above it (MAX_PHYSMEM_BITS 46 - PAGE_SHIFT = 34),
young and dirty.
"""

from __future__ import annotations

import pytest

from kmm import pgtable as pt
from kmm.pgtable import (
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX, _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_PSE,
    _PAGE_RW, _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, _PAGE_USER,
)

U64 = (1 << 64) - 1
OFFSET_BITS = 50                      # bits 9..58
OFFSET_MASK = ((1 << OFFSET_BITS) - 1) << 9
SWP_PFN_BITS = 46 - 12                # 4-level MAX_PHYSMEM_BITS - PAGE_SHIFT


def bits(lo: int, hi: int, v: int) -> int:
    return (v >> lo) & ((1 << (hi - lo + 1)) - 1)


# ------------------------------------------------------------------ swap entries
@pytest.mark.parametrize("type_, offset", [
    (0, 0), (1, 1), (5, 0x12345), (22, (1 << 40) + 7), (31, (1 << OFFSET_BITS) - 1),
    (pt.SWP_MIGRATION_WRITE, 0xABCDE),
])
def test_swap_entry_layout(type_, offset):
    """__swp_entry: type in bits 59..63, ~offset in bits 9..58, bits 0..8 clear."""
    e = pt.swp_entry(type_, offset)
    assert 0 <= e <= U64
    assert bits(59, 63, e) == type_
    assert bits(9, 58, e) == (~offset) & ((1 << OFFSET_BITS) - 1)
    assert bits(0, 8, e) == 0
    assert not e & (_PAGE_PRESENT | _PAGE_PSE | _PAGE_PROTNONE)
    assert (pt.swp_type(e), pt.swp_offset(e)) == (type_, offset)


def test_swap_entry_extremes_spelled_out():
    """Offset 0 inverts to fifty one-bits; the largest offset inverts to zeros."""
    assert pt.swp_entry(0, 0) == OFFSET_MASK
    assert pt.swp_entry(31, (1 << OFFSET_BITS) - 1) == 31 << 59
    assert pt.swp_entry(1, 0) == (1 << 59) | OFFSET_MASK


def test_swap_entry_is_never_present_huge_or_protnone():
    """PSE and PROTNONE must stay clear, or pmd_present / pte_protnone would misfire on
    a swap or migration entry."""
    for type_ in (0, 7, 23, 24, 25, 26, 31):
        for offset in (0, 1, 0x1FF, 1 << 33, (1 << OFFSET_BITS) - 1):
            e = pt.swp_entry(type_, offset)
            if type_ == 0 and offset == (1 << OFFSET_BITS) - 1:
                # would encode as 0 (pte_none); max_swapfile_size keeps real offsets
                # below the top bits, so the kernel never makes this entry
                assert e == 0
                continue
            assert pt.is_swap_pte(e) and pt.is_swap_pmd(e)
            assert not pt.pte_present(e) and not pt.pmd_present(e)
            assert not pt.pmd_trans_huge(e) and not pt.pte_protnone(e)


# ------------------------------------------------------------- migration entries
@pytest.mark.parametrize("writable, exclusive, want_type", [
    (True, True, 26), (True, False, 26), (False, True, 25), (False, False, 24),
])
@pytest.mark.parametrize("young, dirty", [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_migration_entry_keeps_pfn_young_dirty_writable(writable, exclusive, want_type,
                                                        young, dirty):
    """make_{writable,readable_exclusive,readable}_migration_entry (types 26, 25, 24 with
    every option on), plus make_migration_entry_young/dirty in offset bits 34 and 35."""
    pfn = (1 << SWP_PFN_BITS) - 3  # the highest pfns still fit below the flag bits
    e = pt.make_migration_entry(pfn, writable, exclusive, young, dirty)
    assert pt.swp_type(e) == want_type
    assert pt.is_migration_entry(e) and pt.is_pmd_migration_entry(e)
    assert pt.migration_entry_pfn(e) == pfn
    assert pt.is_writable_migration_entry(e) == writable
    off = pt.swp_offset(e)
    assert bits(0, SWP_PFN_BITS - 1, off) == pfn
    assert bool(off >> SWP_PFN_BITS & 1) == young
    assert bool(off >> (SWP_PFN_BITS + 1) & 1) == dirty
    assert not pt.pmd_present(e) and not pt.pmd_trans_huge(e)


def test_swap_entry_of_a_real_swapfile_is_not_a_migration_entry():
    e = pt.swp_entry(0, 1234)
    assert pt.is_swap_pte(e) and not pt.is_migration_entry(e)
    assert not pt.is_pmd_migration_entry(e)


# ------------------------------------------------------------------------- PMDs
def test_invalidated_huge_pmd_still_reads_present_and_huge():
    """pmdp_invalidate clears _PAGE_PRESENT but keeps PSE: x86 pmd_present is P or
    PROTNONE or PSE, so lockless readers still see a present trans-huge PMD during a
    split ("pmd_trans_huge must remain set at all times"), while the hardware walker
    (which needs P) and GUP-fast (P and US) do not use it."""
    pfn = 0x200  # 2 MiB aligned
    huge = pt.pmd_mkdirty(pt.pfn_pmd(pfn, pt.PAGE_COPY | _PAGE_RW))
    inv = pt.pmd_mkinvalid(huge)
    assert not inv & _PAGE_PRESENT
    assert inv & _PAGE_PSE
    assert pt.pmd_present(inv) and pt.pmd_trans_huge(inv)
    assert pt.pmd_pfn(inv) == pfn
    assert pt.pmd_dirty(inv) and pt.pmd_young(inv) and pt.pmd_write(inv)
    assert not pt.is_swap_pmd(inv) and not pt.is_pmd_migration_entry(inv)
    assert inv == huge & ~_PAGE_PRESENT


def test_pmd_kinds():
    """none, table, huge leaf, migration entry: the PMD states of reference 1.1."""
    table = pt.mk_table_entry(0x1234)
    assert pt.pmd_none(0) and not pt.pmd_present(0)
    assert pt.pmd_present(table) and not pt.pmd_trans_huge(table)
    assert pt.table_pfn(table) == 0x1234
    huge = pt.pfn_pmd(0x400, pt.PAGE_COPY)
    assert pt.pmd_present(huge) and pt.pmd_trans_huge(huge) and pt.pmd_leaf(huge)
    assert pt.pmd_pfn(huge) == 0x400
    mig = pt.make_migration_entry(0x400, True, True, True, True)
    assert not pt.pmd_present(mig) and pt.is_pmd_migration_entry(mig)


def test_pmd_modify_keeps_pfn_pse_dirty_young():
    """pmd_modify keeps _HPAGE_CHG_MASK (the pfn, PSE, dirty, accessed, soft-dirty,
    special) and takes the protection bits from newprot: mprotect of a whole THP."""
    pfn = 0x600
    pmd = pt.pmd_mkdirty(pt.pfn_pmd(pfn, pt.PAGE_COPY | _PAGE_RW))
    ro = pt.pmd_modify(pmd, pt.PAGE_COPY)
    assert pt.pmd_trans_huge(ro) and pt.pmd_pfn(ro) == pfn
    assert pt.pmd_dirty(ro) and pt.pmd_young(ro) and not pt.pmd_write(ro)
    none = pt.pmd_modify(pmd, pt.PAGE_NONE)
    assert not none & _PAGE_PRESENT and none & _PAGE_PROTNONE
    assert pt.pmd_present(none) and pt.pmd_trans_huge(none) and pt.pmd_pfn(none) == pfn


# ------------------------------------------------------------------------- PTEs
def test_pte_modify_keeps_pfn_dirty_young():
    """pte_modify keeps _PAGE_CHG_MASK (pfn, dirty, accessed, soft-dirty, special) and
    replaces the rest from newprot; the accessed bit is the PTE's own, so an old PTE
    stays old even though PAGE_READONLY carries _PAGE_ACCESSED."""
    pfn = 0x12345
    pte = pt.pte_mkdirty(pt.pte_mkwrite(pt.pfn_pte(pfn, pt.PAGE_COPY)))
    ro = pt.pte_modify(pte, pt.PAGE_READONLY)
    assert pt.pte_pfn(ro) == pfn
    assert pt.pte_dirty(ro) and pt.pte_young(ro) and not pt.pte_write(ro)
    assert ro & _PAGE_SOFT_DIRTY and ro & _PAGE_NX and ro & _PAGE_USER
    old = pt.pte_mkold(pt.pte_mkclean(pte))
    ro_old = pt.pte_modify(old, pt.PAGE_READONLY)
    assert not pt.pte_young(ro_old) and not pt.pte_dirty(ro_old)
    assert pt.pte_pfn(ro_old) == pfn
    # PROT_NONE: not hardware-present, still pte_present (PROTNONE), pfn kept
    none = pt.pte_modify(pte, pt.PAGE_NONE)
    assert not none & _PAGE_PRESENT and pt.pte_protnone(none) and pt.pte_present(none)
    assert pt.pte_pfn(none) == pfn and pt.pte_dirty(none)
    # and back: the same entry as before, but for write (taken from the new prot)
    back = pt.pte_modify(none, pt.PAGE_COPY)
    assert back == pt.pte_wrprotect(pte)
    # the special bit survives (the zero page stays special across mprotect)
    zero = pt.pte_mkspecial(pt.pfn_pte(7, pt.PAGE_COPY))
    assert pt.pte_modify(zero, pt.PAGE_NONE) & _PAGE_SPECIAL


def test_pte_bit_helpers():
    """pte_mkdirty sets dirty and soft-dirty (x86 _PAGE_DIRTY_BITS | _PAGE_SOFT_DIRTY);
    pte_mkclean clears only dirty; write, young and special are single bits."""
    e = pt.pfn_pte(1, 0)
    assert pt.pte_mkdirty(e) == e | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    assert pt.pte_mkclean(pt.pte_mkdirty(e)) == e | _PAGE_SOFT_DIRTY
    assert pt.pte_mkwrite(e) == e | _PAGE_RW and pt.pte_wrprotect(e | _PAGE_RW) == e
    assert pt.pte_mkyoung(e) == e | _PAGE_ACCESSED and pt.pte_mkold(e | _PAGE_ACCESSED) == e
    assert pt.pte_pfn(pt.pfn_pte((1 << 40) - 1, pt.PAGE_COPY)) == (1 << 40) - 1


def test_indices():
    """Virtual address bits: PGD 47..39, PUD 38..30, PMD 29..21, PTE 20..12."""
    addr = (3 << 39) | (5 << 30) | (7 << 21) | (11 << 12) | 0x123
    assert (pt.pgd_index(addr), pt.pud_index(addr), pt.pmd_index(addr),
            pt.pte_index(addr)) == (3, 5, 7, 11)
