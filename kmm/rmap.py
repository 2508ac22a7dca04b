"""Reverse mapping of anonymous folios: anon_vma chains and mapcounts.

mm/rmap.c. ``anon_vma_prepare`` gives a VMA its anon_vma on the first fault;
``anon_vma_fork`` links a child's VMA to every anon_vma of the parent's (the chains an
rmap walk follows after fork). The folio_add/remove_rmap family keeps the per-page
mapcount, the entire (PMD) mapcount and the large mapcount of a folio, and notices when
an anonymous large folio becomes partially mapped, queueing it for deferred split.
Each mapcount change is a preemption point.
"""

from __future__ import annotations

from kmm import huge_memory
from kmm.mm_types import PG_anon_exclusive, AnonVma, Page, VmArea


async def anon_vma_prepare(m, vma: VmArea) -> bool:
    """anon_vma_prepare: make sure the VMA has an anon_vma (False: out of memory).

    Context: mmap_lock held; takes the anon_vma rwsem and mm->page_table_lock.
    """
    if vma.anon_vma is not None:
        return True
    av = AnonVma(m.new_anon_vma_id(), None, None)
    av.rwsem = m.locks.rwsem("anon_vma", f"anon_vma:{av.id}")
    await av.rwsem.down_write("__anon_vma_prepare")
    await vma.mm.page_table_lock.lock("__anon_vma_prepare")
    if vma.anon_vma is None:
        vma.anon_vma = av
        vma.avc.append(av)
        av.vmas.append(vma)
    await vma.mm.page_table_lock.unlock()
    await av.rwsem.up_write()
    return True


def anon_vma_clone(dst: VmArea, src: VmArea) -> None:
    """anon_vma_clone: dst (a split-off part of src) joins every chain src is on."""
    for av in src.avc:
        dst.avc.append(av)
        av.vmas.append(dst)
    dst.anon_vma = src.anon_vma


def anon_vma_fork(m, child: VmArea, parent: VmArea) -> None:
    """anon_vma_fork: the child's VMA joins the parent's chains and gets its own anon_vma."""
    if parent.anon_vma is None:
        return
    anon_vma_clone(child, parent)
    av = AnonVma(m.new_anon_vma_id(), parent.anon_vma.root, None)
    av.parent = parent.anon_vma
    child.anon_vma = av
    child.avc.append(av)
    av.vmas.append(child)


def unlink_anon_vmas(vma: VmArea) -> None:
    """unlink_anon_vmas: the VMA leaves every chain (it is being unmapped)."""
    for av in vma.avc:
        av.vmas.remove(vma)
    vma.avc = []


def folio_mapcount(folio: Page) -> int:
    return folio.large_mapcount if folio.order else folio.mapcount


def folio_mapped(folio: Page) -> bool:
    return folio_mapcount(folio) > 0


def page_anon_exclusive(page: Page) -> bool:
    return bool(page.flags & PG_anon_exclusive)


async def folio_add_new_anon_rmap(m, folio: Page, vma: VmArea, addr: int,
                                  pmd: bool) -> None:
    """folio_add_new_anon_rmap(..., RMAP_EXCLUSIVE): first mapping of a new folio."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=folio.pfn, how="new_anon_pmd" if pmd else "new_anon")
    folio.anon_vma = vma.anon_vma
    folio.index = vma.linear_page_index(addr)
    folio.flags |= PG_anon_exclusive
    if pmd:
        folio.entire_mapcount = 1
        folio.large_mapcount = 1
        m.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", 1)
        m.vmstat.mod_node_page_state("nr_anon_pages", folio.nr_pages)
    else:
        folio.mapcount = 1
        m.vmstat.mod_node_page_state("nr_anon_pages", 1)


async def folio_add_anon_rmap_ptes(m, folio: Page, pfn: int, nr: int,
                                   exclusive: bool) -> None:
    """folio_add_anon_rmap_ptes: nr PTE mappings of pages pfn.. of an existing folio."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=pfn, nr=nr, how="add_ptes")
    pm = m.physmem
    if not folio.order:
        folio.mapcount += 1
        if exclusive:
            folio.flags |= PG_anon_exclusive
        return
    newly = 0
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount += 1
        if page.mapcount == 1:
            newly += 1
        if exclusive:
            page.flags |= PG_anon_exclusive
    folio.large_mapcount += nr
    folio.nr_pages_mapped += newly
    if newly and not folio.entire_mapcount:  # __folio_add_rmap: NR_ANON_MAPPED
        m.vmstat.mod_node_page_state("nr_anon_pages", newly)


async def folio_remove_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_remove_rmap_ptes: nr PTE mappings gone; queue a partially mapped THP."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=pfn, nr=-nr, how="remove_ptes")
    pm = m.physmem
    if not folio.order:
        folio.mapcount -= 1
        if folio.mapcount < 0:
            m.bug(f"mapcount underflow {folio!r}")
        if folio.mapcount == 0:
            folio.flags &= ~PG_anon_exclusive
            m.vmstat.mod_node_page_state("nr_anon_pages", -1)
        return
    unmapped = 0
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount -= 1
        if page.mapcount < 0:
            m.bug(f"mapcount underflow {page!r}")
        if page.mapcount == 0:
            unmapped += 1
            page.flags &= ~PG_anon_exclusive
    folio.large_mapcount -= nr
    folio.nr_pages_mapped -= unmapped
    if unmapped and not folio.entire_mapcount:  # __folio_remove_rmap: NR_ANON_MAPPED
        m.vmstat.mod_node_page_state("nr_anon_pages", -unmapped)
    # __folio_remove_rmap: pages became unmapped while others stay PTE-mapped, and no
    # PMD mapping covers the whole folio any more
    if unmapped and folio.nr_pages_mapped and not folio.entire_mapcount:
        await huge_memory.deferred_split_folio(m, folio, True)


async def folio_add_anon_rmap_pmd(m, folio: Page, exclusive: bool) -> None:
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=folio.pfn, how="add_pmd")
    folio.entire_mapcount += 1
    folio.large_mapcount += 1
    if exclusive:
        folio.flags |= PG_anon_exclusive


async def folio_remove_rmap_pmd(m, folio: Page) -> None:
    """folio_remove_rmap_pmd: one PMD mapping gone (zap, split)."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=folio.pfn, how="remove_pmd")
    folio.entire_mapcount -= 1
    folio.large_mapcount -= 1
    if folio.entire_mapcount < 0:
        m.bug(f"entire mapcount underflow {folio!r}")
    if folio.entire_mapcount == 0:
        m.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", -1)
        # the pages no PTE keeps mapped are unmapped now (NR_ANON_MAPPED)
        m.vmstat.mod_node_page_state("nr_anon_pages",
                                     folio.nr_pages_mapped - folio.nr_pages)
        if not folio.nr_pages_mapped:
            folio.flags &= ~PG_anon_exclusive
        elif folio.nr_pages_mapped < folio.nr_pages:
            # the last PMD mapping went while only some pages stay PTE-mapped
            await huge_memory.deferred_split_folio(m, folio, True)


async def folio_try_dup_anon_rmap_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """folio_try_dup_anon_rmap_ptes (fork): the pages become shared; never fails here
    (no pins are modelled), so exclusivity is simply cleared."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=pfn, nr=nr, how="dup_ptes")
    pm = m.physmem
    if not folio.order:
        folio.mapcount += 1
        folio.flags &= ~PG_anon_exclusive
        return
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount += 1
        page.flags &= ~PG_anon_exclusive
    folio.large_mapcount += nr


async def folio_try_dup_anon_rmap_pmd(m, folio: Page) -> None:
    """folio_try_dup_anon_rmap_pmd (fork of a PMD-mapped THP)."""
    if m.sched.fast:
        m.sched.tick(1)
    else:
        await m.sched.point("mapcount", pfn=folio.pfn, how="dup_pmd")
    folio.entire_mapcount += 1
    folio.large_mapcount += 1
    folio.flags &= ~PG_anon_exclusive
    for p in range(folio.pfn + 1, folio.pfn + folio.nr_pages):
        pg = m.physmem.pages.get(p)
        if pg is not None:
            pg.flags &= ~PG_anon_exclusive


def folio_mapping_mms(m, folio: Page) -> set[int]:
    """The mms whose page tables map any page of the folio, found by an rmap walk.

    Stands in for 6.18's mm-id tracking (folio_maybe_mapped_shared): exact, at the cost
    of a walk, which only the rare paths that ask (COW reuse of a large folio) pay.
    """
    mms: set[int] = set()
    av = folio.anon_vma
    if av is None:
        return mms
    first, last = folio.index, folio.index + folio.nr_pages
    for vma in av.vmas:
        lo = max(vma.start, vma.address_of(first))
        hi = min(vma.end, vma.address_of(last))
        if lo >= hi or vma.mm.id in mms:
            continue
        if any(lo <= a < hi for a in huge_memory.mapped_addresses(m, vma.mm, folio, lo, hi)):
            mms.add(vma.mm.id)
    return mms


def folio_maybe_mapped_shared(m, folio: Page) -> bool:
    """folio_maybe_mapped_shared: is any part of the folio mapped by more than one mm?"""
    if not folio.order:
        return folio.mapcount > 1
    return len(folio_mapping_mms(m, folio)) > 1
