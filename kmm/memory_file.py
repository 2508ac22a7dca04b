"""Faults on file (shmem) VMAs: mm/memory.c's do_fault family.

``do_fault`` picks by access and mapping: a read maps the page-cache page
(``do_read_fault``), a write to a private mapping copies it into a new anonymous page
(``do_cow_fault``), a write to a shared mapping maps the page-cache page writable and
dirty (``do_shared_fault``). The folio comes from the filesystem's fault handler
(``shmem.shmem_fault``) locked and with a reference; ``finish_fault`` maps it under
the folio lock, so truncation (which takes the folio lock) never races a mapping in:

- on a none PMD, a PMD-size folio is mapped whole by ``do_set_pmd`` (``thp_file_mapped``;
  x86 deposits no page table for a file PMD);
- otherwise PTEs: a shmem VMA maps the whole large folio at once when it lies inside the
  VMA and the PTE table and every PTE is none, else the one page.

A read fault first maps the page-cache pages already there in the 64 KiB window around
the address, clamped to the VMA and the PTE table (``do_fault_around`` ->
``filemap_map_pages``; a PMD-size folio is mapped by PMD there), and calls ->fault only
when the faulting page was not among them (recorded: shmem_read_fault_around).

Left out: page_mkwrite and write-notify (shmem has none), userfaultfd, the mmap_miss
readahead heuristics.
"""

from __future__ import annotations

from kmm import atomic, memory, page_alloc, rmap, shmem, swap
from kmm.cost import COST_COPY_PAGE
from kmm.mm_types import PG_uptodate, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_SHARED, VM_WRITE, Page
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE,
    pfn_pmd, pfn_pte, pmd_mkdirty, pmd_mkwrite, pmd_none, pmd_trans_huge, pte_index,
    pte_mkdirty,
    pte_mkwrite, pte_none,
)

def _fault_errno(err: str) -> int:
    return memory.VM_FAULT_OOM if err == "ENOMEM" else memory.VM_FAULT_SIGBUS


async def do_fault(m, vmf) -> int:
    """do_fault: a missing PTE in a file VMA. Context: mmap_lock held for read."""
    if not vmf.write:
        return await do_read_fault(m, vmf)
    if not vmf.vma.flags & VM_SHARED:
        return await do_cow_fault(m, vmf)
    return await do_shared_fault(m, vmf)


async def __do_fault(m, vmf) -> Page | int:
    """__do_fault: the folio from ->fault, locked with a reference, or VM_FAULT_*."""
    folio = await shmem.shmem_fault(m, vmf)
    if isinstance(folio, str):
        return _fault_errno(folio)
    return folio


FAULT_AROUND_PAGES = 16  # fault_around_bytes (64 KiB) >> PAGE_SHIFT


async def do_read_fault(m, vmf) -> int:
    """do_read_fault: map what the page cache already holds around the address
    (do_fault_around); only if that did not map the faulting page, ->fault."""
    ret = await do_fault_around(m, vmf)
    if ret:
        return ret
    folio = await __do_fault(m, vmf)
    if isinstance(folio, int):
        return folio
    ret = await finish_fault(m, vmf, folio, None)
    await m.folio_lock_of(folio).unlock()
    if ret:
        await swap.folio_put(m, folio)  # not mapped: the fault's reference goes
    return ret


async def do_shared_fault(m, vmf) -> int:
    """do_shared_fault: map the page-cache page writable; the folio is dirtied
    (fault_dirty_shared_page)."""
    folio = await __do_fault(m, vmf)
    if isinstance(folio, int):
        return folio
    ret = await finish_fault(m, vmf, folio, None)
    if not ret:
        from kmm.mm_types import PG_dirty
        atomic.folio_set_flags_locked(folio, PG_dirty)  # folio_mark_dirty, folio locked
    await m.folio_lock_of(folio).unlock()
    if ret:
        await swap.folio_put(m, folio)
    return ret


async def do_cow_fault(m, vmf) -> int:
    """do_cow_fault: copy the page-cache page into a new anonymous page and map that
    (a private mapping's write never reaches the file)."""
    vma = vmf.vma
    if not await rmap.anon_vma_prepare(m, vma):
        return memory.VM_FAULT_OOM
    pfn = await page_alloc.vma_alloc_folio(m, "GFP_HIGHUSER_MOVABLE", 0, vma, vmf.address)
    if pfn < 0:
        return memory.VM_FAULT_OOM
    cow = m.physmem.page(pfn)
    folio = await __do_fault(m, vmf)
    if isinstance(folio, int):
        await swap.folio_put(m, cow)
        return folio
    src = folio.pfn + vma.linear_page_index(vmf.address) - folio.index
    await m.sched.point("copy_page", COST_COPY_PAGE, dst=pfn, src=src)
    m.physmem.copy(pfn, src)
    ret = await finish_fault(m, vmf, folio, cow)
    await m.folio_lock_of(folio).unlock()
    await swap.folio_put(m, folio)  # the page-cache folio was only read
    if ret:
        await swap.folio_put(m, cow)
    return ret


async def do_fault_around(m, vmf) -> int:
    """do_fault_around: the window of FAULT_AROUND_PAGES PTEs holding the address,
    clamped to the VMA, handed to filemap_map_pages. 0: go on to ->fault."""
    vma = vmf.vma
    pte_off = pte_index(vmf.address)
    vma_off = vma.linear_page_index(vmf.address) - vma.pgoff
    vma_pages = (vma.end - vma.start) >> PAGE_SHIFT
    from_pte = max(pte_off // FAULT_AROUND_PAGES * FAULT_AROUND_PAGES,
                   pte_off - min(pte_off, vma_off))
    to_pte = min(from_pte + FAULT_AROUND_PAGES, 512, pte_off + vma_pages - vma_off) - 1
    pgoff = vma.linear_page_index(vmf.address)
    return await filemap_map_pages(m, vmf, pgoff + from_pte - pte_off, pgoff + to_pte - pte_off)


async def filemap_map_pages(m, vmf, start: int, end: int) -> int:
    """filemap_map_pages: map the uptodate, unlocked page-cache folios of file pages
    [start, end] whose PTEs are none (a PMD-size folio by PMD when the PMD is none).
    VM_FAULT_NOPAGE when the faulting page got mapped. Context: mmap_lock read."""
    from kmm import filemap
    vma = vmf.vma
    inode = vma.vm_file
    mapping = inode.mapping
    end = min(end, (inode.i_size + PAGE_SIZE - 1 >> PAGE_SHIFT) - 1)
    target = vma.linear_page_index(vmf.address)
    ret = 0
    tbl = ptl = None
    for folio in filemap.folios_in_range(m, mapping, start, end + 1):
        if not await filemap.folio_try_get(m, folio):  # next_uptodate_folio
            continue
        lk = m.folio_lock_of(folio)
        if not await lk.trylock("filemap_map_pages"):
            await swap.folio_put(m, folio)
            continue
        if folio.mapping is not mapping or not folio.flags & PG_uptodate:
            await lk.unlock()  # truncated before we locked it (the recheck under the lock)
            await swap.folio_put(m, folio)
            continue
        if tbl is None:
            pmdval = await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)
            if pmd_trans_huge(pmdval):  # filemap_map_pmd: mapped by a PMD already
                await lk.unlock()
                await swap.folio_put(m, folio)
                return memory.VM_FAULT_NOPAGE
            if pmd_none(pmdval) and folio.order == HPAGE_PMD_ORDER:
                if not await do_set_pmd(m, vmf, folio):
                    await lk.unlock()  # the reference became the PMD mapping's
                    return memory.VM_FAULT_NOPAGE
            if pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
                if not await memory.__pte_alloc(m, vma.mm, vmf.pmd_tbl, vmf.pmd_idx):
                    await lk.unlock()
                    await swap.folio_put(m, folio)
                    return memory.VM_FAULT_OOM
            res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
            if res is None:
                await lk.unlock()
                await swap.folio_put(m, folio)
                return 0
            tbl, ptl = res
        lo = max(start, folio.index)
        hi = min(end, folio.index + folio.nr_pages - 1)
        for idx in range(lo, hi + 1):  # filemap_map_folio_range / _order0_folio
            i = pte_index(vma.address_of(idx))
            if not pte_none(await atomic.entry_read(m, "pte", tbl, i)):
                continue
            pfn = folio.pfn + idx - folio.index
            atomic.folio_ref_add_locked(folio, 1)  # folio_ref_inc: the PTE's reference
            await rmap.folio_add_file_rmap_ptes(m, folio, pfn, 1)
            await atomic.entry_set(m, "pte", tbl, i, pfn_pte(pfn, vma.page_prot))
            vma.mm.rss_shmem += 1
            if idx == target:
                ret = memory.VM_FAULT_NOPAGE
        await lk.unlock()
        await swap.folio_put(m, folio)
    if ptl is not None:
        await ptl.unlock()
    return ret


async def finish_fault(m, vmf, folio: Page, cow: Page | None) -> int:
    """finish_fault: map the folio (or the COW copy) at the fault. Returns 0 when
    mapped (the fault's reference became the mapping's), else VM_FAULT_* (nothing
    mapped; the caller drops its reference). Context: folio locked."""
    vma = vmf.vma
    mm = vma.mm
    if pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
        if cow is None and folio.order == HPAGE_PMD_ORDER:
            ret = await do_set_pmd(m, vmf, folio)
            if ret != memory.VM_FAULT_FALLBACK:
                return ret
        if pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
            if not await memory.__pte_alloc(m, mm, vmf.pmd_tbl, vmf.pmd_idx):
                return memory.VM_FAULT_OOM
    index = vma.linear_page_index(vmf.address)
    addr = vmf.address
    nr = 1
    first = folio.pfn + index - folio.index
    if cow is None and folio.order and shmem.vma_is_shmem(vma):
        idx = index - folio.index                        # the page within the folio
        vma_off = index - vma.pgoff                      # the page within the VMA
        pte_off = pte_index(vmf.address)
        vma_pages = (vma.end - vma.start) >> PAGE_SHIFT
        if not (vma_off < idx or vma_off + folio.nr_pages - idx > vma_pages
                or pte_off < idx or pte_off + folio.nr_pages - idx > 512):
            nr = folio.nr_pages
            addr = vmf.address - idx * PAGE_SIZE
            first = folio.pfn
    res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is None:
        return memory.VM_FAULT_NOPAGE
    tbl, ptl = res
    i0 = pte_index(addr)
    busy = [i for i in range(i0, i0 + nr)
            if not pte_none(await atomic.entry_read(m, "pte", tbl, i))]
    if busy and nr > 1:  # some PTE in the range is set: map just the faulting page
        nr, addr, first = 1, vmf.address, folio.pfn + index - folio.index
        i0 = pte_index(vmf.address)
        busy = [] if pte_none(await atomic.entry_read(m, "pte", tbl, i0)) else [i0]
    if busy:
        await ptl.unlock()
        return memory.VM_FAULT_NOPAGE  # another fault mapped it first
    await set_pte_range(m, vmf, folio, cow, first, nr, tbl, i0)
    await ptl.unlock()
    return 0


async def set_pte_range(m, vmf, folio: Page, cow: Page | None, first: int, nr: int,
                        tbl: int, i0: int) -> None:
    """set_pte_range: nr PTEs from pfn ``first`` (young; a write makes them dirty and
    writable where the VMA allows), with their rmap and Rss counter. Context: PTE lock
    held; the fault's reference becomes the first PTE's, the rest are added here."""
    vma = vmf.vma
    mm = vma.mm
    target = cow if cow is not None else folio
    if cow is not None:
        first = cow.pfn
    if nr > 1:
        await atomic.folio_ref_add(m, target, nr - 1)
    if cow is not None:
        await rmap.folio_add_new_anon_rmap(m, cow, vma, vmf.address, pmd=False)
        await swap.folio_add_lru(m, cow)  # folio_add_lru_vma
        mm.rss_anon += 1
    else:
        await rmap.folio_add_file_rmap_ptes(m, folio, first, nr)
        mm.rss_shmem += nr
    for j in range(nr):
        entry = pfn_pte(first + j, vma.page_prot)
        if vmf.write:
            entry = pte_mkdirty(entry)
            if vma.flags & VM_WRITE:
                entry = pte_mkwrite(entry)
        await atomic.entry_set(m, "pte", tbl, i0 + j, entry)


async def do_set_pmd(m, vmf, folio: Page) -> int:
    """do_set_pmd: map a PMD-size page-cache folio by one PMD (no deposit: x86 needs
    none for a file PMD); VM_FAULT_FALLBACK when the VMA cannot hold it or THPs are
    off for it. Context: folio locked; takes the PMD lock."""
    vma = vmf.vma
    haddr = vmf.address & HPAGE_PMD_MASK
    # vma_thp_disabled(..., forced_collapse=true): only MADV_NOHUGEPAGE refuses
    if vma.flags & VM_NOHUGEPAGE and not vma.flags & VM_HUGEPAGE:
        return memory.VM_FAULT_FALLBACK
    if not shmem.thp_vma_suitable_order(vma, haddr, HPAGE_PMD_ORDER):
        return memory.VM_FAULT_FALLBACK
    if folio.order != HPAGE_PMD_ORDER:
        return memory.VM_FAULT_FALLBACK
    ptl = m.table_lock(vmf.pmd_tbl)
    await ptl.lock("do_set_pmd")
    if not pmd_none(await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx)):
        await ptl.unlock()
        return memory.VM_FAULT_NOPAGE
    entry = pfn_pmd(folio.pfn, vma.page_prot)
    if vmf.write:
        entry = pmd_mkdirty(entry)
        if vma.flags & VM_WRITE:
            entry = pmd_mkwrite(entry)
    vma.mm.rss_shmem += HPAGE_PMD_NR
    await rmap.folio_add_file_rmap_pmd(m, folio)
    await atomic.entry_set(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx, entry)
    m.vmstat.count_vm_event("thp_file_mapped")
    await ptl.unlock()
    return 0


def file_rss_dec(mm, folio: Page, nr: int) -> None:
    """add_mm_counter(mm, mm_counter(folio), -nr): MM_SHMEMPAGES for a page-cache
    folio, MM_ANONPAGES otherwise."""
    if folio.mapping is not None:
        mm.rss_shmem -= nr
    else:
        mm.rss_anon -= nr


assert HPAGE_PMD_SIZE == HPAGE_PMD_NR * PAGE_SIZE
