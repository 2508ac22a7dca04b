"""hugetlb faults, COW, fork and zap: mm/hugetlb.c (hugetlb_fault, hugetlb_no_page,
hugetlb_wp, copy_hugetlb_page_range, __unmap_hugepage_range, unmap_ref_private).

A 2 MiB hugetlb page is mapped by a PMD leaf (huge_pte_alloc walks to the PMD, no PTE
table and no deposit). Every fault on a hugetlb VMA holds, in this order, the fault
mutex hashed from (file, index) (so two CPUs faulting the same page allocate once), the
hugetlb VMA lock for read, then the PMD lock around the entry update; a COW drops the
PMD lock while it allocates and rechecks the entry (pte_same) after.

A private page is anonymous (hugetlb_add_new_anon_rmap, PageAnonExclusive); a shared
one lives in the file's page cache (one reference) and is mapped with the file rmap.
Only the entire mapcount counts hugetlb mappings. Pages count in no RSS counter
(smaps shows them as Private_Hugetlb / Shared_Hugetlb instead).

The PMD table a fault walks to may be shared with other processes (huge_pte_alloc,
kmm.hugetlb_pmd_share); every zap and protection change unshares it first.

Left out: the folio lock of hugetlb_no_page (the fault mutex already serialises every
path the model has to a page not yet mapped), userfaultfd, migration and hwpoison
entries.
"""

from __future__ import annotations

from kmm import (
    atomic, hugetlb, hugetlb_pmd_share, hugetlb_resv, memory, memory_zap, rmap, swap, tlb,
)
from kmm.cost import COST_CLEAR_HUGE, COST_COPY_PAGE
from kmm.mm_types import (
    PG_anon_exclusive, PG_dirty, VM_MAYSHARE, VM_MAYWRITE, VM_SHARED, VM_WRITE,
)
from kmm.pgtable import (
    PAGE_SIZE, PUD_SIZE, pfn_pmd, pmd_dirty, pmd_index, pmd_mkdirty, pmd_mkwrite, pmd_mkyoung,
    pmd_modify, pmd_none, pmd_pfn, pmd_write, pmd_wrprotect,
)

COST_COPY_HUGE = 512 * COST_COPY_PAGE  # copy_user_large_folio, 2 MiB


# ------------------------------------------------------------ rmap (shared-state ops)
async def hugetlb_add_new_anon_rmap(m, folio, vma, addr: int) -> None:
    """hugetlb_add_new_anon_rmap: a new private page, mapped once, exclusive; it no
    longer restores a reservation when freed."""
    m.hugetlb.restore_reserve.discard(folio.pfn)
    await atomic.mapcount_new_anon(m, folio, vma.anon_vma, vma.linear_page_index(addr),
                                   pmd=True)


async def hugetlb_add_file_rmap(m, folio) -> None:
    """hugetlb_add_file_rmap: one more mapping of a page-cache page."""
    await atomic.mapcount_add_pmd(m, folio, False)


async def hugetlb_try_dup_anon_rmap(m, folio) -> None:
    """hugetlb_try_dup_anon_rmap (fork): the page is now shared with the child, so no
    longer exclusive (no pins are modelled, so it never fails)."""
    await atomic.mapcount_dup_pmd(m, folio)


async def hugetlb_remove_rmap(m, folio) -> None:
    """hugetlb_remove_rmap."""
    await atomic.mapcount_remove_pmd(m, folio)


def folio_mark_anon_exclusive(m, folio, vma) -> None:
    """folio_move_anon_rmap + SetPageAnonExclusive on reuse. Context: PMD lock held."""
    atomic.folio_set_field_locked(folio, "anon_vma", vma.anon_vma)
    atomic.folio_set_flags_locked(folio, PG_anon_exclusive)


def folio_mark_dirty(m, folio) -> None:
    """folio_mark_dirty. Context: PMD lock held."""
    atomic.folio_set_flags_locked(folio, PG_dirty)


# ------------------------------------------------------------------ helpers
def make_huge_pte(vma, pfn: int, writable: bool) -> int:
    """make_huge_pte: a young PMD leaf; writable ones are dirty too."""
    e = pmd_mkyoung(pfn_pmd(pfn, vma.page_prot))
    return pmd_mkwrite(pmd_mkdirty(e)) if writable else pmd_wrprotect(e)


def hugetlb_fault_mutex_hash(m, file, idx: int) -> int:
    """hugetlb_fault_mutex_hash: (mapping, index) onto the table (a fixed hash: the
    kernel's jhash2 is seeded at boot, the table size is what matters)."""
    table = m.hugetlb.fault_mutex_table
    return ((file.id * 0x9E3779B1) ^ (idx * 0x85EBCA77)) & (len(table) - 1)


class HugetlbVmf:
    """The vm_fault hugetlb_fault builds: the VMA, the huge-aligned address, the
    file index, the PMD slot and the entry read."""

    __slots__ = ("vma", "address", "write", "pgoff", "pmd_tbl", "pmd_idx", "orig_pte",
                 "ptl")

    def __init__(self, vma, addr: int, write: bool) -> None:
        h = vma.hugetlb_file.hstate
        self.vma = vma
        self.address = addr & ~(h.size - 1)
        self.write = write
        self.pgoff = hugetlb_resv.vma_hugecache_offset(vma, self.address)
        self.pmd_tbl = -1
        self.pmd_idx = pmd_index(self.address)
        self.orig_pte = 0
        self.ptl = None


# -------------------------------------------------------------------- faults
async def hugetlb_fault(m, vma, addr: int, write: bool) -> int:
    """hugetlb_fault: the fault entry for a hugetlb VMA (handle_mm_fault hands it
    over). Context: mmap_lock held for read; takes the fault mutex, the hugetlb VMA
    lock for read and the PMD lock, in that order, and drops them all."""
    vmf = HugetlbVmf(vma, addr, write)
    wait_on = None
    mutex = m.hugetlb.fault_mutex_table[hugetlb_fault_mutex_hash(m, vma.hugetlb_file, vmf.pgoff)]
    if "hugetlb_fault_no_mutex" in m.bugs:
        mutex = None  # kmm.bugs: faults on one page no longer serialised
    else:
        await mutex.down_write("hugetlb_fault")
    await hugetlb_resv.hugetlb_vma_lock_read(vma)
    try:
        vmf.pmd_tbl = await hugetlb_pmd_share.huge_pte_alloc(m, vma.mm, vma, vmf.address)
        if vmf.pmd_tbl < 0:
            return memory.VM_FAULT_OOM
        vmf.orig_pte = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
        if pmd_none(vmf.orig_pte):
            return await hugetlb_no_page(m, vmf)
        ptl = vmf.ptl = m.table_lock(vmf.pmd_tbl)  # huge_pte_lock
        await ptl.lock("hugetlb_fault")
        ret = 0
        if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) == vmf.orig_pte:
            entry = vmf.orig_pte
            if write and not pmd_write(entry):
                folio = m.physmem.folio(pmd_pfn(entry))
                # an anonymous folio is locked across hugetlb_wp (its reuse check); a
                # trylock under the PMD lock, else wait for it unlocked and refault
                lk = m.folio_lock_of(folio) if folio.anon_vma is not None else None
                if lk is not None and not await lk.trylock("hugetlb_fault"):
                    wait_on = lk
                else:
                    await atomic.folio_ref_add(m, folio, 1)  # folio_get across hugetlb_wp
                    ret = await hugetlb_wp(m, vmf)
                    if lk is not None:
                        await lk.unlock()
                    await swap.folio_put(m, folio)
            else:
                if write:
                    entry = pmd_mkdirty(entry)
                entry = pmd_mkyoung(entry)
                if entry != vmf.orig_pte:  # huge_ptep_set_access_flags
                    await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
        await ptl.unlock()
        return ret
    finally:
        await hugetlb_resv.hugetlb_vma_unlock_read(vma)
        if mutex is not None:
            await mutex.up_write()
        if wait_on is not None:  # folio_wait_locked, with no lock of ours held
            await wait_on.lock("folio_wait_locked")
            await wait_on.unlock()


async def hugetlb_no_page(m, vmf: HugetlbVmf) -> int:
    """hugetlb_no_page: instantiate the page: from the file's page cache (shared), or a
    new zeroed folio from the pool (alloc_hugetlb_folio, using the reservation). No page
    to be had is SIGBUS, as is a child's fault where its parent's COW unmapped the page
    (HPAGE_RESV_UNMAPPED). A write to a private page goes on to hugetlb_wp at once.
    Context: fault mutex and hugetlb VMA lock held (by the caller, hugetlb_fault)."""
    vma = vmf.vma
    file = vma.hugetlb_file
    h = file.hstate
    if hugetlb_resv.is_vma_resv_set(vma, hugetlb_resv.HPAGE_RESV_UNMAPPED):
        return memory.VM_FAULT_SIGBUS  # "killed due to inadequate hugepage pool"
    shared = bool(vma.flags & VM_MAYSHARE)
    new_folio = False
    pfn = file.cache.get(vmf.pgoff) if shared else None
    if pfn is not None:  # filemap_lock_hugetlb_folio found it
        folio = m.physmem.page(pfn)
        await atomic.folio_ref_add(m, folio, 1)
    else:
        if vmf.pgoff >= file.size >> (h.order + 12):
            return memory.VM_FAULT_SIGBUS  # beyond i_size
        if not shared and not await rmap.anon_vma_prepare(m, vma):
            return memory.VM_FAULT_OOM
        folio = await hugetlb.alloc_hugetlb_folio(m, vma, vmf.address, False)
        if isinstance(folio, str):
            # hugetlb_pte_stable: a racing fault that mapped it meanwhile is no failure
            if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != vmf.orig_pte:
                return 0
            return memory.VM_FAULT_OOM if folio == "ENOMEM" else memory.VM_FAULT_SIGBUS
        await atomic.point(m.sched, "folio_zero_user", COST_CLEAR_HUGE, pfn=folio.pfn)
        m.physmem.clear(folio.pfn, h.nr_pages)
        new_folio = True
        if shared:  # hugetlb_add_to_page_cache: the cache's own reference
            await atomic.folio_ref_add(m, folio, 1)
            m.hugetlb.restore_reserve.discard(folio.pfn)
            file.cache[vmf.pgoff] = folio.pfn
    ptl = vmf.ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("hugetlb_no_page")
    if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != vmf.orig_pte:
        # backout: another fault mapped it
        await ptl.unlock()
        if new_folio and shared:
            file.cache.pop(vmf.pgoff, None)
            await swap.folio_put(m, folio)
        elif new_folio and folio.pfn in m.hugetlb.restore_reserve:
            # restore_reserve_on_error: the reservation it consumed is the VMA's again
            # (the folio's HPG_restore_reserve gives the global count back when freed)
            hugetlb_resv.vma_add_reservation(m, vma, vmf.address)
        await swap.folio_put(m, folio)
        return 0
    if shared:
        await hugetlb_add_file_rmap(m, folio)
    else:
        await hugetlb_add_new_anon_rmap(m, folio, vma, vmf.address)
    entry = make_huge_pte(vma, folio.pfn, bool(vma.flags & VM_SHARED))
    await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
    ret = 0
    if vmf.write and not vma.flags & VM_SHARED:
        vmf.orig_pte = entry
        ret = await hugetlb_wp(m, vmf)  # the COW without a second fault
    await ptl.unlock()
    return ret


async def hugetlb_wp(m, vmf: HugetlbVmf) -> int:
    """hugetlb_wp: a write to a read-only hugetlb entry. Shared: make it writable. A
    private page mapped once and anonymous is reused; otherwise copy it into a new
    folio. If the owner of the private mapping cannot get one (no free unreserved page,
    no surplus), 6.18 unmaps the page from the children (unmap_ref_private: they will
    get SIGBUS when they touch it) so the owner can reuse it; anyone else gets SIGBUS.
    Context: fault mutex, VMA lock and PMD lock held; the PMD lock is dropped around
    the allocation and held again on return."""
    vma = vmf.vma
    ptl = vmf.ptl
    while True:  # retry_avoidcopy
        pte = vmf.orig_pte
        if vma.flags & VM_MAYSHARE:
            await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx,
                              pmd_mkwrite(pmd_mkdirty(pmd_mkyoung(pte))))
            return 0
        old = m.physmem.folio(pmd_pfn(pte))
        if old.entire_mapcount == 1 and old.anon_vma is not None:
            if not old.flags & PG_anon_exclusive:
                folio_mark_anon_exclusive(m, old, vma)
            if vma.flags & VM_WRITE:
                await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx,
                                  pmd_mkwrite(pmd_mkdirty(pmd_mkyoung(pte))))
            return 0
        cow_from_owner = hugetlb_resv.is_vma_resv_set(vma, hugetlb_resv.HPAGE_RESV_OWNER)
        await atomic.folio_ref_add(m, old, 1)
        await ptl.unlock()
        new = await hugetlb.alloc_hugetlb_folio(m, vma, vmf.address, cow_from_owner)
        if isinstance(new, str):
            await swap.folio_put(m, old)
            if not cow_from_owner:
                await ptl.lock("hugetlb_wp")
                return memory.VM_FAULT_SIGBUS if new != "ENOMEM" else memory.VM_FAULT_OOM
            # The kernel drops the fault mutex and this VMA's lock around the unmap, as
            # unmap_hugepage_range takes VMA locks for write; the children's private
            # VMAs have none (no reserve map), so the model keeps both held
            await unmap_ref_private(m, vma, old, vmf.address)
            await ptl.lock("hugetlb_wp")
            cur = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
            if cur == pte:
                continue  # retry_avoidcopy: now mapped only here
            return 0
        await atomic.point(m.sched, "copy_user_large_folio", COST_COPY_HUGE, dst=new.pfn,
                            src=old.pfn)
        for i in range(old.nr_pages):
            m.physmem.copy(new.pfn + i, old.pfn + i)
        await ptl.lock("hugetlb_wp")
        if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) == pte:
            # huge_ptep_clear_flush, then the new page
            await atomic.entry_get_and_clear(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
            await tlb.flush_tlb_mm_range(m, vma.mm, vmf.address,
                                         vmf.address + vma.hugetlb_file.hstate.size)
            await hugetlb_remove_rmap(m, old)
            await hugetlb_add_new_anon_rmap(m, new, vma, vmf.address)
            await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx,
                              make_huge_pte(vma, new.pfn, True))
            new = old  # the old page loses the mapping's reference below
        await ptl.unlock()
        await swap.folio_put(m, new)
        await swap.folio_put(m, old)
        await ptl.lock("hugetlb_wp")
        return 0


async def unmap_ref_private(m, vma, folio, address: int) -> None:
    """unmap_ref_private: unmap the page from every other VMA of the mapping that does
    not own the reservation (the children), marking them HPAGE_RESV_UNMAPPED.
    Context: called without the PMD lock."""
    file = vma.hugetlb_file
    pgoff = hugetlb_resv.vma_hugecache_offset(vma, address)
    await file.i_mmap_rwsem.down_write("unmap_ref_private")
    for iter_vma in list(file.i_mmap):
        if iter_vma is vma or iter_vma.mm.pgd < 0:
            continue
        if hugetlb_resv.is_vma_resv_set(iter_vma, hugetlb_resv.HPAGE_RESV_OWNER):
            continue
        a = iter_vma.start + ((pgoff << (file.hstate.order + 12))
                              - (iter_vma.pgoff << 12))
        if not iter_vma.start <= a < iter_vma.end:
            continue
        tlbg = memory_zap.MmuGather(iter_vma.mm)
        await __unmap_hugepage_range(m, tlbg, iter_vma, a, a + file.hstate.size, folio)
        await tlbg.finish(m)
    await file.i_mmap_rwsem.up_write()


# -------------------------------------------------------------------- zap
async def unmap_hugepage_range(m, tlbg, vma, start: int, end: int,
                               final: bool = False) -> None:
    """unmap_single_vma of a hugetlb VMA (munmap, exit, MADV_DONTNEED): zap with the
    hugetlb VMA lock and the file's i_mmap_rwsem held for write (hugetlb_zap_begin /
    hugetlb_zap_end). A ``final`` zap (the VMA is going: ZAP_FLAG_UNMAP) frees a shared
    VMA's lock before the i_mmap_rwsem is dropped (__hugetlb_vma_unlock_write_free):
    from then on no huge_pmd_share finds this VMA's PMD table, which free_pgtables may
    free."""
    lk = hugetlb_resv.hugetlb_vma_lock(vma)
    imm = vma.hugetlb_file.i_mmap_rwsem
    if lk is not None:
        await lk.down_write("hugetlb_zap_begin")
    await imm.down_write("hugetlb_zap_begin")
    try:
        await __unmap_hugepage_range(m, tlbg, vma, start, end, None)
    finally:
        if final and vma.flags & VM_MAYSHARE:
            vma.vm_private_data = None  # hugetlb_vma_lock_free
        if lk is not None:
            await lk.up_write()
        await imm.up_write()


async def __unmap_hugepage_range(m, tlbg, vma, start: int, end: int, ref_folio) -> None:
    """__unmap_hugepage_range: clear each huge entry in [start, end) under its PMD
    lock; the folios are freed after the TLB flush (the mmu_gather). Freeing a private
    owner's page restores its reservation (HPG_restore_reserve, the reserve map entry
    dropped). With ``ref_folio`` only entries mapping that folio go, and the VMA is
    marked HPAGE_RESV_UNMAPPED (unmap_ref_private)."""
    h = vma.hugetlb_file.hstate
    mm = vma.mm
    last_addr_mask = hugetlb_pmd_share.hugetlb_mask_last_page(h)
    addr = start & ~(h.size - 1)
    while addr < end:
        pmd_tbl = memory.pmd_lookup(m, mm, addr)  # hugetlb_walk
        if pmd_tbl < 0:
            addr = (addr | last_addr_mask) + h.size
            continue
        idx = pmd_index(addr)
        ptl = m.table_lock(pmd_tbl)
        await ptl.lock("__unmap_hugepage_range")
        if await hugetlb_pmd_share.huge_pmd_unshare(m, mm, vma, addr, pmd_tbl):
            # the whole PUD range leaves this mm; the other sharers keep the pages
            await ptl.unlock()
            base = addr & ~(PUD_SIZE - 1)
            tlbg.track(base, base + PUD_SIZE)  # tlb_flush_pmd_range, force_flush
            addr = (addr | last_addr_mask) + h.size
            continue
        pte = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if pmd_none(pte):
            await ptl.unlock()
            addr += h.size
            continue
        folio = m.physmem.folio(pmd_pfn(pte))
        if ref_folio is not None:
            if folio is not ref_folio:
                await ptl.unlock()
                addr += h.size
                continue
            vma.vm_private_data = vma.vm_private_data or hugetlb_resv.HugetlbVmaData(None, 0)
            vma.vm_private_data.flags |= hugetlb_resv.HPAGE_RESV_UNMAPPED
        await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, idx)
        tlbg.track(addr, addr + h.size)
        if pmd_dirty(pte):
            folio_mark_dirty(m, folio)
        await hugetlb_remove_rmap(m, folio)
        adjust = (not h.surplus_huge_pages and hugetlb_resv.hugetlb_vma_lock(vma) is not None
                  and not vma.flags & VM_MAYSHARE and folio.anon_vma is not None)
        if adjust:
            m.hugetlb.restore_reserve.add(folio.pfn)
        await ptl.unlock()
        if adjust and hugetlb_resv.vma_needs_reservation(m, vma, addr):
            hugetlb_resv.vma_add_reservation(m, vma, addr)
        tlbg.folios.append((folio, 1))
        addr += h.size


# -------------------------------------------------------------------- fork
async def copy_hugetlb_page_range(m, dst_vma, src_vma) -> bool:
    """copy_hugetlb_page_range: the child maps the same pages; a private (COW) mapping
    write-protects both entries, and the page stops being exclusive. Where the child's
    table is a shared PMD table there is nothing to copy (dup_mmap calls this only for
    VMAs with an anon_vma, so a shared mapping is never copied: the child's faults share
    the parent's table instead). False when the child's page tables cannot be
    allocated. Context: both mmap_locks held for write."""
    cow = src_vma.flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE  # is_cow_mapping
    src_mm, dst_mm = src_vma.mm, dst_vma.mm
    h = src_vma.hugetlb_file.hstate
    if not cow:
        await hugetlb_resv.hugetlb_vma_lock_read(src_vma)
    try:
        addr = src_vma.start
        while addr < src_vma.end:
            src_pmd = memory.pmd_lookup(m, src_mm, addr)
            if src_pmd < 0:
                addr = (addr | hugetlb_pmd_share.hugetlb_mask_last_page(h)) + h.size
                continue
            dst_pmd = await hugetlb_pmd_share.huge_pte_alloc(m, dst_mm, dst_vma, addr)
            if dst_pmd < 0:
                return False
            if hugetlb_pmd_share.ptdesc_pmd_is_shared(m, dst_pmd):
                # the child shares the PMD table: nothing to copy, no references to take
                addr = (addr | hugetlb_pmd_share.hugetlb_mask_last_page(h)) + h.size
                continue
            idx = pmd_index(addr)
            dst_ptl = m.table_lock(dst_pmd)
            src_ptl = m.table_lock(src_pmd)
            await dst_ptl.lock("copy_hugetlb_page_range")
            await src_ptl.lock("copy_hugetlb_page_range", 1)  # SINGLE_DEPTH_NESTING
            entry = await atomic.entry_read(m, "pmd", src_pmd, idx)
            if not pmd_none(entry):
                folio = m.physmem.folio(pmd_pfn(entry))
                await atomic.folio_ref_add(m, folio, 1)
                if folio.anon_vma is None:
                    await hugetlb_add_file_rmap(m, folio)
                else:
                    await hugetlb_try_dup_anon_rmap(m, folio)
                if cow:
                    entry = pmd_wrprotect(entry)
                    await atomic.entry_set(m, "pmd", src_pmd, idx, entry)  # huge_ptep_set_wrprotect
                await atomic.entry_set(m, "pmd", dst_pmd, idx, entry)
            await src_ptl.unlock()
            await dst_ptl.unlock()
            addr += h.size
    finally:
        if not cow:
            await hugetlb_resv.hugetlb_vma_unlock_read(src_vma)
    return True


# ----------------------------------------------------------------- mprotect
async def hugetlb_change_protection(m, vma, start: int, end: int, newprot: int) -> None:
    """hugetlb_change_protection: each huge entry of [start, end) gets the new
    protection under its PMD lock (never made writable here: a write faults), with the
    hugetlb VMA lock and the i_mmap_rwsem held for write; a shared PMD table is
    unshared instead (its whole PUD range leaves this mm, to be refaulted with the new
    protection); then one TLB flush of the range (of the whole PUDs if it unshared)."""
    h = vma.hugetlb_file.hstate
    changed = shared_pmd = False
    last_addr_mask = hugetlb_pmd_share.hugetlb_mask_last_page(h)
    flush = hugetlb_pmd_share.adjust_range_if_pmd_sharing_possible(vma, start, end)
    imm = vma.hugetlb_file.i_mmap_rwsem
    await hugetlb_resv.hugetlb_vma_lock_write(vma)
    await imm.down_write("hugetlb_change_protection")
    addr = start & ~(h.size - 1)
    while addr < end:
        t = memory.pmd_lookup(m, vma.mm, addr)
        if t < 0:
            addr = (addr | last_addr_mask) + h.size
            continue
        ptl = m.table_lock(t)
        await ptl.lock("hugetlb_change_protection")
        if await hugetlb_pmd_share.huge_pmd_unshare(m, vma.mm, vma, addr, t):
            await ptl.unlock()
            shared_pmd = changed = True
            addr = (addr | last_addr_mask) + h.size
            continue
        old = await atomic.entry_read(m, "pmd", t, pmd_index(addr))
        if not pmd_none(old):
            new = pmd_wrprotect(pmd_modify(old, newprot))  # huge_pte_modify
            if new != old:
                await atomic.entry_set(m, "pmd", t, pmd_index(addr), new)
                changed = True
        await ptl.unlock()
        addr += h.size
    if changed:
        await tlb.flush_tlb_mm_range(m, vma.mm, *(flush if shared_pmd else (start, end)))
    await imm.up_write()
    await hugetlb_resv.hugetlb_vma_unlock_write(vma)


# ------------------------------------------------------------------ madvise
async def madvise_hugetlb(m, vma, start: int, end: int, advice: str) -> int | str:
    """The madvise advice a hugetlb VMA takes (madvise_dontneed_free_valid_vma):
    MADV_DONTNEED from a huge-page-aligned start, the end rounded *down* to a huge page
    (no data loss for callers unaware of huge pages); FREE, COLD, PAGEOUT and COLLAPSE
    are EINVAL; (NO)HUGEPAGE change nothing here."""
    h = vma.hugetlb_file.hstate
    if advice in ("hugepage", "nohugepage"):
        return 0
    if advice != "dontneed" or start & (h.size - 1):
        return "EINVAL"
    end &= ~(h.size - 1)
    if end <= start:
        return 0
    tlbg = memory_zap.MmuGather(vma.mm)
    await unmap_hugepage_range(m, tlbg, vma, start, end)
    await tlbg.finish(m)
    return 0


# ------------------------------------------------------------------- smaps
def smaps_hugetlb_range(m, mm, vma, start: int, end: int) -> tuple[int, int]:
    """smaps_hugetlb_range: (Private_Hugetlb kB, Shared_Hugetlb kB); a page is shared
    when it may be mapped more than once (folio_maybe_mapped_shared) or its PMD table
    is shared (hugetlb_pmd_shared)."""
    h = vma.hugetlb_file.hstate
    private = shared = 0
    addr = max(start, vma.start) & ~(h.size - 1)
    while addr < min(end, vma.end):
        t = memory.pmd_lookup(m, mm, addr)
        if t >= 0:
            e = m.physmem.tables[t][pmd_index(addr)]
            if e:
                folio = m.physmem.folio(pmd_pfn(e))
                if folio.entire_mapcount > 1 or hugetlb_pmd_share.ptdesc_pmd_is_shared(m, t):
                    shared += h.size
                else:
                    private += h.size
        addr += h.size
    return private >> 10, shared >> 10


__all__ = ["hugetlb_fault", "hugetlb_no_page", "hugetlb_wp", "copy_hugetlb_page_range",
           "unmap_hugepage_range", "madvise_hugetlb", "smaps_hugetlb_range", "PAGE_SIZE"]
