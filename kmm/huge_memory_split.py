"""Splitting an anonymous large folio: mm/huge_memory.c's folio split side.

``__folio_split`` (uniform, to order 0) freezes the folio's mappings into migration
entries (``try_to_migrate``), freezes its refcount (failing with -EAGAIN if anyone
else holds a reference, ``can_split_folio``), rewrites every page as an order-0 folio
(``__split_unmapped_folio``), then puts the mappings back (``remap_page``) and frees
the unused tails. The deferred split queue (``deferred_split_folio``) and its
shrinker (``deferred_split_scan``, ``thp_underused``) and the debugfs
``split_huge_pages_pid`` live here too. The PMD side (faults, COW, copy, zap and the
PMD split) stays in kmm/huge_memory.py; page-cache folios split in kmm/truncate.py.
"""

from __future__ import annotations

from errno import EAGAIN, EBUSY, EINVAL  # the host is Linux: the kernel's numbers

from kmm import atomic, huge_memory_mthp, mmdebug, rmap, swap
from kmm.mm_types import (
    PG_active, PG_dirty, PG_isolated, PG_partially_mapped, PG_referenced,
    PG_swapbacked, PG_swapcache, PG_uptodate, PG_writeback, VM_HUGETLB,
)
from kmm.pgtable import (
    HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE, pmd_pfn, pmd_present, pte_pfn,
    pte_present, pte_special, swp_entry, swp_offset, swp_type,
)


# ---------------------------------------------------------- deferred split
async def deferred_split_folio(m, folio, partially_mapped: bool) -> None:
    """deferred_split_folio: queue a large folio for the deferred-split shrinker.

    A partially mapped folio is flagged and counted (thp_deferred_split_page) the
    first time; every new THP is queued unflagged when shrink_underused is on.
    """
    if folio.order <= 1:
        return
    if not partially_mapped and not m.sysfs["shrink_underused"]:
        return
    if folio.flags & PG_swapcache:
        return  # reclaim is already handling it (it is being swapped out)
    await m.split_queue_lock.lock("deferred_split_folio")
    if partially_mapped and not atomic.folio_test_set_flags_locked(folio, PG_partially_mapped):
        if folio.order == HPAGE_PMD_ORDER:
            m.vmstat.count_vm_event("thp_deferred_split_page")
        huge_memory_mthp.count_mthp_stat(m, folio.order, "split_deferred")
        huge_memory_mthp.mod_mthp_stat(m, folio.order, "nr_anon_partially_mapped", 1)
    atomic.ds_queue_add_locked(m, folio)
    await m.split_queue_lock.unlock()


def mapped_addresses(m, mm, folio, lo: int, hi: int):
    """Addresses in [lo, hi) of mm whose PTE or PMD maps a page of the folio (no
    points: the caller holds what keeps the tables alive)."""
    from kmm import pagewalk
    first, last = folio.pfn, folio.pfn + folio.nr_pages
    for addr, level, entry in pagewalk.walk_leaves(m, mm, lo, hi):
        pfn = pmd_pfn(entry) if level == "pmd" else (entry >> 12) & ((1 << 40) - 1)
        if first <= pfn < last:
            yield addr


# -------------------------------------------------------- folio split


def can_split_folio(m, folio, caller_pins: int) -> bool:
    """can_split_folio: no one but the mappings, the swap cache and the caller holds a
    reference (a GUP pin or a racing lookup would make the split fail with -EAGAIN)."""
    extra = folio.nr_pages if folio.flags & PG_swapcache else 0
    return rmap.folio_mapcount(folio) == folio.refcount - extra - caller_pins


async def split_folio_to_list(m, folio, lst: list | None = None) -> int:
    """split_folio_to_list: split_huge_page_to_list_to_order(folio, lst, 0)."""
    return await split_huge_page_to_list_to_order(m, folio, lst, 0)


async def split_huge_page_to_list_to_order(m, folio, lst: list | None,
                                           new_order: int) -> int:
    """split_huge_page_to_list_to_order: __folio_split, uniform, to order 0 (the only
    target order kmm models)."""
    return await __folio_split(m, folio, lst, new_order)


async def __folio_split(m, folio, lst: list | None, new_order: int) -> int:
    """__folio_split (uniform, to order 0): the large folio becomes independent order-0
    folios; its mappings are frozen into migration entries meanwhile, so no CPU sees a
    half-split folio. Returns 0, or -EAGAIN (extra references), -EBUSY, -EINVAL;
    ``thp_split_page`` or ``thp_split_page_failed`` for a PMD-order folio past the
    argument checks.

    Unused pages are freed; with ``lst`` (reclaim) the new folios go on it, each with
    a reference, instead of on the LRU. Context: caller holds the folio lock and a
    reference; takes the anon_vma rwsem (write), split_queue_lock and the lru lock.
    """
    mmdebug.VM_BUG_ON_FOLIO(m, not mmdebug.folio_test_locked(folio), folio,
                          "__folio_split: !folio_test_locked(folio)")
    if folio.mapping is not None:  # a page-cache folio (truncate.py)
        from kmm import truncate
        return await truncate.split_file_folio(m, folio, new_order)
    if new_order != 0 or new_order >= folio.order:
        return -EINVAL
    if m.is_huge_zero_pfn(folio.pfn) or folio.flags & PG_writeback:
        return -EBUSY
    order = folio.order
    pmd_order = order == HPAGE_PMD_ORDER
    anon_vma = folio.anon_vma
    if anon_vma is None:  # folio_get_anon_vma failed
        ret = -EBUSY
    else:
        rwsem = anon_vma.root.rwsem
        await rwsem.down_write("__folio_split")
        ret = await _folio_split_locked(m, folio, lst)
        await rwsem.up_write()
    if pmd_order:
        m.vmstat.count_vm_event("thp_split_page" if ret == 0 else "thp_split_page_failed")
    huge_memory_mthp.count_mthp_stat(m, order, "split" if ret == 0 else "split_failed")
    await m.sched.point("mm_split_huge_page", pfn=folio.pfn, ret=ret)
    return ret


async def _folio_split_locked(m, folio, lst: list | None) -> int:
    """The body of __folio_split under anon_vma_lock_write: can_split_folio, unmap,
    freeze, split, remap, free."""
    from kmm import migrate, swap
    if not can_split_folio(m, folio, 1):
        return -EAGAIN
    await rmap.try_to_migrate(m, folio, split_pmd=folio.order >= HPAGE_PMD_ORDER)
    extra = folio.nr_pages if folio.flags & PG_swapcache else 0
    await m.split_queue_lock.lock("__folio_split")
    frozen = folio.refcount == 1 + extra and not rmap.folio_mapped(folio)
    if m.bugs and "split_no_ref_freeze" in m.bugs:  # kmm.bugs: extra references ignored
        frozen = not rmap.folio_mapped(folio)
    if frozen:  # folio_ref_freeze
        atomic.folio_ref_freeze_locked(folio)
        if folio.on_deferred_list:
            atomic.ds_queue_del_locked(m, folio)
        huge_memory_mthp.folio_clear_partially_mapped(m, folio)
        # __split_unmapped_folio: one anon folio of the old order less (order 0 is not
        # counted); counted at the freeze, the point after which the split cannot fail
        huge_memory_mthp.mod_mthp_stat(m, folio.order, "nr_anon", -1)
    await m.split_queue_lock.unlock()
    if not frozen:
        await migrate.remove_migration_ptes(m, folio, folio)
        return -EAGAIN
    head = folio.pfn
    nr = folio.nr_pages
    pm = m.physmem
    lk = m.lruvec.lru_lock
    await lk.lock("__folio_split")
    lru_order = swap.lruvec_del_folio_for_split(m, folio)
    keep = folio.flags & (PG_dirty | PG_swapbacked | PG_active | PG_referenced
                          | PG_swapcache | PG_uptodate | PG_isolated)
    new = []
    me = m.sched.current
    for p in range(head, head + nr):  # __split_folio_to_order
        if p != head:
            # the new folios keep PG_locked until remap_page is done: a fault that finds
            # one of their migration entries sleeps on it (migration_entry_wait)
            m.folio_lock_of(pm.page(p)).set_locked_by(me)
        # the folio is frozen (refcount 0) and unmapped: the splitter owns every page
        page = atomic.init_page(
            pm.page(p), head=p, order=0,
            flags=keep,  # PG_anon_exclusive lives in the migration entries
            anon_vma=folio.anon_vma, index=folio.index + (p - head),
            entire_mapcount=0, large_mapcount=0, nr_pages_mapped=0, on_deferred_list=False,
            refcount=1 + (1 if keep & PG_swapcache else 0))
        if keep & PG_swapcache:
            atomic.init_page(page, swap=swp_entry(swp_type(folio.swap),
                                                  swp_offset(folio.swap) + p - head))
        new.append(page)
    if lru_order is not None:  # the tails follow the head on its list
        swap.lru_add_split_folio(m, lru_order, head, new)
    elif lst is not None:  # reclaim's isolated folio: the tails join its list
        for page in new[1:]:
            atomic.folio_ref_add_locked(page)
            lst.append(page)
    else:  # isolated without a list: the tails go on the LRU by themselves
        for page in new[1:]:
            atomic.folio_clear_flags_locked(page, PG_isolated)
            swap.lruvec_add_folio(m, page)
    await lk.unlock()
    if keep & PG_swapcache:
        from kmm import swap_state
        await swap_state.split_swap_cache(m, new)
    await m.sched.point("__split_unmapped_folio", pfn=head, nr=nr)
    await migrate.remove_migration_ptes(m, _Span(head, nr, folio.anon_vma, folio.index),
                                        folio, use_zero_page=True)
    await _unlock_split_tails(m, new[1:])
    for page in new[1:]:  # free_folio_and_swap_cache: unused tails go now
        if page.flags & PG_swapcache and not page.mapcount:
            from kmm import swap_state
            await swap_state.free_swap_cache(m, page)
        await swap.folio_put(m, page)
    return 0


async def _unlock_split_tails(m, tails) -> None:
    """__folio_split's last loop: every after-split folio but the one the caller locked
    (the head) is unlocked once remap_page is done. One point for the batch."""
    await m.sched.point("folio_unlock", pfn=tails[0].pfn if tails else -1, nr=len(tails))
    for page in tails:
        page.lock.release_set_locked()


class _Span:
    """What an rmap walk needs of a folio that no longer exists as one (remap_page
    walks the range the large folio covered)."""

    __slots__ = ("pfn", "nr_pages", "anon_vma", "index", "mapping")

    def __init__(self, pfn: int, nr: int, anon_vma, index: int) -> None:
        self.pfn, self.nr_pages, self.anon_vma, self.index = pfn, nr, anon_vma, index
        self.mapping = None  # anonymous: remap_page is for anonymous folios only


# ------------------------------------------------- deferred split shrinker
def thp_underused(m, folio) -> bool:
    """thp_underused: more zero-filled subpages than khugepaged/max_ptes_none allows
    (never with the default 511). Stops early once enough are non-zero."""
    max_none = m.sysfs["khugepaged/max_ptes_none"]
    if max_none == HPAGE_PMD_NR - 1:
        return False
    zero = filled = 0
    for p in range(folio.pfn, folio.pfn + folio.nr_pages):
        if m.physmem.is_zero(p):
            zero += 1
            if zero > max_none:
                return True
        else:
            filled += 1
            if filled >= HPAGE_PMD_NR - max_none:
                return False
    return False


async def deferred_split_scan(m, nr_to_scan: int) -> int:
    """deferred_split_scan: split up to nr_to_scan queued folios: partially mapped ones
    (freeing their unmapped pages), and fully mapped underused ones
    (``thp_underused_split_page``). A folio being freed just leaves the queue; one that
    cannot be locked, or a partially mapped one that fails to split, is queued again.
    Returns the number split. Context: takes split_queue_lock, folio locks."""
    batch = []
    await m.split_queue_lock.lock("deferred_split_scan")
    for pfn in list(m.deferred_split_queue):
        folio = m.physmem.page(pfn)
        if folio.refcount > 0:  # folio_try_get
            atomic.folio_ref_add_locked(folio)
            batch.append(folio)
            # the invariant checker counts this reference until the folio_put below
            m.split_scan_pins[pfn] = m.split_scan_pins.get(pfn, 0) + 1
        else:  # lost the race with folio_put
            huge_memory_mthp.folio_clear_partially_mapped(m, folio)
        atomic.ds_queue_del_locked(m, folio)
        nr_to_scan -= 1
        if not nr_to_scan or len(batch) >= 31:  # PAGEVEC_SIZE
            break
    await m.split_queue_lock.unlock()
    split = 0
    for folio in batch:
        did_split = underused = False
        requeue = False
        if not folio.flags & PG_partially_mapped:
            underused = thp_underused(m, folio)
            if not underused:
                await swap.folio_put(m, folio, dropped=lambda f=folio: _unpin(m, f))
                continue
        lk = m.folio_lock_of(folio)
        if not await lk.trylock("deferred_split_scan"):
            requeue = True
        else:
            if await split_folio_to_list(m, folio, None) == 0:
                did_split = True
                split += 1
                if underused:
                    m.vmstat.count_vm_event("thp_underused_split_page")
            await lk.unlock()
            requeue = not did_split and bool(folio.flags & PG_partially_mapped)
        if requeue and folio.order:
            await m.split_queue_lock.lock("deferred_split_scan")
            atomic.ds_queue_add_locked(m, folio)
            await m.split_queue_lock.unlock()
        await swap.folio_put(m, folio, dropped=lambda f=folio: _unpin(m, f))
    return split


def _unpin(m, folio) -> None:
    n = m.split_scan_pins.pop(folio.pfn) - 1
    if n:
        m.split_scan_pins[folio.pfn] = n


class DeferredSplitShrinker:
    """The "thp-deferred_split" shrinker (shrinker_alloc in thp_shrinker_init)."""

    name = "thp-deferred_split"
    seeks = 2  # DEFAULT_SEEKS

    def count_objects(self, m) -> int:
        """deferred_split_count: the queue length."""
        return len(m.deferred_split_queue)

    async def scan_objects(self, m, nr_to_scan: int) -> int:
        return await deferred_split_scan(m, nr_to_scan)


def thp_shrinker_init(m) -> None:
    """thp_shrinker_init: register the deferred split shrinker."""
    m.shrinkers.append(DeferredSplitShrinker())


# ------------------------------------------------------------ debugfs
async def split_huge_pages_pid(m, task, start: int, end: int) -> int:
    """split_huge_pages_pid (/sys/kernel/debug/split_huge_pages "pid,start,end"):
    split every anonymous THP or mTHP mapped in [start, end), page by page; a folio
    that cannot be locked or has extra references is skipped. Returns the number
    split. Context: takes the mmap lock for read, then folio locks."""
    from kmm import pagewalk
    mm = task.mm
    split = 0
    await mm.mmap_lock.down_read("split_huge_pages_pid")
    addr = start & ~(PAGE_SIZE - 1)
    while addr < end:
        vma = mm.vma_lookup(addr)
        if vma is None:
            break
        if vma.flags & VM_HUGETLB:  # vma_not_suitable_for_thp_split
            addr = vma.end
            continue
        folio = None
        for _a, level, entry in pagewalk.walk_leaves(m, mm, addr, addr + PAGE_SIZE):
            if level == "pmd" and pmd_present(entry):
                pfn = pmd_pfn(entry) + ((addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1))
            elif level == "pte" and pte_present(entry) and not pte_special(entry):
                pfn = pte_pfn(entry)
            else:
                continue
            if not m.is_huge_zero_pfn(pfn & ~(HPAGE_PMD_NR - 1)):
                folio = m.physmem.folio(pfn)
        await m.sched.point("folio_walk_start", addr=addr)
        # is_transparent_hugepage: any large rmappable folio, mTHPs included
        if (folio is not None and folio.order >= 2 and folio.anon_vma is not None
                and can_split_folio(m, folio, 0)):
            lk = m.folio_lock_of(folio)
            if await lk.trylock("split_huge_pages_pid"):
                await atomic.folio_ref_add(m, folio, 1)
                if await split_folio_to_list(m, folio, None) == 0:
                    split += 1
                await lk.unlock()
                await swap.folio_put(m, folio)
        addr += PAGE_SIZE
    await mm.mmap_lock.up_read()
    return split
