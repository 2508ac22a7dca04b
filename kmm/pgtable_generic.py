"""Deposit and withdraw of page tables behind huge PMDs; PMD invalidation.

mm/pgtable-generic.c. Every anonymous huge PMD (and huge zero PMD) has one PTE table
deposited with the PMD table page that holds it, so splitting it later never needs
memory. Deposit and withdraw assert that the caller holds that PMD table's lock.
"""

from __future__ import annotations

from kmm import atomic, mmdebug, rcupdate, tlb
from kmm.pgtable import HPAGE_PMD_SIZE, PAGE_SIZE, pmd_mkinvalid, pmd_trans_huge


async def pgtable_trans_huge_deposit(m, mm, pmd_tbl: int, pgtable: int) -> None:
    """pgtable_trans_huge_deposit: park a PTE table behind a huge PMD.

    Context: pmd_lockptr(mm, pmd) held.
    """
    # assert_spin_locked(pmd_lockptr(mm, pmdp)); lockdep: by this actor
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "pgtable_trans_huge_deposit")
    await m.sched.point("pgtable_trans_huge_deposit", pt=pmd_tbl, table=pgtable)
    atomic.pt_deposit_locked(m.physmem.pages[pmd_tbl], pgtable)


async def pgtable_trans_huge_withdraw(m, mm, pmd_tbl: int) -> int:
    """pgtable_trans_huge_withdraw: take back a deposited table (any one: they are
    interchangeable). Context: pmd_lockptr(mm, pmd) held."""
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "pgtable_trans_huge_withdraw")
    page = m.physmem.pages[pmd_tbl]
    if not page.pt_deposit:
        m.bug(f"pgtable_trans_huge_withdraw: nothing deposited under {pmd_tbl:#x}")
    pgtable = atomic.pt_withdraw_locked(page)
    await m.sched.point("pgtable_trans_huge_withdraw", pt=pmd_tbl, table=pgtable)
    return pgtable


async def pmdp_invalidate(m, vma, haddr: int, pmd_tbl: int, idx: int) -> int:
    """pmdp_invalidate: clear present but keep the PMD trans-huge (lockless readers
    still see a huge PMD), then flush the 2 MiB range on every CPU. Returns the old
    value. Context: PMD lock held."""
    old = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, pmd_mkinvalid(old))
    if not m.bugs or "split_pmd_no_tlb_flush" not in m.bugs:  # kmm.bugs
        await tlb.flush_tlb_mm_range(m, vma.mm, haddr, haddr + HPAGE_PMD_SIZE)
    return old


async def pmdp_huge_clear_flush(m, vma, haddr: int, pmd_tbl: int, idx: int) -> int:
    """pmdp_huge_clear_flush: clear the PMD, then flush the 2 MiB range."""
    old = await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, idx)
    await tlb.flush_tlb_mm_range(m, vma.mm, haddr, haddr + HPAGE_PMD_SIZE)
    return old


async def pmdp_collapse_flush(m, vma, address: int, pmd_tbl: int, idx: int) -> int:
    """pmdp_collapse_flush: clear a PMD that points to a PTE table (the table is now
    detached) and flush the 2 MiB range on every CPU: after this no CPU can reach the
    old pages through a cached translation. Returns the old entry. Context: PMD lock
    held (and the mmap write lock: a collapse)."""
    if address & (HPAGE_PMD_SIZE - 1):
        m.bug(f"pmdp_collapse_flush: {address:#x} is not PMD-aligned")
    old = await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, idx)
    if pmd_trans_huge(old):
        m.bug(f"pmdp_collapse_flush: PMD {pmd_tbl:#x}[{idx}] is huge")
    # collapse entails shooting down ptes, not the pmd
    if not m.bugs or "collapse_no_tlb_flush" not in m.bugs:  # kmm.bugs
        await tlb.flush_tlb_mm_range(m, vma.mm, address, address + HPAGE_PMD_SIZE)
    return old


async def pte_free_defer(m, mm, pgtable: int) -> None:
    """pte_free_defer: free a PTE table already detached from its PMD once every
    lockless walker that may still be reading it (under rcu_read_lock, as
    __pte_offset_map walks) has left its read-side section; until then the table and
    its lock stay valid, and the walker's pmd_same recheck under that lock fails.
    The table leaves the mm's page-table accounting now (the mm may be gone by then).
    Context: any; the PMD entry is already cleared."""
    mm.pgtables_bytes -= PAGE_SIZE

    async def pte_free_now() -> None:
        await m.pte_free(None, pgtable)

    await rcupdate.call_rcu(m, pte_free_now)
