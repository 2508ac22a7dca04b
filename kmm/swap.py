"""Faults on non-present PTEs: mm/memory.c do_swap_page and mm/migrate.c.

A PTE migration entry (left by a folio split or migration) makes the fault wait until
the folio is unlocked (``migration_entry_wait``), then the CPU refaults. Swap entries
proper, the swap device and swap-in belong to the reclaim issue.
"""

from __future__ import annotations

from kmm.pgtable import is_migration_entry, migration_entry_pfn


async def do_swap_page(m, vmf) -> int:
    """do_swap_page: only migration entries exist until swap is modelled."""
    entry = vmf.orig_pte
    if is_migration_entry(entry):
        await migration_entry_wait(m, vmf)
        return 0
    m.bug(f"do_swap_page: swap entry {entry:#x} without a swap device")
    return 0


async def migration_entry_wait(m, vmf) -> None:
    """migration_entry_wait: recheck the PTE under its lock, then sleep on the folio."""
    from kmm import huge_memory
    ptl = m.table_lock(vmf.pte_tbl)
    await ptl.lock("migration_entry_wait")
    cur = await m.entry_read("pte", vmf.pte_tbl, vmf.pte_idx)
    await ptl.unlock()
    if cur == vmf.orig_pte:
        folio = m.physmem.folio(migration_entry_pfn(cur))
        await huge_memory.migration_entry_wait_on_locked(m, folio)


async def zap_nonpresent_pte(m, mm, entry: int) -> None:
    """zap_nonpresent_ptes: a migration entry is simply dropped (it holds no reference)."""
    if not is_migration_entry(entry):
        m.bug(f"zap of swap entry {entry:#x} without a swap device")


async def copy_nonpresent_pte(m, dst_mm, src_mm, entry: int) -> int:
    """copy_nonpresent_pte: the child gets the same migration entry."""
    if not is_migration_entry(entry):
        m.bug(f"fork of swap entry {entry:#x} without a swap device")
    dst_mm.rss_anon += 1
    return entry
