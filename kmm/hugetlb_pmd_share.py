"""hugetlb PMD table sharing: mm/hugetlb.c (want_pmd_share, huge_pmd_share,
huge_pmd_unshare, hugetlb_unshare_pmds, hugetlb_split) with
CONFIG_HUGETLB_PMD_PAGE_TABLE_SHARING, as x86-64 builds 6.18.

Processes mapping the same hugetlbfs file range MAP_SHARED can use one PMD table: when
a fault finds its PUD entry empty and the VMA covers the whole PUD-aligned 1 GiB around
the address (and is shared, with its hugetlb VMA lock), huge_pmd_share looks through
the file's i_mmap for another VMA mapping the same file offsets at the same offset
within a PUD, with the same flags and likewise covering its whole PUD, and points this
mm's PUD entry at that VMA's PMD table. Every page the other process mapped is then
mapped here too, without a fault, and the folios' mapcounts do not change (one entry,
however many sharers). ``pt_share_count`` of the table's ptdesc counts the sharers
beyond the first; each sharer's VmPTE counts the table (mm_inc_nr_pmds), meminfo's
PageTables counts it once.

A sharer stops sharing (huge_pmd_unshare: its PUD entry cleared, the count down) rather
than change the shared table: on any zap of the range (MADV_DONTNEED of one 2 MiB page
drops the whole 1 GiB from that mm; munmap; exit), on mprotect, and when a VMA split
cuts inside a shared PUD range (hugetlb_split). The last user owns the table again and
zaps and frees it as usual: a table is never freed while shared.

Locking, as 6.18: huge_pmd_share holds the file's i_mmap_rwsem for read from the
lookup of the other VMA's table to the PUD populate, so that VMA cannot be torn down
(its final zap and free_pgtables take it for write) in between; unsharing holds
i_mmap_rwsem for write and the unsharing VMA's hugetlb VMA lock for write, which
excludes the faults of that mm in flight (they hold it for read across the walk to
the PMD table and the entry update): the vma lock exists for this.
"""

from __future__ import annotations

from kmm import atomic, hugetlb_resv, memory, mmdebug, tlb
from kmm.mm_types import VM_MAYSHARE
from kmm.pgtable import (
    PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE, mk_table_entry, pgd_index, pmd_index,
    pud_index, table_pfn,
)

PUD_MASK = ~(PUD_SIZE - 1)
# page_table_shareable ignores VM_LOCKED | VM_LOCKONFAULT; the model has no mlock, so
# no VMA carries them
VM_LOCKED_MASK = 0


def hugetlb_mask_last_page(h) -> int:
    """hugetlb_mask_last_page: with PMD-size pages a walker that finds no PMD table
    skips to the last huge page of the PUD range."""
    return PUD_SIZE - PMD_SIZE if h.size == PMD_SIZE else 0


def __vma_shareable_lock(vma) -> bool:
    """__vma_shareable_lock: a shared mapping that has its hugetlb VMA lock (a VMA on
    its way out, after its final zap, has none)."""
    return bool(vma.flags & VM_MAYSHARE) and vma.vm_private_data is not None


def want_pmd_share(vma, addr: int) -> bool:
    """want_pmd_share (vma_shareable): the PUD-aligned 1 GiB around addr lies wholly
    in a shared hugetlb VMA with a VMA lock (no userfaultfd in the model)."""
    start = addr & PUD_MASK
    return __vma_shareable_lock(vma) and vma.start <= start and start + PUD_SIZE <= vma.end


def page_table_shareable(svma, vma, addr: int, idx: int) -> int:
    """page_table_shareable: svma's address for file page idx if its PMD table can
    serve vma at addr (same offset within the PUD, same flags up to VM_LOCKED, the
    whole PUD range inside svma, svma's VMA lock present); else 0."""
    saddr = ((idx - svma.pgoff) << PAGE_SHIFT) + svma.start
    sbase = saddr & PUD_MASK
    if (pmd_index(addr) != pmd_index(saddr)
            or vma.flags & ~VM_LOCKED_MASK != svma.flags & ~VM_LOCKED_MASK
            or not (svma.start <= sbase and sbase + PUD_SIZE <= svma.end)
            or svma.vm_private_data is None):
        return 0
    return saddr


def ptdesc_pmd_is_shared(m, pmd_tbl: int) -> bool:
    """ptdesc_pmd_is_shared: another mm's PUD entry maps this PMD table too."""
    return m.physmem.pages[pmd_tbl].pt_share_count > 0


def _pud_of(m, mm, addr: int) -> int:
    """The PUD table covering addr (it exists: a PMD table hangs below it)."""
    return table_pfn(m.physmem.tables[mm.pgd][pgd_index(addr)])


async def huge_pte_alloc(m, mm, vma, addr: int) -> int:
    """huge_pte_alloc: the PMD table for a 2 MiB hugetlb entry at addr, allocating the
    PUD and PMD tables as needed, sharing another process's PMD table where
    want_pmd_share allows and this PUD entry is still empty (-1: out of memory).
    Context: the hugetlb VMA lock held (for read by a fault)."""
    pud = await memory.pud_alloc(m, mm, addr)
    if pud < 0:
        return -1
    if want_pmd_share(vma, addr) and not await atomic.entry_read(m, "pud", pud,
                                                                 pud_index(addr)):
        return await huge_pmd_share(m, mm, vma, addr, pud)
    return await memory.pmd_alloc_pud(m, mm, pud, addr)


async def huge_pmd_share(m, mm, vma, addr: int, pud: int) -> int:
    """huge_pmd_share: find a VMA of another mm mapping the same file range whose PMD
    table can be shared (page_table_shareable) and point this mm's PUD entry at it
    (the table's share count up, this mm's page-table bytes up); else, or if the PUD
    entry was populated meanwhile, an ordinary pmd_alloc. The i_mmap_rwsem, held for
    read throughout, keeps the other VMA and its tables from being torn down between
    the lookup and the populate. Returns the PMD table (-1: out of memory)."""
    file = vma.hugetlb_file
    idx = ((addr - vma.start) >> PAGE_SHIFT) + vma.pgoff
    lk = file.i_mmap_rwsem
    nolock = "hugetlb_pmd_share_no_i_mmap_lock" in m.bugs  # kmm.bugs
    if not nolock:
        await lk.down_read("huge_pmd_share")
    spte = -1
    for svma in list(file.i_mmap):  # vma_interval_tree_foreach(idx, idx)
        if svma is vma or svma.mm.pgd < 0:
            continue
        if not svma.pgoff <= idx < svma.pgoff + ((svma.end - svma.start) >> PAGE_SHIFT):
            continue
        saddr = page_table_shareable(svma, vma, addr, idx)
        if saddr:
            t = memory.pmd_lookup(m, svma.mm, saddr)  # hugetlb_walk
            if t >= 0:
                await atomic.ptdesc_pmd_pts_inc(m, m.physmem.page(t))
                spte = t
                break
    if spte >= 0:
        ptl = m.table_lock(spte)  # huge_pte_lock
        await ptl.lock("huge_pmd_share")
        if not await atomic.entry_read(m, "pud", pud, pud_index(addr)):
            await atomic.entry_set(m, "pud", pud, pud_index(addr), mk_table_entry(spte))
            mm.pgtables_bytes += PAGE_SIZE  # mm_inc_nr_pmds
        else:
            await atomic.ptdesc_pmd_pts_dec(m, m.physmem.page(spte))
        await ptl.unlock()
    t = await memory.pmd_alloc_pud(m, mm, pud, addr)
    if not nolock:
        await lk.up_read()
    return t


async def huge_pmd_unshare(m, mm, vma, addr: int, pmd_tbl: int) -> int:
    """huge_pmd_unshare: if this mm's PMD table for addr is shared, stop using it:
    clear the PUD entry, wait for lockless (GUP-fast) walkers of other CPUs, drop the
    share count and this mm's page-table bytes. 1 if it unshared, else 0 (the table
    is this mm's alone: the caller goes on to clear entries in it).
    Context: PMD lock held; i_mmap_rwsem held for write; the hugetlb VMA lock held for
    write (or the mmap_lock for write, hugetlb_split: no fault can walk then)."""
    if vma.hugetlb_file.hstate.size != PMD_SIZE or not ptdesc_pmd_is_shared(m, pmd_tbl):
        return 0
    mmdebug.lockdep_assert_held(m, vma.hugetlb_file.i_mmap_rwsem, "huge_pmd_unshare")
    lk = hugetlb_resv.hugetlb_vma_lock(vma)
    if mm.mmap_lock.writer is not m.sched.current:  # hugetlb_vma_assert_locked
        mmdebug.lockdep_assert_held(m, lk, "huge_pmd_unshare (hugetlb_vma_assert_locked)")
    pud = _pud_of(m, mm, addr)
    await atomic.entry_get_and_clear(m, "pud", pud, pud_index(addr))  # pud_clear
    await tlb.tlb_remove_table_sync_one(m)
    await atomic.ptdesc_pmd_pts_dec(m, m.physmem.page(pmd_tbl))
    mm.pgtables_bytes -= PAGE_SIZE  # mm_dec_nr_pmds
    return 1


def adjust_range_if_pmd_sharing_possible(vma, start: int, end: int) -> tuple[int, int]:
    """adjust_range_if_pmd_sharing_possible: widen [start, end) to whole PUDs where
    the VMA could share (the range a flush must cover once a PUD entry goes)."""
    if not vma.flags & VM_MAYSHARE:
        return start, end
    v_start = (vma.start + PUD_SIZE - 1) & PUD_MASK
    v_end = vma.end & PUD_MASK
    if start >= v_end or end <= v_start:
        return start, end
    if start > v_start:
        start &= PUD_MASK
    if end < v_end:
        end = (end + PUD_SIZE - 1) & PUD_MASK
    return start, end


async def hugetlb_unshare_pmds(m, vma, start: int, end: int, take_locks: bool) -> None:
    """hugetlb_unshare_pmds: unshare every shared PMD table of vma in the PUD-aligned
    [start, end), then flush the range. With take_locks the hugetlb VMA lock and the
    i_mmap_rwsem are taken for write; without (hugetlb_split) the caller holds
    i_mmap_rwsem and the mmap_lock for write."""
    if not vma.flags & VM_MAYSHARE or start >= end:
        return
    mm = vma.mm
    file = vma.hugetlb_file
    if take_locks:
        await hugetlb_resv.hugetlb_vma_lock_write(vma)
        await file.i_mmap_rwsem.down_write("hugetlb_unshare_pmds")
    else:
        mmdebug.lockdep_assert_held(m, file.i_mmap_rwsem, "hugetlb_unshare_pmds")
    for addr in range(start, end, PUD_SIZE):
        t = memory.pmd_lookup(m, mm, addr)  # hugetlb_walk
        if t < 0:
            continue
        ptl = m.table_lock(t)
        await ptl.lock("hugetlb_unshare_pmds")
        await huge_pmd_unshare(m, mm, vma, addr, t)
        await ptl.unlock()
    await tlb.flush_tlb_mm_range(m, mm, start, end)  # flush_hugetlb_tlb_range
    if take_locks:
        await file.i_mmap_rwsem.up_write()
        await hugetlb_resv.hugetlb_vma_unlock_write(vma)


async def hugetlb_unshare_all_pmds(m, vma) -> None:
    """hugetlb_unshare_all_pmds: unshare every PUD range wholly inside vma."""
    await hugetlb_unshare_pmds(m, vma, (vma.start + PUD_SIZE - 1) & PUD_MASK,
                               vma.end & PUD_MASK, True)


async def hugetlb_split(m, vma, addr: int) -> None:
    """hugetlb_split (__split_vma): a split at addr inside a PUD range the VMA covers
    whole ends sharing there (neither half will cover it), so unshare that range now,
    before the VMA's bounds change. Context: mmap_lock held for write; takes the
    i_mmap_rwsem for write (vma_prepare's), not the VMA lock (no fault can walk)."""
    if not addr & ~PUD_MASK:
        return
    floor = addr & PUD_MASK
    ceil = floor + PUD_SIZE
    if floor >= vma.start and ceil <= vma.end:
        lk = vma.hugetlb_file.i_mmap_rwsem
        await lk.down_write("hugetlb_split (vma_prepare)")
        await hugetlb_unshare_pmds(m, vma, floor, ceil, False)
        await lk.up_write()


def shared_pmd_tables(m) -> dict[int, int]:
    """For the checker: every PMD table of a hugetlb VMA and how many live mms' PUD
    entries map it (an exiting mm's too, until exit_mmap)."""
    refs: dict[int, int] = {}
    for task in m.tasks_with_tables():  # an exiting mm's tables count until exit_mmap
        mm = task.mm
        seen = set()
        for vma in mm.vmas:
            if vma.hugetlb_file is None:
                continue
            for base in range(vma.start & PUD_MASK, vma.end, PUD_SIZE):
                t = memory.pmd_lookup(m, mm, base)
                if t >= 0 and t not in seen:
                    seen.add(t)
                    refs[t] = refs.get(t, 0) + 1
    return refs


__all__ = ["want_pmd_share", "huge_pte_alloc", "huge_pmd_share", "huge_pmd_unshare",
           "hugetlb_unshare_pmds", "hugetlb_unshare_all_pmds", "hugetlb_split",
           "adjust_range_if_pmd_sharing_possible", "ptdesc_pmd_is_shared"]
