"""The page fault path and page-table teardown and copy: mm/memory.c.

``handle_mm_fault`` walks down the levels as ``__handle_mm_fault`` does, allocating
tables outside locks and installing them only if the slot is still empty; at the PMD
level it hands eligible faults to ``create_huge_pmd`` (huge_memory.py), and at the PTE
level it runs ``do_anonymous_page``, ``do_wp_page`` (memory_wp.py) or the access-flag
update. Every path re-reads its entry under the lock (``pte_same``/``pmd_same``) after
any point where another actor may have changed it, and backs out (returns 0, the CPU
refaults) if so.

``copy_page_range`` (fork) walks ranges the same way as ``unmap_page_range`` (zap, in
memory_zap.py), splitting a huge PMD where the range covers only part of it. Left out:
file and shared mappings, userfaultfd, NUMA hinting, KSM, per-VMA locks (faults take
mmap_lock for read). PT_RECLAIM of empty PTE tables is in madvise.py; the tables it
detaches are freed after an RCU grace period (rcupdate.py). mTHP orders below PMD are chosen in
memory_anon.alloc_anon_folio; large-folio swap-in is memory_swapin.py.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, huge_memory_mthp, hugetlb_fault, memory_anon, memory_swapin, memory_wp,
    migrate, mmdebug, rcupdate, rmap, swap, swap_state, swapfile,
)
from kmm.mm_types import (
    PG_anon_exclusive, VM_EXEC, VM_HUGETLB, VM_READ, VM_SHARED, VM_WRITE, MmStruct, VmArea,
)
from kmm.pgtable import (
    PAGE_SIZE, PMD_SIZE, PUD_SIZE, mk_table_entry, pfn_pte, pmd_index, pmd_none, pmd_present,
    pmd_trans_huge, pte_index, pte_mkdirty, pte_mkspecial, pte_mkwrite, pte_mkyoung, pte_none,
    pte_pfn, pte_present, pte_special, pte_write, pud_index, pgd_index, table_pfn,
    is_pmd_migration_entry, is_swap_pmd, pmd_write, pte_mkold, pte_wrprotect,
    is_migration_entry, swp_offset, _PAGE_SOFT_DIRTY, _PAGE_SWP_EXCLUSIVE, _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP, pmd_protnone, pte_protnone,
)

VM_FAULT_OOM = 0x1
VM_FAULT_SIGSEGV = 0x2
VM_FAULT_FALLBACK = 0x4
VM_FAULT_NOPAGE = 0x8
VM_FAULT_SIGBUS = 0x10

FAULT_FLAG_WRITE = 0x1
FAULT_FLAG_UNSHARE = 0x2


class Vmf:
    """struct vm_fault: what one fault knows as it goes down the levels."""

    __slots__ = ("vma", "address", "write", "pmd_tbl", "pmd_idx", "orig_pmd",
                 "pte_tbl", "pte_idx", "orig_pte", "ptl")

    def __init__(self, vma: VmArea, address: int, write: bool) -> None:
        self.vma = vma
        self.address = address & ~(PAGE_SIZE - 1)
        self.write = write
        self.pmd_tbl = -1
        self.pmd_idx = 0
        self.orig_pmd = 0
        self.pte_tbl = -1
        self.pte_idx = 0
        self.orig_pte = 0
        self.ptl = None


# ------------------------------------------------------------ upper levels
async def _alloc_table(m, mm: MmStruct, table: int, idx: int, level: str, child: str,
                       site: str) -> int:
    """__pud_alloc / __pmd_alloc: allocate outside the lock, install under
    mm->page_table_lock only if the entry is still empty. Returns the child table."""
    e = await atomic.entry_read(m, level, table, idx)
    if e:
        return table_pfn(e)
    new = await m.pte_alloc_one(mm, child)
    if new < 0:
        return -1
    await mm.page_table_lock.lock(site)
    e = await atomic.entry_read(m, level, table, idx)
    if not e:
        e = mk_table_entry(new)
        await atomic.entry_set(m, level, table, idx, e)
        new = -1
    await mm.page_table_lock.unlock()
    if new >= 0:
        await m.pte_free(mm, new)  # another fault won the race
    return table_pfn(e)


async def pmd_alloc(m, mm: MmStruct, addr: int) -> int:
    """pud_alloc + pmd_alloc: the PMD table for addr (-1: out of memory)."""
    pud = await _alloc_table(m, mm, mm.pgd, pgd_index(addr), "pgd", "pud", "__pud_alloc")
    if pud < 0:
        return -1
    return await _alloc_table(m, mm, pud, pud_index(addr), "pud", "pmd", "__pmd_alloc")


async def pud_alloc(m, mm: MmStruct, addr: int) -> int:
    """pud_alloc: the PUD table for addr (-1: out of memory)."""
    return await _alloc_table(m, mm, mm.pgd, pgd_index(addr), "pgd", "pud", "__pud_alloc")


async def pmd_alloc_pud(m, mm: MmStruct, pud: int, addr: int) -> int:
    """pmd_alloc(mm, pud, addr): the PMD table the PUD table's entry for addr names,
    allocated if none (-1: out of memory)."""
    return await _alloc_table(m, mm, pud, pud_index(addr), "pud", "pmd", "__pmd_alloc")


def pmd_lookup(m, mm: MmStruct, addr: int) -> int:
    """mm_find_pmd without points: the PMD table covering addr, or -1 (for walkers
    that already hold the locks that keep tables alive)."""
    tables = m.physmem.tables
    e = tables[mm.pgd][pgd_index(addr)]
    if not e:
        return -1
    e = tables[table_pfn(e)][pud_index(addr)]
    if not e:
        return -1
    return table_pfn(e)


async def pmd_install(m, mm: MmStruct, pmd_tbl: int, idx: int, new: int) -> bool:
    """pmd_install: install a new PTE table if the PMD is still none (under the PMD
    lock). Returns True if ``new`` was used."""
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("pmd_install")
    used = False
    if pmd_none(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
        mm.nr_ptes += 1
        await atomic.entry_set(m, "pmd", pmd_tbl, idx, mk_table_entry(new))
        used = True
    await ptl.unlock()
    return used


async def __pte_alloc(m, mm: MmStruct, pmd_tbl: int, idx: int) -> bool:
    """__pte_alloc: False when no memory for the table."""
    new = await m.pte_alloc_one(mm, "pte")
    if new < 0:
        return False
    if not await pmd_install(m, mm, pmd_tbl, idx, new):
        await m.pte_free(mm, new)
    return True


async def pte_offset_map_lock(m, pmd_tbl: int, idx: int, subclass: int = 0):
    """pte_offset_map_lock: lock the PTE table the PMD points to, re-checking the PMD
    under the lock. Returns (table, ptl), or None if the PMD is none, huge or a
    migration entry now (the caller backs out).

    The PMD is read without a lock, so the table may be detached and handed to RCU
    (pt_reclaim) before its lock is taken: __pte_offset_map reads it under
    rcu_read_lock, which keeps the table and its lock allocated until the recheck.
    Once the lock is held and the PMD still points to the table, the lock pins it
    (every detacher clears the PMD under it), so the read-side section ends there."""
    while True:
        rcupdate.rcu_read_lock(m)
        pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if pmd_none(pmdval) or pmd_trans_huge(pmdval) or not pmd_present(pmdval):
            await rcupdate.rcu_read_unlock(m)
            return None
        pte_tbl = table_pfn(pmdval)
        ptl = m.table_lock(pte_tbl)
        await ptl.lock("pte_offset_map_lock", subclass)
        same = await atomic.entry_read(m, "pmd", pmd_tbl, idx) == pmdval
        if not same:
            await ptl.unlock()
        await rcupdate.rcu_read_unlock(m)
        if same:
            return pte_tbl, ptl
        m.sched.yield_spin("pte_offset_map_lock")  # the PMD changed under us: retry


# ------------------------------------------------------------ fault entry
async def handle_mm_fault(m, vma: VmArea, addr: int, write: bool) -> int:
    """handle_mm_fault: resolve one fault at addr in vma (mmap_lock held for read: the
    VMA was found under it, lock_mm_and_find_vma; per-VMA locks are not modelled)."""
    mmdebug.mmap_assert_locked(m, vma.mm, "handle_mm_fault")
    m.vmstat.count_vm_event("pgfault")
    atomic.step(m.sched, "handle_mm_fault", 1, addr=addr, write=write)  # a tracepoint
    if vma.flags & VM_HUGETLB:  # is_vm_hugetlb_page
        return await hugetlb_fault.hugetlb_fault(m, vma, addr, write)
    return await __handle_mm_fault(m, vma, addr, write)


async def __handle_mm_fault(m, vma: VmArea, addr: int, write: bool) -> int:
    mm = vma.mm
    vmf = Vmf(vma, addr, write)
    pmd_tbl = await pmd_alloc(m, mm, addr)
    if pmd_tbl < 0:
        return VM_FAULT_OOM
    vmf.pmd_tbl, vmf.pmd_idx = pmd_tbl, pmd_index(addr)
    pmdval = await atomic.entry_read(m, "pmd", pmd_tbl, vmf.pmd_idx)
    if pmd_none(pmdval) and huge_memory.thp_vma_allowable_order(m, vma, "pagefault"):
        ret = await huge_memory.create_huge_pmd(m, vmf)
        if not ret & VM_FAULT_FALLBACK:
            return ret
    else:
        orig = vmf.orig_pmd = await atomic.entry_read(m, "pmd", pmd_tbl, vmf.pmd_idx)
        if is_swap_pmd(orig):
            if is_pmd_migration_entry(orig):
                await huge_memory.pmd_migration_entry_wait(m, vmf)
            return 0
        if pmd_trans_huge(orig):
            if pmd_protnone(orig) and vma.flags & (VM_READ | VM_WRITE | VM_EXEC):
                from kmm import huge_memory_migrate  # vma_is_accessible: a hinting fault
                return await huge_memory_migrate.do_huge_pmd_numa_page(m, vmf)
            if write and not pmd_write(orig):
                ret = await huge_memory.wp_huge_pmd(m, vmf)
                if not ret & VM_FAULT_FALLBACK:
                    return ret
            else:
                await huge_memory.huge_pmd_set_accessed(m, vmf)
                return 0
    return await handle_pte_fault(m, vmf)


async def handle_pte_fault(m, vmf: Vmf) -> int:
    """handle_pte_fault: missing, swapped, write-protected, or just old/clean.

    The PTE is first read locklessly (pte_offset_map_rw_nolock + ptep_get_lockless)
    under rcu_read_lock: MADV_DONTNEED's pt_reclaim may detach the table meanwhile,
    and RCU keeps it readable until the section ends."""
    rcupdate.rcu_read_lock(m)  # __pte_offset_map
    pmdval = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
    if pmd_none(pmdval):
        await rcupdate.rcu_read_unlock(m)
        return await do_pte_missing(m, vmf)
    if pmd_trans_huge(pmdval) or not pmd_present(pmdval):
        await rcupdate.rcu_read_unlock(m)
        return 0  # pte_offset_map failed: the PMD changed under us, refault
    vmf.pte_tbl, vmf.pte_idx = table_pfn(pmdval), pte_index(vmf.address)
    orig = vmf.orig_pte = await atomic.entry_read(m, "pte", vmf.pte_tbl, vmf.pte_idx)
    await rcupdate.rcu_read_unlock(m)  # pte_unmap: every later step rechecks the PMD
    if pte_none(orig):
        return await do_pte_missing(m, vmf)
    if not pte_present(orig):
        return await do_swap_page(m, vmf)
    if pte_protnone(orig) and vmf.vma.flags & (VM_READ | VM_WRITE | VM_EXEC):
        from kmm import memory_numa  # vma_is_accessible: a NUMA hinting fault
        return await memory_numa.do_numa_page(m, vmf)
    res = await pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is None:
        return 0
    vmf.pte_tbl, vmf.ptl = res
    entry = await atomic.entry_read(m, "pte", vmf.pte_tbl, vmf.pte_idx)
    if entry != orig:
        await vmf.ptl.unlock()
        return 0
    if vmf.write:
        if not pte_write(entry):
            return await memory_wp.do_wp_page(m, vmf)  # drops the ptl
        entry = pte_mkdirty(entry)
    entry = pte_mkyoung(entry)
    if entry != orig:
        await atomic.entry_set(m, "pte", vmf.pte_tbl, vmf.pte_idx, entry)  # ptep_set_access_flags
    await vmf.ptl.unlock()
    return 0


async def do_pte_missing(m, vmf: Vmf) -> int:
    """do_pte_missing: an anonymous VMA's fault, or a file VMA's (memory_file.do_fault)."""
    if vmf.vma.vm_file is None:
        return await do_anonymous_page(m, vmf)
    from kmm import memory_file
    return await memory_file.do_fault(m, vmf)


async def do_anonymous_page(m, vmf: Vmf) -> int:
    """do_anonymous_page: a read maps the shared zero page, a write a new zeroed page.

    Context: mmap_lock held for read; takes and drops the PTE lock.
    """
    vma = vmf.vma
    mm = vma.mm
    if vma.flags & VM_SHARED:
        m.bug("shared anonymous mappings are not modelled")
    if pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
        if not await __pte_alloc(m, mm, vmf.pmd_tbl, vmf.pmd_idx):
            return VM_FAULT_OOM
    idx = pte_index(vmf.address)
    if not vmf.write:
        entry = pte_mkspecial(pfn_pte(m.zero_pfn, vma.page_prot))
        res = await pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
        if res is None:
            return 0
        tbl, ptl = res
        if not pte_none(await atomic.entry_read(m, "pte", tbl, idx)):
            await ptl.unlock()
            return 0
        await atomic.entry_set(m, "pte", tbl, idx, entry)
        await ptl.unlock()
        return 0
    if not await rmap.anon_vma_prepare(m, vma):
        return VM_FAULT_OOM
    folio = await memory_anon.alloc_anon_folio(m, vmf)  # an mTHP or one page, zeroed
    if folio is memory_anon.EAGAIN:
        return 0
    if folio is None:
        return VM_FAULT_OOM
    nr = folio.nr_pages
    addr = vmf.address & ~(nr * PAGE_SIZE - 1)
    idx = pte_index(addr)
    entry = pfn_pte(folio.pfn, vma.page_prot)
    if vma.flags & VM_WRITE:
        entry = pte_mkwrite(pte_mkdirty(entry))
    res = await pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is None:
        await swap.folio_put(m, folio)
        return 0
    tbl, ptl = res
    if nr == 1:
        changed = not pte_none(await atomic.entry_read(m, "pte", tbl, idx))
    elif m.bugs and "mthp_no_pte_range_recheck" in m.bugs:  # kmm.bugs
        changed = False
    else:
        changed = not await memory_anon.pte_range_none(m, tbl, idx, nr)
    if changed:
        await ptl.unlock()
        await swap.folio_put(m, folio)  # a racing fault mapped (part of) the range first
        return 0
    if nr > 1:
        await atomic.folio_ref_add(m, folio, nr - 1)  # one reference per PTE mapping
    mm.rss_anon += nr
    huge_memory_mthp.count_mthp_stat(m, folio.order, "anon_fault_alloc")
    await rmap.folio_add_new_anon_rmap(m, folio, vma, addr, pmd=False)
    await swap.folio_add_lru(m, folio)  # folio_add_lru_vma
    if nr == 1:
        await atomic.entry_set(m, "pte", tbl, idx, entry)
    else:
        await atomic.set_ptes(m, tbl, idx, entry, nr)
    await ptl.unlock()
    return 0


# ---------------------------------------------------------------- fork
async def copy_page_range(m, dst_vma: VmArea, src_vma: VmArea) -> bool:
    """copy_page_range: the child's page tables for one VMA; private writable pages
    become read-only in both (COW). False when out of memory.

    Context: both mmap_locks held for write.
    """
    if src_vma.flags & VM_HUGETLB:
        return await hugetlb_fault.copy_hugetlb_page_range(m, dst_vma, src_vma)
    src_mm, dst_mm = src_vma.mm, dst_vma.mm
    addr = src_vma.start
    while addr < src_vma.end:
        nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), src_vma.end)
        src_pmd = pmd_lookup(m, src_mm, addr)
        if src_pmd < 0:
            addr = min((addr + PUD_SIZE) & ~(PUD_SIZE - 1), src_vma.end)
            continue
        idx = pmd_index(addr)
        pmdval = await atomic.entry_read(m, "pmd", src_pmd, idx)
        if pmd_none(pmdval):
            addr = nxt
            continue
        dst_pmd = await pmd_alloc(m, dst_mm, addr)
        if dst_pmd < 0:
            return False
        if is_swap_pmd(pmdval) or pmd_trans_huge(pmdval):
            r = await huge_memory.copy_huge_pmd(m, dst_vma, src_vma, dst_pmd, src_pmd,
                                                idx, addr)
            if r == -1:
                return False
            if r == 0:
                addr = nxt
                continue
            # -EAGAIN: the PMD was split meanwhile; copy its PTEs
        if not await copy_pte_range(m, dst_vma, src_vma, dst_pmd, src_pmd, idx, addr, nxt):
            return False
        addr = nxt
    return True


async def copy_pte_range(m, dst_vma: VmArea, src_vma: VmArea, dst_pmd: int, src_pmd: int,
                         idx: int, addr: int, end: int) -> bool:
    dst_mm = dst_vma.mm
    if pmd_none(await atomic.entry_read(m, "pmd", dst_pmd, idx)):
        if not await __pte_alloc(m, dst_mm, dst_pmd, idx):
            return False
    dres = await pte_offset_map_lock(m, dst_pmd, idx)
    if dres is None:
        return False
    dtbl, dptl = dres
    sres = await pte_offset_map_lock(m, src_pmd, idx, subclass=1)  # spin_lock_nested
    if sres is None:
        await dptl.unlock()
        return True
    stbl, sptl = sres
    a = addr
    while a < end:
        i = pte_index(a)
        ent = await atomic.entry_read(m, "pte", stbl, i)
        if ent:
            if pte_present(ent):
                ent = await copy_present_pte(m, dst_mm, src_vma, stbl, i, ent)
            else:
                ent = await copy_nonpresent_pte(m, dst_mm, src_vma.mm, ent, stbl, i)
            # the child's table: its mm never ran, and we hold its lock (points.md)
            atomic.entry_set_unwalked(m, "pte", dtbl, i, ent)
        a += PAGE_SIZE
    await sptl.unlock()
    await dptl.unlock()
    return True


async def copy_present_pte(m, dst_mm: MmStruct, src_vma: VmArea, stbl: int, i: int,
                           ent: int) -> int:
    """copy_present_pte: share the page, write-protecting both PTEs of a COW mapping."""
    pfn = pte_pfn(ent)
    if not pte_special(ent):
        folio = m.physmem.folio(pfn)
        await atomic.folio_ref_add(m, folio, 1)
        if folio.mapping is not None:  # a private file mapping's page-cache page
            await rmap.folio_dup_file_rmap_ptes(m, folio, pfn, 1)
            dst_mm.rss_shmem += 1
        else:
            await rmap.folio_try_dup_anon_rmap_ptes(m, folio, pfn, 1)
            dst_mm.rss_anon += 1
    if pte_write(ent):  # is_cow_mapping: both sides must fault to write
        ent = pte_wrprotect(ent)
        await atomic.entry_set(m, "pte", stbl, i, ent)
    return pte_mkold(ent)  # __copy_present_ptes: the child's copy starts old


# ---------------------------------------------------- non-present PTEs
async def do_swap_page(m, vmf: Vmf) -> int:
    """do_swap_page: a migration entry waits for the split or move to finish (then the
    CPU refaults); a swap entry is read back in as an order-0 page (6.18 never swaps
    in at PMD order). A synchronous device skips the swap cache when this PTE is the
    slot's only reference; otherwise the folio comes through the swap cache, where the
    slot's other page tables find it. The page is mapped writable when it is certainly
    exclusive (a fresh page, or the swap PTE's exclusive bit) or only we hold it; a
    write fault on a shared one goes on to do_wp_page.

    Context: mmap_lock held for read; takes the folio lock, then the PTE lock.
    """
    orig = vmf.orig_pte
    if is_migration_entry(orig):
        await migrate.migration_entry_wait(m, vmf)
        return 0
    if m.swap_info is None or not swapfile.is_swap_entry(m, orig):
        m.bug(f"do_swap_page: non-present PTE {orig:#x} is no swap entry")
    vma = vmf.vma
    mm = vma.mm
    entry = swapfile.pte_to_swp_entry(orig)
    folio = swapcache = await swap_state.swap_cache_get_folio(m, entry)
    direct = False
    if folio is None:
        if (m.swap_info.flags & swapfile.SWP_SYNCHRONOUS_IO
                and swapfile.__swap_count(m, entry) == 1):
            # skip the swap cache; an mTHP when its block was swapped out whole
            res, entry = await memory_swapin.swapin_direct(m, vmf, entry)
            if isinstance(res, int):  # another fault is swapping it in: relax, refault
                await m.sched.sleep(swap_state.JIFFY_NS)
                return 0
            folio, direct = res, res is not None
        else:
            folio = swapcache = await swap_state.swapin_readahead(m, entry)
        if folio is None:  # VM_FAULT_OOM unless someone else faulted it in meanwhile
            res = await pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
            if res is None:
                return 0
            tbl, ptl = res
            same = await atomic.entry_read(m, "pte", tbl, vmf.pte_idx) == orig
            await ptl.unlock()
            return VM_FAULT_OOM if same else 0
        m.vmstat.count_vm_event("pgmajfault")  # had to read it: a major fault
    lk = m.folio_lock_of(folio)
    await lk.lock("do_swap_page")  # folio_lock_or_retry
    res = None
    # how many PTEs the folio maps at once: a large folio read in directly, or a large
    # swap-cache folio whose PTEs are all still its swap entries (memory_swapin)
    nr, pte_idx = memory_swapin.folio_span(vmf, folio, entry, direct)
    if swapcache is None or swap_state.folio_matches_swap_entry(folio, entry):
        res = await pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
        if res is not None:
            same = await atomic.entry_read(m, "pte", res[0], vmf.pte_idx) == orig
            if same and nr > 1:
                first = memory_swapin.pte_move_swp_offset(orig, pte_idx - vmf.pte_idx)
                if await memory_swapin.swap_pte_batch(m, res[0], pte_idx, nr, first) != nr:
                    if direct:
                        same = False  # the block changed since it was read: refault
                    else:
                        nr, pte_idx = 1, vmf.pte_idx  # check_folio: this page alone
            if not same:
                await res[1].unlock()  # out_nomap: another fault mapped it first
                res = None
    if res is None:
        await lk.unlock()
        await swap.folio_put(m, folio)
        if direct:
            await swapfile.swapcache_clear(m, entry, folio.nr_pages)
        return 0
    tbl, ptl = res
    # exclusive: certainly for a page the swap cache never saw; else the swap PTE's
    # bit says so. Fork cannot clear the bit in the parent's PTE here (copy_pte_range
    # does not pass it), so the bit is trusted only while nothing else can reach the
    # data: no other swap PTE (count 1) and no mapping of the cached folio.
    exclusive = bool(orig & _PAGE_SWP_EXCLUSIVE)
    if folio is not swapcache:
        exclusive = True
    elif exclusive and (swapfile.__swap_count(m, entry) != 1 or rmap.folio_mapped(folio)):
        exclusive = False
    # the page (or the folio's first) and its slot, before the swap cache may let go
    pfn, slot = folio.pfn, entry
    if nr > 1 and swapcache is not None:
        slot = folio.swap
    elif nr == 1 and swapcache is not None and folio.order:
        pfn += swp_offset(entry) - swp_offset(folio.swap)
    await swapfile.swap_free_nr(m, slot, nr)
    if swap_state.should_try_to_free_swap(m, folio, vma, vmf.write):
        await swapfile.folio_free_swap(m, folio)
    mm.rss_anon += nr
    mm.swapents -= nr
    pte = pfn_pte(pfn, vma.page_prot)
    if orig & _PAGE_SWP_SOFT_DIRTY:
        pte |= _PAGE_SOFT_DIRTY
    write_done = False
    if exclusive or folio.refcount == 1:  # our reference is the only one
        if vma.flags & VM_WRITE:
            pte = pte_mkwrite(pte)
            if vmf.write:
                pte = pte_mkdirty(pte)
                write_done = True
        exclusive = True
    # the reference we hold becomes the mapping's (one per PTE for a large folio)
    if nr > 1:
        await atomic.folio_ref_add(m, folio, nr - 1)
    if folio.anon_vma is None:
        address = vmf.address & ~(nr * PAGE_SIZE - 1)
        await rmap.folio_add_new_anon_rmap(m, folio, vma, address, pmd=False)
        if not exclusive:  # __folio_set_anon: a shared folio takes the oldest anon_vma
            atomic.folio_set_field_locked(folio, "anon_vma", vma.anon_vma.root)
            atomic.folio_clear_flags_locked(folio, PG_anon_exclusive)
    else:
        await rmap.folio_add_anon_rmap_ptes(m, folio, pfn, nr, exclusive)
    if nr == 1:
        await atomic.entry_set(m, "pte", tbl, vmf.pte_idx, pte)
    else:
        await atomic.set_ptes(m, tbl, pte_idx, pte, nr)
    await lk.unlock()
    ret = 0
    if vmf.write and not write_done:
        vmf.orig_pte, vmf.pte_tbl, vmf.ptl = pte, tbl, ptl
        ret = await memory_wp.do_wp_page(m, vmf)  # drops the PTE lock
    else:
        await ptl.unlock()
    if direct:  # the slots' claim goes only after the PTE lock (need_clear_cache)
        await swapfile.swapcache_clear(m, entry, folio.nr_pages)
    return ret


async def copy_nonpresent_pte(m, dst_mm: MmStruct, src_mm: MmStruct, entry: int,
                              stbl: int, i: int) -> int:
    """copy_nonpresent_pte: the child gets the same migration entry; a swap entry is
    shared (swap_duplicate: one more reference on the slot), and the child's copy is no
    longer exclusive. Context: both PTE locks held."""
    if is_migration_entry(entry):
        dst_mm.rss_anon += 1
        return entry
    if not swapfile.is_swap_entry(m, entry):
        m.bug(f"fork of unknown non-present PTE {entry:#x}")
    if await swapfile.swap_duplicate(m, swapfile.pte_to_swp_entry(entry)) < 0:
        m.bug(f"fork: swap entry {entry:#x} has no slot")
    dst_mm.swapents += 1
    if entry & _PAGE_SWP_EXCLUSIVE:  # "mark the swap entry as shared" in the parent too
        await atomic.entry_set(m, "pte", stbl, i, entry & ~_PAGE_SWP_EXCLUSIVE)
    return entry & ~(_PAGE_SWP_EXCLUSIVE | _PAGE_SWP_UFFD_WP)
