"""PMD migration entries: a PMD-mapped THP migrates whole. mm/huge_memory.c.

``set_pmd_migration_entry`` freezes one huge PMD into a migration entry naming the
folio's head (try_to_migrate_one on a PMD-mapped THP, CONFIG_ARCH_ENABLE_THP_MIGRATION);
``remove_migration_pmd`` turns it back into a huge PMD of the new (or, after a failed
migration, the same) folio, with the write, young, dirty and exclusive state the entry
kept. A fault on such a PMD waits for the folio lock (huge_memory.pmd_migration_entry_wait);
zap, fork (copy_huge_pmd), split (__split_huge_pmd_locked), mprotect (change_huge_pmd)
and smaps each know the entry. The NUMA hinting fault on a huge PMD,
``do_huge_pmd_numa_page``, is here too: it is what migrates THPs between nodes.
"""

from __future__ import annotations

from kmm import atomic, mmdebug, pgtable_generic as pgg, rmap, swap
from kmm.mm_types import PG_anon_exclusive, PG_dirty, VM_WRITE
from kmm.pgtable import (
    SWP_MIG_DIRTY, SWP_MIG_YOUNG, SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE,
    is_pmd_migration_entry, is_writable_migration_entry, make_migration_entry,
    pfn_pmd, pmd_dirty, pmd_mkdirty, pmd_mkold, pmd_mkwrite, pmd_write, pmd_young,
    swp_entry, swp_offset, swp_type,
)


async def set_pmd_migration_entry(m, vma, haddr: int, pmd_tbl: int, idx: int,
                                  folio) -> int:
    """set_pmd_migration_entry: the huge PMD becomes a migration entry (write, young,
    dirty and exclusivity kept in it); the PMD's mapcount and reference go. 0, or
    -EBUSY if the exclusive folio could not be shared (pinned: not modelled, so never).
    Context: PMD lock held; folio locked."""
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "set_pmd_migration_entry")
    # pmdp_invalidate: no CPU may keep writing through a cached translation while the
    # contents are copied
    old = await pgg.pmdp_invalidate(m, vma, haddr, pmd_tbl, idx)
    exclusive = bool(folio.flags & PG_anon_exclusive)
    if exclusive:  # folio_try_share_anon_rmap_pmd
        atomic.folio_clear_flags_locked(folio, PG_anon_exclusive)
    if pmd_dirty(old):
        atomic.folio_set_flags_locked(folio, PG_dirty)
    entry = make_migration_entry(folio.pfn, pmd_write(old), exclusive, pmd_young(old),
                                 pmd_dirty(old))
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, entry)
    await rmap.folio_remove_rmap_pmd(m, folio)
    await swap.folio_put(m, folio)
    atomic.step(m.sched, "set_migration_pmd", 1, addr=haddr, pmd=entry)  # a tracepoint
    return 0


async def remove_migration_pmd(m, vma, haddr: int, pmd_tbl: int, idx: int, new) -> None:
    """remove_migration_pmd: the migration entry becomes a huge PMD of ``new``, writable
    if the entry was, old unless it was young, dirty if it was; the new folio takes a
    reference and a PMD mapcount (exclusive unless the entry was readable).
    Context: PMD lock held; both folios locked."""
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "remove_migration_pmd")
    ent = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    off = swp_offset(ent)
    pmde = pfn_pmd(new.pfn, vma.page_prot)
    if is_writable_migration_entry(ent):
        pmde = pmd_mkwrite(pmde)
    if not off & SWP_MIG_YOUNG:
        pmde = pmd_mkold(pmde)
    if new.flags & PG_dirty and off & SWP_MIG_DIRTY:
        pmde = pmd_mkdirty(pmde)
    await atomic.folio_ref_add(m, new, 1)  # folio_get
    await rmap.folio_add_anon_rmap_pmd(m, new, exclusive=swp_type(ent) != SWP_MIGRATION_READ)
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, pmde)
    atomic.step(m.sched, "remove_migration_pmd", 1, addr=haddr, pmd=pmde)  # a tracepoint


def pmd_migration_readable(ent: int, anon: bool) -> int:
    """change_huge_pmd on a writable PMD migration entry: make it readable (readable
    exclusive for an anonymous folio): "a protection check is difficult so just be
    safe and disable write"."""
    if not is_pmd_migration_entry(ent) or not is_writable_migration_entry(ent):
        return ent
    return swp_entry(SWP_MIGRATION_READ_EXCLUSIVE if anon else SWP_MIGRATION_READ,
                     swp_offset(ent))


def prot_numa_skip(m, vma, folio) -> bool:
    """prot_numa_skip (mm/mprotect.c, MM_CP_PROT_NUMA): leave a folio alone that a
    hinting fault could not or need not move: shared copy-on-write, or already on the
    node the (single-threaded) task runs on (target_node = numa_node_id())."""
    from kmm import mmzone
    from kmm.mm_types import VM_MAYWRITE, VM_SHARED
    if vma.flags & VM_MAYWRITE and not vma.flags & VM_SHARED and \
            rmap.folio_maybe_mapped_shared(m, folio):  # is_cow_mapping
        return True
    return mmzone.folio_nid(m, folio) == mmzone.numa_node_id(m)


async def do_huge_pmd_numa_page(m, vmf) -> int:
    """do_huge_pmd_numa_page: a NUMA hinting fault on a PROT_NONE huge PMD. Under the
    PMD lock, recheck that the PMD is still the one the fault read (pmd_same), ask
    numa_migrate_check where the THP belongs; to move it, isolate it
    (migrate_misplaced_folio_prepare), drop the lock and migrate it whole
    (migrate_misplaced_folio: a PMD migration entry meanwhile). Otherwise, or if the
    migration fails and the PMD is still unchanged, restore the PMD's protection
    (young, writable if it may be). Context: mmap_lock held for read; takes the PMD
    lock."""
    from kmm import migrate, mmzone, numa_balancing as nb
    from kmm.pgtable import HPAGE_PMD_MASK, HPAGE_PMD_NR, pmd_modify, pmd_mkyoung, pmd_pfn
    vma = vmf.vma
    haddr = vmf.address & HPAGE_PMD_MASK
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("do_huge_pmd_numa_page")
    old = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
    if old != vmf.orig_pmd and (not m.bugs or "numa_huge_no_pmd_same" not in m.bugs):
        await ptl.unlock()  # pmd_same failed: split, zapped, collapsed or fixed meanwhile
        return 0
    pmd = pmd_modify(old, vma.page_prot)
    folio = m.physmem.folio(pmd_pfn(pmd))
    # can_change_pmd_writable: an exclusive anonymous THP in a writable VMA
    writable = bool(vma.flags & VM_WRITE and folio.flags & PG_anon_exclusive)
    nid = mmzone.folio_nid(m, folio)
    task = m.tasks.get(vma.mm.owner)
    target, flags, last = nb.numa_migrate_check(m, task, folio, vma, haddr)
    if target != mmzone.NUMA_NO_NODE:
        if await migrate.migrate_misplaced_folio_prepare(m, folio, vma, target) == 0:
            await ptl.unlock()  # the folio is isolated: the isolation holds a reference
            if await migrate.migrate_misplaced_folio(m, folio, target) == 0:
                nb.task_numa_fault(m, task, last, target, HPAGE_PMD_NR,
                                   flags | nb.TNF_MIGRATED)
                return 0
            flags |= nb.TNF_MIGRATE_FAIL
            writable = False
            await ptl.lock("do_huge_pmd_numa_page")
            if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != vmf.orig_pmd:
                await ptl.unlock()
                return 0
        else:
            flags |= nb.TNF_MIGRATE_FAIL
    # out_map: restore the PMD
    entry = pmd_mkyoung(pmd_modify(await atomic.entry_read(m, "pmd", vmf.pmd_tbl,
                                                          vmf.pmd_idx), vma.page_prot))
    if writable:
        entry = pmd_mkwrite(entry)
    await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
    await ptl.unlock()
    nb.task_numa_fault(m, task, last, nid, HPAGE_PMD_NR, flags)
    return 0
