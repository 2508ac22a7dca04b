"""Anonymous PMD-sized THPs: fault, COW, fork copy, zap and PMD split. mm/huge_memory.c.

Faults: ``do_huge_pmd_anonymous_page`` maps the huge zero folio on a read (when
``use_zero_page``) or a new zeroed order-9 folio on a write, preallocating the PTE table
it deposits under the PMD lock; a racing fault that installed anything first makes it
back out. A write to a read-only huge PMD (``do_huge_pmd_wp_page``) reuses an exclusive
THP, replaces a huge zero PMD by a new THP (6.18, ``do_huge_zero_wp_pmd``), and
otherwise splits the PMD so that ``do_wp_page`` copies one 4 KiB page (the 5.8+ COW).

``__split_huge_pmd_locked`` turns one huge PMD into the withdrawn deposited table full
of 512 PTEs carrying the PMD's bits (or migration entries, with ``freeze``); the folio
stays large. Splitting the folio itself (``__folio_split``), the deferred split queue
and its shrinker, and debugfs ``split_huge_pages_pid`` are in kmm/huge_memory_split.py.
Shmem THPs are mapped by memory_file.py (``do_set_pmd``) and NUMA hinting faults are
in numa_balancing.py. Left out: DAX, PUD THPs, userfaultfd.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory_mthp, huge_memory_split, mmdebug, page_alloc, pgtable_generic as pgg,
    rmap, swap,
)
from kmm.mm_types import (
    PG_anon_exclusive, PG_dirty, PG_referenced, VM_HUGEPAGE, VM_HUGETLB, VM_WRITE,
)
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE,
    is_pmd_migration_entry, is_swap_pmd, is_writable_migration_entry,
    make_migration_entry, migration_entry_pfn, mk_table_entry, pfn_pmd, pfn_pte,
    pmd_dirty, pmd_mkdirty, pmd_mkold, pmd_mkwrite, pmd_mkyoung, pmd_modify, pmd_none,
    pmd_pfn, pmd_present, pmd_protnone, pmd_special, pmd_trans_huge, pmd_write, pmd_wrprotect,
    pmd_young, pte_mkdirty, pte_mkold, pte_mkspecial, pte_mkwrite, swp_offset,
    SWP_MIG_DIRTY, SWP_MIG_YOUNG, SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, swp_entry,
    swp_type,
    _PAGE_SPECIAL,
)
from kmm.cost import COST_CLEAR_HUGE



# ------------------------------------------------------------ eligibility
def thp_vma_allowable_order(m, vma, tva: str) -> bool:
    """thp_vma_allowable_order(vma, vm_flags, tva, PMD_ORDER) for an anonymous VMA.

    tva is "smaps", "pagefault", "khugepaged" or "forced_collapse" (enum tva_type).
    The PMD size's own knob (hugepages-2048kB/enabled, "inherit" by default: then the
    global ``enabled`` decides) says whether PMD THPs may be made. A shmem VMA follows
    shmem's policy (shmem.shmem_thp_vma_allowable).
    """
    if vma.vm_file is not None:
        from kmm import shmem
        return shmem.shmem_thp_vma_allowable(m, vma, tva)
    if vma.flags & VM_HUGETLB:  # hugetlb VMAs are never THP-eligible
        return False
    return bool(huge_memory_mthp.thp_vma_allowable_orders(m, vma, tva, 1 << HPAGE_PMD_ORDER))


def thp_vma_suitable_order(vma, addr: int) -> bool:
    haddr = addr & HPAGE_PMD_MASK
    return vma.start <= haddr and haddr + HPAGE_PMD_SIZE <= vma.end


def vma_thp_gfp_mask(m, vma) -> int:
    """vma_thp_gfp_mask: how hard a THP fault may try, by the ``defrag`` knob.

    always: stall in direct reclaim and compaction (not madvised: __GFP_NORETRY, give up
    early); defer: wake kswapd/kcompactd and fail at once; defer+madvise: stall when
    madvised, else wake them; madvise: stall when madvised, else nothing; never: nothing.
    """
    from kmm import gfp
    madvised = vma is not None and bool(vma.flags & VM_HUGEPAGE)
    defrag = m.sysfs.defrag
    if defrag == "always":
        return gfp.GFP_TRANSHUGE | (0 if madvised else gfp.__GFP_NORETRY)
    if defrag == "defer":
        return gfp.GFP_TRANSHUGE_LIGHT | gfp.__GFP_KSWAPD_RECLAIM
    if defrag == "defer+madvise":
        return gfp.GFP_TRANSHUGE_LIGHT | (gfp.__GFP_DIRECT_RECLAIM if madvised
                                          else gfp.__GFP_KSWAPD_RECLAIM)
    if defrag == "madvise":
        return gfp.GFP_TRANSHUGE_LIGHT | (gfp.__GFP_DIRECT_RECLAIM if madvised else 0)
    return gfp.GFP_TRANSHUGE_LIGHT


def is_huge_zero_pmd(m, pmd: int) -> bool:
    return pmd_trans_huge(pmd) and m.is_huge_zero_pfn(pmd_pfn(pmd))


# --------------------------------------------------------- huge zero folio
async def mm_get_huge_zero_folio(m, mm) -> int:
    """mm_get_huge_zero_folio: the huge zero folio, allocated on first use; each mm
    holds one reference (MMF_HUGE_ZERO_FOLIO). Returns its pfn, or -1."""
    if mm.huge_zero_ref:
        return m.huge_zero_pfn
    if m.huge_zero_refcount == 0:
        pfn = await page_alloc.alloc_pages(m, HPAGE_PMD_ORDER, "GFP_TRANSHUGE", "zero")
        if pfn < 0:
            m.vmstat.count_vm_event("thp_zero_page_alloc_failed")
            return -1
        m.vmstat.count_vm_event("thp_zero_page_alloc")
        atomic.init_page(m.physmem.page(pfn), page_type="zero")  # the allocator's fresh folio
        m.huge_zero_pfn = pfn
        m.huge_zero_refcount = 1  # the global reference the shrinker drops
    m.huge_zero_refcount += 1
    mm.huge_zero_ref = True
    return m.huge_zero_pfn


def mm_put_huge_zero_folio(m, mm) -> None:
    if mm.huge_zero_ref:
        mm.huge_zero_ref = False
        m.huge_zero_refcount -= 1


# ------------------------------------------------------------------ fault
async def create_huge_pmd(m, vmf) -> int:
    """create_huge_pmd: anonymous VMA -> do_huge_pmd_anonymous_page."""
    return await do_huge_pmd_anonymous_page(m, vmf)


async def do_huge_pmd_anonymous_page(m, vmf) -> int:
    """do_huge_pmd_anonymous_page: map a whole 2 MiB at a none PMD, or fall back.

    Context: mmap_lock held for read; takes the PMD lock to install.
    """
    from kmm import khugepaged, memory
    vma = vmf.vma
    mm = vma.mm
    haddr = vmf.address & HPAGE_PMD_MASK
    if not thp_vma_suitable_order(vma, haddr):
        return memory.VM_FAULT_FALLBACK
    if not await rmap.anon_vma_prepare(m, vma):
        return memory.VM_FAULT_OOM
    khugepaged.khugepaged_enter_vma(m, vma)
    if not vmf.write and m.sysfs.use_zero_page:
        pgtable = await m.pte_alloc_one(mm, "pte")
        if pgtable < 0:
            return memory.VM_FAULT_OOM
        zero = await mm_get_huge_zero_folio(m, mm)
        if zero < 0:
            await m.pte_free(mm, pgtable)
            m.vmstat.count_vm_event("thp_fault_fallback")
            return memory.VM_FAULT_FALLBACK
        ptl = m.table_lock(vmf.pmd_tbl)
        await ptl.lock("do_huge_pmd_anonymous_page")
        done = False
        if pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
            await set_huge_zero_folio(m, pgtable, mm, vma, haddr, vmf.pmd_tbl,
                                      vmf.pmd_idx, zero)
            done = True
        await ptl.unlock()
        if not done:
            await m.pte_free(mm, pgtable)
        return 0
    return await __do_huge_pmd_anonymous_page(m, vmf, haddr)


async def set_huge_zero_folio(m, pgtable: int, mm, vma, haddr: int, pmd_tbl: int,
                              idx: int, zero_pfn: int) -> None:
    """set_huge_zero_folio: a read-only special PMD of the huge zero folio, with a
    deposited table. Context: PMD lock held."""
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "set_huge_zero_folio")
    entry = pfn_pmd(zero_pfn, vma.page_prot) | _PAGE_SPECIAL
    await pgg.pgtable_trans_huge_deposit(m, mm, pmd_tbl, pgtable)
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, entry)
    mm.nr_ptes += 1


async def vma_alloc_anon_folio_pmd(m, vma, haddr: int) -> int:
    """vma_alloc_anon_folio_pmd: an order-9 folio, zeroed; thp_fault_fallback on failure."""
    pfn = await page_alloc.vma_alloc_folio(m, vma_thp_gfp_mask(m, vma), HPAGE_PMD_ORDER,
                                           vma, haddr)
    if pfn < 0:
        m.vmstat.count_vm_event("thp_fault_fallback")
        huge_memory_mthp.count_mthp_stat(m, HPAGE_PMD_ORDER, "anon_fault_fallback")
        return -1
    atomic.step_owned(m, "folio_zero_user", COST_CLEAR_HUGE, pfn)
    return pfn


async def map_anon_folio_pmd_nopf(m, pfn: int, pmd_tbl: int, idx: int, vma,
                                  haddr: int) -> None:
    """map_anon_folio_pmd_nopf: install the PMD (dirty, writable if VM_WRITE), add the
    rmap and the LRU, queue the folio for the underused shrinker; no fault counters
    (collapse uses it). Context: PMD lock held."""
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "map_anon_folio_pmd_nopf")
    folio = m.physmem.page(pfn)
    entry = pmd_mkdirty(pfn_pmd(pfn, vma.page_prot))
    if vma.flags & VM_WRITE:
        entry = pmd_mkwrite(entry)
    await rmap.folio_add_new_anon_rmap(m, folio, vma, haddr, pmd=True)
    await swap.folio_add_lru(m, folio)  # folio_add_lru_vma
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, entry)
    await huge_memory_split.deferred_split_folio(m, folio, False)


async def map_anon_folio_pmd(m, pfn: int, pmd_tbl: int, idx: int, vma, haddr: int) -> None:
    """map_anon_folio_pmd (map_anon_folio_pmd_pf): the _nopf mapping, then
    MM_ANONPAGES and thp_fault_alloc. Context: PMD lock held."""
    await map_anon_folio_pmd_nopf(m, pfn, pmd_tbl, idx, vma, haddr)
    vma.mm.rss_anon += HPAGE_PMD_NR
    m.vmstat.count_vm_event("thp_fault_alloc")
    huge_memory_mthp.count_mthp_stat(m, HPAGE_PMD_ORDER, "anon_fault_alloc")


async def __do_huge_pmd_anonymous_page(m, vmf, haddr: int) -> int:
    from kmm import memory
    vma = vmf.vma
    mm = vma.mm
    pfn = await vma_alloc_anon_folio_pmd(m, vma, haddr)
    if pfn < 0:
        return memory.VM_FAULT_FALLBACK
    folio = m.physmem.page(pfn)
    bugs = m.bugs
    deposit = not bugs or "huge_fault_no_deposit" not in bugs  # kmm.bugs
    pgtable = await m.pte_alloc_one(mm, "pte") if deposit else 0
    if pgtable < 0:
        await swap.folio_put(m, folio)
        return memory.VM_FAULT_OOM
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("__do_huge_pmd_anonymous_page")
    if (not pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx))
            and (not bugs or "huge_fault_no_pmd_none_recheck" not in bugs)):
        # a racing fault installed a PTE table or a THP first: refault onto it
        await ptl.unlock()
        if deposit:
            await m.pte_free(mm, pgtable)
        await swap.folio_put(m, folio)
        return 0
    if deposit:
        await pgg.pgtable_trans_huge_deposit(m, mm, vmf.pmd_tbl, pgtable)
    await map_anon_folio_pmd(m, pfn, vmf.pmd_tbl, vmf.pmd_idx, vma, haddr)
    if deposit:
        mm.nr_ptes += 1
    await ptl.unlock()
    return 0


async def huge_pmd_set_accessed(m, vmf) -> None:
    """huge_pmd_set_accessed: young, and dirty only for a write (CVE-2017-1000405)."""
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("huge_pmd_set_accessed")
    cur = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
    if cur == vmf.orig_pmd:
        entry = pmd_mkyoung(cur)
        if vmf.write:
            entry = pmd_mkdirty(entry)
        if entry != cur:
            await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
    await ptl.unlock()


async def pmd_migration_entry_wait(m, vmf) -> None:
    """pmd_migration_entry_wait: sleep until the folio under migration is unlocked."""
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("pmd_migration_entry_wait")
    cur = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
    await ptl.unlock()
    if is_pmd_migration_entry(cur):
        folio = m.physmem.folio(migration_entry_pfn(cur))
        await migration_entry_wait_on_locked(m, folio)


async def migration_entry_wait_on_locked(m, folio) -> None:
    """Wait for the folio lock to be released, without taking it."""
    lk = m.folio_lock_of(folio)
    if lk.owner is not None:
        me = m.sched.current
        m.unref_waiters.add(me)  # no reference taken: the migration holds one
        try:
            await lk.lock("migration_entry_wait_on_locked")
            await lk.unlock()
        finally:
            m.unref_waiters.discard(me)
    else:  # nothing to sleep on: the fault returns and refaults at once (a spin)
        m.sched.yield_spin("migration_entry_wait")


# --------------------------------------------------------------------- COW
async def wp_huge_pmd(m, vmf) -> int:
    """wp_huge_pmd: anonymous VMA -> do_huge_pmd_wp_page; a file PMD (COW or a
    write-protected shared one) is split, i.e. zapped, and handled at the PTE level."""
    if vmf.vma.vm_file is not None:
        from kmm import memory
        await __split_huge_pmd(m, vmf.vma, vmf.pmd_tbl, vmf.pmd_idx, vmf.address,
                               freeze=False)
        return memory.VM_FAULT_FALLBACK
    return await do_huge_pmd_wp_page(m, vmf)


async def do_huge_pmd_wp_page(m, vmf) -> int:
    """do_huge_pmd_wp_page: reuse an exclusive THP in place; otherwise split the PMD
    and let do_wp_page copy 4 KiB (VM_FAULT_FALLBACK). Context: mmap_lock read."""
    from kmm import memory
    vma = vmf.vma
    orig = vmf.orig_pmd
    haddr = vmf.address & HPAGE_PMD_MASK
    if is_huge_zero_pmd(m, orig):
        ret = await do_huge_zero_wp_pmd(m, vmf, haddr)
        if not ret & memory.VM_FAULT_FALLBACK:
            return ret
        await __split_huge_pmd(m, vma, vmf.pmd_tbl, vmf.pmd_idx, vmf.address, freeze=False)
        return memory.VM_FAULT_FALLBACK
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("do_huge_pmd_wp_page")
    recheck = not m.bugs or "huge_wp_no_pmd_same_recheck" not in m.bugs  # kmm.bugs
    if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != orig and recheck:
        await ptl.unlock()
        return 0
    folio = m.physmem.page(pmd_pfn(orig))
    reuse = bool(folio.flags & PG_anon_exclusive)
    if not reuse:
        lk = m.folio_lock_of(folio)
        if not await lk.trylock("do_huge_pmd_wp_page"):
            await atomic.folio_ref_add(m, folio, 1)
            await ptl.unlock()
            await lk.lock("do_huge_pmd_wp_page")
            await ptl.lock("do_huge_pmd_wp_page")
            if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != orig and recheck:
                await ptl.unlock()
                await lk.unlock()
                await swap.folio_put(m, folio)
                return 0
            await swap.folio_put(m, folio)
        if folio.flags & PG_anon_exclusive:
            reuse = True
        elif folio.refcount == 1:
            atomic.folio_set_field_locked(folio, "anon_vma", vma.anon_vma)  # folio_move_anon_rmap
            atomic.folio_set_flags_locked(folio, PG_anon_exclusive)
            reuse = True
        await lk.unlock()
    if reuse:
        entry = pmd_mkyoung(orig)
        entry = pmd_mkdirty(entry)
        if vma.flags & VM_WRITE:
            entry = pmd_mkwrite(entry)
        if entry != orig:
            # pmdp_set_access_flags
            await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
        await ptl.unlock()
        return 0
    await ptl.unlock()
    await __split_huge_pmd(m, vma, vmf.pmd_tbl, vmf.pmd_idx, vmf.address, freeze=False)
    return memory.VM_FAULT_FALLBACK


async def do_huge_zero_wp_pmd(m, vmf, haddr: int) -> int:
    """do_huge_zero_wp_pmd (6.13+): a write to the huge zero PMD gets a new THP; the
    table deposited for the zero PMD stays deposited."""
    from kmm import memory
    vma = vmf.vma
    pfn = await vma_alloc_anon_folio_pmd(m, vma, haddr)
    if pfn < 0:
        return memory.VM_FAULT_FALLBACK
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("do_huge_zero_wp_pmd")
    if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != vmf.orig_pmd:
        await ptl.unlock()
        await swap.folio_put(m, m.physmem.page(pfn))
        return 0
    await pgg.pmdp_huge_clear_flush(m, vma, haddr, vmf.pmd_tbl, vmf.pmd_idx)
    await map_anon_folio_pmd(m, pfn, vmf.pmd_tbl, vmf.pmd_idx, vma, haddr)
    await ptl.unlock()
    return 0


# -------------------------------------------------------------------- fork
async def copy_huge_pmd(m, dst_vma, src_vma, dst_pmd: int, src_pmd: int, idx: int,
                        addr: int) -> int:
    """copy_huge_pmd: share the THP (or huge zero folio) with the child, both PMDs
    write-protected, a fresh table deposited for the child. Returns 0 when copied,
    1 (-EAGAIN) when the PMD is no longer huge, -1 when out of memory.

    Context: both mmap_locks held; dst PMD lock, then src PMD lock nested.
    """
    if dst_vma.vm_file is not None:
        return 0  # a file PMD is not copied: the child refaults it
    dst_mm = dst_vma.mm
    pgtable = await m.pte_alloc_one(dst_mm, "pte")
    if pgtable < 0:
        return -1
    dst_ptl = m.table_lock(dst_pmd)
    src_ptl = m.table_lock(src_pmd)
    await dst_ptl.lock("copy_huge_pmd")
    await src_ptl.lock("copy_huge_pmd", subclass=1)  # SINGLE_DEPTH_NESTING
    pmd = await atomic.entry_read(m, "pmd", src_pmd, idx)
    ret = 1
    if is_swap_pmd(pmd):
        if is_pmd_migration_entry(pmd):
            if swp_type(pmd) != SWP_MIGRATION_READ:  # !is_readable_migration_entry
                # make_readable_migration_entry: both sides must fault to write, and a
                # readable-exclusive entry is shared now too
                pmd = swp_entry(SWP_MIGRATION_READ, swp_offset(pmd))
                await atomic.entry_set(m, "pmd", src_pmd, idx, pmd)
            dst_mm.rss_anon += HPAGE_PMD_NR
            dst_mm.nr_ptes += 1
            await pgg.pgtable_trans_huge_deposit(m, dst_mm, dst_pmd, pgtable)
            await atomic.entry_set(m, "pmd", dst_pmd, idx, pmd)
            ret = 0
    elif not pmd_trans_huge(pmd):
        await src_ptl.unlock()
        await dst_ptl.unlock()
        await m.pte_free(dst_mm, pgtable)
        return 1
    else:
        if is_huge_zero_pmd(m, pmd):
            await mm_get_huge_zero_folio(m, dst_mm)
        else:
            folio = m.physmem.page(pmd_pfn(pmd))
            await atomic.folio_ref_add(m, folio, 1)
            await rmap.folio_try_dup_anon_rmap_pmd(m, folio)
            dst_mm.rss_anon += HPAGE_PMD_NR
        dst_mm.nr_ptes += 1
        await pgg.pgtable_trans_huge_deposit(m, dst_mm, dst_pmd, pgtable)
        if pmd_write(pmd):
            pmd = pmd_wrprotect(pmd)
            await atomic.entry_set(m, "pmd", src_pmd, idx, pmd)  # pmdp_set_wrprotect
        await atomic.entry_set(m, "pmd", dst_pmd, idx, pmd_mkold(pmd))
        ret = 0
    await src_ptl.unlock()
    await dst_ptl.unlock()
    return ret


# --------------------------------------------------------------------- zap
async def zap_huge_pmd(m, tlbg, vma, pmd_tbl: int, idx: int, addr: int) -> bool:
    """zap_huge_pmd: clear a whole huge PMD, free its deposited table, drop the rmap;
    the folio's reference goes after the TLB flush. False if it is no longer huge."""
    mm = vma.mm
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("zap_huge_pmd")  # __pmd_trans_huge_lock
    cur = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if not (is_swap_pmd(cur) or pmd_trans_huge(cur)) and (
            not m.bugs or "zap_huge_pmd_no_recheck" not in m.bugs):  # kmm.bugs
        await ptl.unlock()
        return False
    orig = await atomic.entry_get_and_clear(m, "pmd", pmd_tbl, idx)
    tlbg.track(addr, addr + HPAGE_PMD_SIZE)
    if vma.vm_file is not None and not is_swap_pmd(orig):
        # a file PMD: nothing deposited (x86), MM_SHMEMPAGES
        folio = m.physmem.page(pmd_pfn(orig))
        await rmap.folio_remove_rmap_pmd(m, folio)
        if pmd_dirty(orig):
            atomic.folio_set_flags_locked(folio, PG_dirty)  # PMD lock held
        vma.mm.rss_shmem -= HPAGE_PMD_NR
        tlbg.folios.append((folio, 1))
        await ptl.unlock()
        return True
    if (not m.bugs or "huge_fault_no_deposit" not in m.bugs
            or m.physmem.pages[pmd_tbl].pt_deposit):
        table = await pgg.pgtable_trans_huge_withdraw(m, mm, pmd_tbl)  # zap_deposited_table
        mm.nr_ptes -= 1
        tlbg.tables.append(table)
    if not is_huge_zero_pmd(m, orig):
        if pmd_present(orig):
            folio = m.physmem.page(pmd_pfn(orig))
            await rmap.folio_remove_rmap_pmd(m, folio)
            if pmd_dirty(orig):
                atomic.folio_set_flags_locked(folio, PG_dirty)
            tlbg.folios.append((folio, 1))
        mm.rss_anon -= HPAGE_PMD_NR
    await ptl.unlock()
    return True


# ------------------------------------------------------------- PMD split
async def __split_huge_pmd(m, vma, pmd_tbl: int, idx: int, address: int,
                           freeze: bool) -> None:
    """__split_huge_pmd: take the PMD lock and split if the PMD is still huge."""
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("__split_huge_pmd")
    await split_huge_pmd_locked(m, vma, address & HPAGE_PMD_MASK, pmd_tbl, idx, freeze)
    await ptl.unlock()


async def split_huge_pmd_locked(m, vma, haddr: int, pmd_tbl: int, idx: int,
                                freeze: bool) -> None:
    pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if pmd_trans_huge(pmd) or is_pmd_migration_entry(pmd):
        await __split_huge_pmd_locked(m, vma, pmd_tbl, idx, haddr, freeze)


async def __split_huge_pmd_locked(m, vma, pmd_tbl: int, idx: int, haddr: int,
                           freeze: bool) -> None:
    """__split_huge_pmd_locked: one huge PMD becomes 512 PTEs mapping the same pages
    (or 512 migration entries with ``freeze``). Context: PMD lock held throughout.

    (Named without the leading underscores: Python would mangle them in callers.)
    """
    mm = vma.mm
    mmdebug.lockdep_assert_held(m, mmdebug.pmd_lockptr(m, pmd_tbl), "__split_huge_pmd_locked")
    m.vmstat.count_vm_event("thp_split_pmd")
    pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    if vma.vm_file is not None and pmd_trans_huge(pmd):
        # a file PMD is not split into PTEs: it is zapped, and faults map it again
        old = await pgg.pmdp_huge_clear_flush(m, vma, haddr, pmd_tbl, idx)
        folio = m.physmem.page(pmd_pfn(old))
        if pmd_dirty(old):
            atomic.folio_set_flags_locked(folio, PG_dirty)  # PMD lock held
        if pmd_young(old):
            atomic.folio_set_flags_locked(folio, PG_referenced)
        await rmap.folio_remove_rmap_pmd(m, folio)
        await swap.folio_put(m, folio)
        mm.rss_shmem -= HPAGE_PMD_NR
        return
    if is_huge_zero_pmd(m, pmd):
        await __split_huge_zero_page_pmd(m, vma, haddr, pmd_tbl, idx)
        return
    migration = is_pmd_migration_entry(pmd)
    if migration:
        old = pmd
        pfn = migration_entry_pfn(old)
        write = is_writable_migration_entry(old)
        exclusive = write or swp_type(old) == SWP_MIGRATION_READ_EXCLUSIVE
        off = swp_offset(old)
        young, dirty = bool(off & SWP_MIG_YOUNG), bool(off & SWP_MIG_DIRTY)
        folio = m.physmem.page(pfn)
    else:
        old = await pgg.pmdp_invalidate(m, vma, haddr, pmd_tbl, idx)
        pfn = pmd_pfn(old)
        folio = m.physmem.page(pfn)
        dirty = pmd_dirty(old)
        if dirty:
            atomic.folio_set_flags_locked(folio, PG_dirty)
        write, young = pmd_write(old), pmd_young(old)
        exclusive = bool(folio.flags & PG_anon_exclusive)
        if freeze and exclusive:
            # folio_try_share_anon_rmap_pmd (no pins)
            atomic.folio_clear_flags_locked(folio, PG_anon_exclusive)
        if not freeze:
            await atomic.folio_ref_add(m, folio, HPAGE_PMD_NR - 1)
            await rmap.folio_add_anon_rmap_ptes(m, folio, pfn, HPAGE_PMD_NR, exclusive)
    if (m.bugs and "huge_fault_no_deposit" in m.bugs
            and not m.physmem.pages[pmd_tbl].pt_deposit):
        # kmm.bugs: nothing was deposited, so the split must allocate, under the PMD lock
        pgtable = await m.pte_alloc_one(mm, "pte")
        mm.nr_ptes += 1
    else:
        pgtable = await pgg.pgtable_trans_huge_withdraw(m, mm, pmd_tbl)
    table = m.physmem.tables[pgtable]
    if any(table):
        m.bug(f"split: withdrawn table {pgtable:#x} is not empty")
    if freeze or migration:
        entries = [make_migration_entry(pfn + i, write, exclusive, young, dirty)
                   for i in range(HPAGE_PMD_NR)]
    else:
        entry = pfn_pte(pfn, vma.page_prot)
        if write:
            entry = pte_mkwrite(entry)
        if not young:
            entry = pte_mkold(entry)
        if dirty:
            entry = pte_mkdirty(entry)
        entries = [entry + (i << 12) for i in range(HPAGE_PMD_NR)]  # consecutive pfns
    atomic.set_ptes_table(m, pgtable, entries, pmd_tbl)
    if not migration:
        await rmap.folio_remove_rmap_pmd(m, folio)
    if freeze:
        await swap.folio_put(m, folio)
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, mk_table_entry(pgtable))  # pmd_populate


async def __split_huge_zero_page_pmd(m, vma, haddr: int, pmd_tbl: int, idx: int) -> None:
    """__split_huge_zero_page_pmd: 512 special PTEs of the 4K zero page."""
    await pgg.pmdp_huge_clear_flush(m, vma, haddr, pmd_tbl, idx)
    pgtable = await pgg.pgtable_trans_huge_withdraw(m, vma.mm, pmd_tbl)
    entry = pte_mkspecial(pfn_pte(m.zero_pfn, vma.page_prot))
    atomic.set_ptes_table(m, pgtable, [entry] * HPAGE_PMD_NR, pmd_tbl)
    await atomic.entry_set(m, "pmd", pmd_tbl, idx, mk_table_entry(pgtable))


async def split_huge_pmd_address(m, vma, address: int, freeze: bool) -> None:
    """split_huge_pmd_address: split the huge PMD mapping address, if there is one."""
    from kmm import memory
    pmd_tbl = memory.pmd_lookup(m, vma.mm, address)
    if pmd_tbl >= 0:
        idx = (address >> 21) & 511
        pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if pmd_trans_huge(pmd) or is_pmd_migration_entry(pmd):
            await __split_huge_pmd(m, vma, pmd_tbl, idx, address, freeze)


async def vma_adjust_trans_huge(m, vma, start: int, end: int, nxt) -> None:
    """vma_adjust_trans_huge: a VMA boundary moving to an unaligned address inside a
    possible THP splits the PMD that straddles it."""
    for v, a in ((vma, start), (vma, end), (nxt, end)):
        if v is None or not a & ~HPAGE_PMD_MASK:
            continue
        lo, hi = a & HPAGE_PMD_MASK, (a & HPAGE_PMD_MASK) + HPAGE_PMD_SIZE
        if v.start <= lo and hi <= v.end:
            await split_huge_pmd_address(m, v, a, False)


# -------------------------------------------------------------- mprotect
async def change_huge_pmd(m, vma, pmd_tbl: int, idx: int, addr: int, newprot: int,
                          try_writable: bool, prot_numa: bool = False) -> int:
    """change_huge_pmd: new protection for a whole huge PMD (invalidate, then set, so
    lockless readers never see it none): HPAGE_PMD_NR when it changed, 1 when handled
    unchanged (a PMD migration entry loses write; MM_CP_PROT_NUMA skips the huge zero
    PMD, a PROT_NONE one and a folio kmm.huge_memory_migrate.prot_numa_skip names), 0
    if it is no longer huge."""
    from kmm import huge_memory_migrate as hmm
    ptl = m.table_lock(pmd_tbl)
    await ptl.lock("change_huge_pmd")
    cur = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
    ret = 1
    if is_pmd_migration_entry(cur):
        new = hmm.pmd_migration_readable(cur, vma.vm_file is None)
        if new != cur:
            await atomic.entry_set(m, "pmd", pmd_tbl, idx, new)
    elif not pmd_trans_huge(cur):
        ret = 0
    elif not prot_numa or not (is_huge_zero_pmd(m, cur) or pmd_protnone(cur) or
                               hmm.prot_numa_skip(m, vma, m.physmem.page(pmd_pfn(cur)))):
        old = await pgg.pmdp_invalidate(m, vma, addr, pmd_tbl, idx)  # pmdp_invalidate_ad
        entry = pmd_modify(old, newprot)
        if try_writable and not pmd_write(entry) and not pmd_special(entry):
            folio = m.physmem.page(pmd_pfn(entry))
            if folio.flags & PG_anon_exclusive:  # can_change_pmd_writable
                entry = pmd_mkwrite(entry)
        await atomic.entry_set(m, "pmd", pmd_tbl, idx, entry)
        ret = HPAGE_PMD_NR
    await ptl.unlock()
    return ret
