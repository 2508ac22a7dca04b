"""Migration entries: mm/migrate.c.

A folio being split or migrated is unmapped by ``try_to_migrate`` (rmap.py): each PTE
that mapped it becomes a migration entry naming the page, so no CPU can reach it while
it changes. A fault on such an entry sleeps until the folio is unlocked
(``migration_entry_wait``) and then retries. ``remove_migration_ptes`` turns the entries
back into present PTEs, pointing at the same pages (after a split) or at the new ones
(after a move), with the write, dirty, young and exclusive state the entries kept.
``migrate_pages`` moves order-0 folios to new frames, for compaction.
"""

from __future__ import annotations

from kmm.pgtable import is_migration_entry, migration_entry_pfn


async def migration_entry_wait(m, vmf) -> None:
    """migration_entry_wait: recheck the PTE under its lock, then sleep on the folio.

    Context: mmap_lock held for read; takes and drops the PTE lock.
    """
    from kmm import huge_memory
    ptl = m.table_lock(vmf.pte_tbl)
    await ptl.lock("migration_entry_wait")
    cur = await m.entry_read("pte", vmf.pte_tbl, vmf.pte_idx)
    await ptl.unlock()
    if cur == vmf.orig_pte and is_migration_entry(cur):
        folio = m.physmem.folio(migration_entry_pfn(cur))
        await huge_memory.migration_entry_wait_on_locked(m, folio)
