"""The hugetlb pool: mm/hugetlb.c (hstates, pool growth and shrinking, surplus pages,
the global reservation count, the free path, /proc/meminfo's HugePages_* lines).

A hugetlb folio comes from the buddy allocator when the pool grows (``nr_hugepages``)
or, up to ``nr_overcommit_hugepages``, as a *surplus* page when a reservation or a fault
needs one the pool lacks; it is never on the LRU, never split, never swapped. A free
pool folio has refcount 0 (the kernel freezes it) and sits on its hstate's free list.

Counts (one hstate, one node, as on the host): ``nr_huge_pages`` (HugePages_Total),
``free_huge_pages`` (HugePages_Free), ``resv_huge_pages`` (HugePages_Rsvd: promised to a
mapping, not yet faulted) and ``surplus_huge_pages`` (HugePages_Surp). The reservation
side (resv maps, hugetlb_reserve_pages) is hugetlb_resv.py; faults, COW, fork and zap are
hugetlb_fault.py.

Left out: NUMA nodes and mempolicies, hugetlb cgroups and subpools (the internal mount of
MAP_HUGETLB files has no size limit, so subpool_get/put are identities), vmemmap
optimisation, demotion, CMA, and runtime allocation of gigantic (1 GiB) pages: their
hstate exists (so the structure and meminfo match) but growing it needs
alloc_contig_range, which the buddy model lacks, and is refused with EINVAL.
"""

from __future__ import annotations

from kmm import gfp as gfpmod
from kmm import atomic, page_alloc
from kmm.mm_types import PGTY_hugetlb, VM_HUGETLB
from kmm.pgtable import PAGE_SHIFT

HUGETLB_PAGE_ORDER = 9          # the default hstate: 2 MiB (HPAGE_SHIFT 21)
GIGANTIC_ORDER = 18             # 1 GiB (PUD_SHIFT)
MAX_PAGE_ORDER = 10             # above this the buddy allocator cannot serve an hstate


class Hstate:
    """struct hstate: one huge page size and its pool."""

    __slots__ = ("name", "order", "nr_huge_pages", "free_huge_pages", "resv_huge_pages",
                 "surplus_huge_pages", "nr_overcommit_huge_pages", "max_huge_pages",
                 "freelist")

    def __init__(self, order: int) -> None:
        self.order = order
        self.name = f"hugepages-{(1 << (order + PAGE_SHIFT)) >> 10}kB"
        self.nr_huge_pages = 0
        self.free_huge_pages = 0
        self.resv_huge_pages = 0
        self.surplus_huge_pages = 0
        self.nr_overcommit_huge_pages = 0
        self.max_huge_pages = 0
        self.freelist: list[int] = []   # hugepage_freelists[0]: head pfns, LIFO as the kernel

    @property
    def size(self) -> int:
        return 1 << (self.order + PAGE_SHIFT)

    @property
    def nr_pages(self) -> int:
        return 1 << self.order

    def persistent_huge_pages(self) -> int:
        return self.nr_huge_pages - self.surplus_huge_pages

    def available_huge_pages(self) -> int:
        return self.free_huge_pages - self.resv_huge_pages

    def is_gigantic(self) -> bool:
        return self.order > MAX_PAGE_ORDER


class HugetlbState:
    """The machine's hugetlb world: hstates, hugetlb_lock, the fault mutex table."""

    __slots__ = ("hstates", "default", "lock", "fault_mutex_table", "restore_reserve",
                 "next_file", "baseline")

    def __init__(self, m) -> None:
        self.hstates = [Hstate(HUGETLB_PAGE_ORDER), Hstate(GIGANTIC_ORDER)]
        self.default = self.hstates[0]     # default_hstate: Hugepagesize 2048 kB
        self.lock = m.locks.spinlock("hugetlb_lock", "hugetlb_lock")
        # hugetlb_fault_mutex_table: roundup_pow_of_two(8 * num_possible_cpus()) mutexes,
        # hashed by (mapping, index); a mutex is modelled as a rwsem taken for write
        n = 1
        while n < 8 * len(m.cpus):
            n <<= 1
        self.fault_mutex_table = [m.locks.rwsem("hugetlb_fault_mutex", f"hugetlb_fault_mutex:{i}")
                                  for i in range(n)]
        self.restore_reserve: set[int] = set()  # folios with HPG_restore_reserve
        self.next_file = 1
        self.baseline: dict[str, int] = {}      # meminfo + events when the run began


def hugetlb_init(m) -> None:
    """hugetlb_init: the hstates exist from boot with empty pools."""
    m.hugetlb = HugetlbState(m)


def size_to_hstate(m, size: int) -> Hstate | None:
    for h in m.hugetlb.hstates:
        if h.size == size:
            return h
    return None


def is_vm_hugetlb_page(vma) -> bool:
    return bool(vma.flags & VM_HUGETLB)


def folio_test_hugetlb(folio) -> bool:
    return folio.page_type == PGTY_hugetlb


def hstate_vma(m, vma) -> Hstate:
    return vma.hugetlb_file.hstate


# ----------------------------------------------------------- shared-state ops
async def folio_set_hugetlb(m, folio, on: bool) -> None:
    """__folio_set_hugetlb / __folio_clear_hugetlb: the folio's page type, set by the
    code that owns the folio (fresh from the buddy allocator, or leaving the pool)."""
    await atomic.point(m.sched, "folio_set_hugetlb", pfn=folio.pfn, on=on)
    atomic.init_page(folio, page_type=PGTY_hugetlb if on else "")


async def folio_ref_freeze(m, folio) -> None:
    """folio_ref_freeze(folio, 1): a pool folio holds no reference."""
    if folio.refcount != 1:
        m.bug(f"hugetlb: freezing a referenced folio {folio!r}")
    await atomic.point(m.sched, "folio_ref_freeze", pfn=folio.pfn)
    atomic.folio_ref_freeze_locked(folio)


async def folio_ref_unfreeze(m, folio) -> None:
    """folio_ref_unfreeze(folio, 1): the folio leaves the pool with one reference."""
    await atomic.folio_ref_add(m, folio, 1)


# ------------------------------------------------------------ buddy side
def htlb_alloc_mask(h: Hstate) -> int:
    """htlb_alloc_mask: 2 MiB pages are movable (hugepage_movable_supported)."""
    return gfpmod.GFP_HIGHUSER_MOVABLE if not h.is_gigantic() else gfpmod.GFP_HIGHUSER


async def alloc_buddy_hugetlb_folio(m, h: Hstate, gfp: int):
    """alloc_buddy_hugetlb_folio: one compound page of the hstate's order from the buddy
    allocator, trying hard (__GFP_RETRY_MAYFAIL: compaction and reclaim, but no OOM
    kill) and quietly; counts htlb_buddy_alloc_success / _fail. Returns the folio or
    None (a fragmented machine fails here even with memory free)."""
    gfp |= (getattr(gfpmod, "__GFP_COMP") | getattr(gfpmod, "__GFP_NOWARN")
            | getattr(gfpmod, "__GFP_RETRY_MAYFAIL"))
    pfn = await page_alloc.alloc_pages(m, h.order, gfp, "hugetlb")
    if pfn < 0:
        m.vmstat.count_vm_event("htlb_buddy_alloc_fail")
        return None
    m.vmstat.count_vm_event("htlb_buddy_alloc_success")
    return m.physmem.page(pfn)


async def alloc_fresh_hugetlb_folio(m, h: Hstate, gfp: int):
    """alloc_fresh_hugetlb_folio / only_alloc_fresh_hugetlb_folio: a buddy folio made a
    hugetlb folio (refcount 1, not yet accounted in the pool)."""
    if h.is_gigantic():
        return None  # alloc_gigantic_folio needs alloc_contig_range: not modelled
    folio = await alloc_buddy_hugetlb_folio(m, h, gfp)
    if folio is not None:
        # the pool's pages are handed out zeroed by the fault (folio_zero_user), not here
        await atomic.point(m.sched, "prep_new_hugetlb_folio", pfn=folio.pfn)
        m.physmem.clear(folio.pfn, h.nr_pages)
        await folio_set_hugetlb(m, folio, True)
    return folio


async def update_and_free_hugetlb_folio(m, h: Hstate, folio) -> None:
    """update_and_free_hugetlb_folio: a folio already out of the pool's counts goes
    back to the buddy allocator. Context: hugetlb_lock not held."""
    await folio_set_hugetlb(m, folio, False)
    m.hugetlb.restore_reserve.discard(folio.pfn)
    await page_alloc.free_pages(m, folio.pfn, folio.order)


def enqueue_hugetlb_folio(h: Hstate, folio) -> None:
    """enqueue_hugetlb_folio: onto the free list. Context: hugetlb_lock held."""
    h.freelist.append(folio.pfn)
    h.free_huge_pages += 1


def dequeue_hugetlb_folio(m, h: Hstate):
    """dequeue_hugetlb_folio_node_exact: the most recently freed folio, or None.
    Context: hugetlb_lock held."""
    if not h.freelist:
        return None
    pfn = h.freelist.pop()
    h.free_huge_pages -= 1
    return m.physmem.page(pfn)


def remove_hugetlb_folio(m, h: Hstate, folio, adjust_surplus: bool) -> None:
    """remove_hugetlb_folio: out of the pool's counts (and off the free list if it is
    there). Context: hugetlb_lock held."""
    if folio.refcount == 0 and folio.pfn in h.freelist:
        h.freelist.remove(folio.pfn)
        h.free_huge_pages -= 1
    if adjust_surplus:
        h.surplus_huge_pages -= 1
    h.nr_huge_pages -= 1


async def free_huge_folio(m, folio) -> None:
    """free_huge_folio: the last reference to an in-use hugetlb folio is gone. A folio
    that consumed a reservation gives it back (HPG_restore_reserve); a surplus page,
    while the pool has surplus, returns to the buddy allocator; any other goes back on
    the free list. Context: called from folio_put with refcount 0."""
    hs = m.hugetlb
    h = size_to_hstate(m, 1 << (folio.order + PAGE_SHIFT))
    restore = folio.pfn in hs.restore_reserve
    hs.restore_reserve.discard(folio.pfn)
    await hs.lock.lock("free_huge_folio")
    if restore:
        h.resv_huge_pages += 1
    if h.surplus_huge_pages:
        remove_hugetlb_folio(m, h, folio, True)
        await hs.lock.unlock()
        await update_and_free_hugetlb_folio(m, h, folio)
        return
    enqueue_hugetlb_folio(h, folio)
    await hs.lock.unlock()


async def alloc_pool_huge_folio(m, h: Hstate) -> bool:
    """alloc_pool_huge_folio: grow the persistent pool by one (buddy, __GFP_THISNODE)."""
    folio = await alloc_fresh_hugetlb_folio(
        m, h, htlb_alloc_mask(h) | getattr(gfpmod, "__GFP_THISNODE"))
    if folio is None:
        return False
    await folio_ref_freeze(m, folio)
    hs = m.hugetlb
    await hs.lock.lock("prep_and_add_allocated_folios")
    h.nr_huge_pages += 1
    enqueue_hugetlb_folio(h, folio)
    await hs.lock.unlock()
    return True


def adjust_pool_surplus(h: Hstate, delta: int) -> bool:
    """adjust_pool_surplus: turn one page between persistent and surplus.
    Context: hugetlb_lock held."""
    if delta < 0:
        if not h.surplus_huge_pages:
            return False
    elif h.surplus_huge_pages >= h.nr_huge_pages:
        return False
    h.surplus_huge_pages += delta
    return True


async def set_max_huge_pages(m, h: Hstate, count: int) -> int | str:
    """set_max_huge_pages (writing /proc/sys/vm/nr_hugepages): grow the pool from the
    buddy allocator, stopping at the first failure (the write still succeeds with fewer
    pages), or shrink it by freeing free pages; pages in use above the target become
    surplus and leave the pool when they are freed. Returns 0 or an errno name."""
    if h.is_gigantic() and count:
        return "EINVAL"  # no runtime gigantic allocation in the model
    hs = m.hugetlb
    await hs.lock.lock("set_max_huge_pages")
    # converting surplus to persistent first: no allocation needed for those
    while h.surplus_huge_pages and count > h.persistent_huge_pages():
        if not adjust_pool_surplus(h, -1):
            break
    while count > h.persistent_huge_pages():
        await hs.lock.unlock()
        ok = await alloc_pool_huge_folio(m, h)
        await hs.lock.lock("set_max_huge_pages")
        if not ok:
            break
    # shrink: never below what is reserved or in use
    min_count = max(count, h.resv_huge_pages + h.nr_huge_pages - h.free_huge_pages)
    victims = []
    while min_count < h.persistent_huge_pages():
        folio = dequeue_hugetlb_folio(m, h)
        if folio is None:
            break
        h.nr_huge_pages -= 1
        victims.append(folio)
    while count < h.persistent_huge_pages():
        if not adjust_pool_surplus(h, 1):
            break
    h.max_huge_pages = h.persistent_huge_pages()
    await hs.lock.unlock()
    for folio in victims:
        await update_and_free_hugetlb_folio(m, h, folio)
    return 0


async def set_nr_overcommit_huge_pages(m, h: Hstate, count: int) -> int | str:
    """nr_overcommit_hugepages_store: gigantic hstates refuse it."""
    if h.is_gigantic():
        return "EINVAL"
    await m.hugetlb.lock.lock("nr_overcommit_hugepages_store")
    h.nr_overcommit_huge_pages = count
    await m.hugetlb.lock.unlock()
    return 0


async def alloc_surplus_hugetlb_folio(m, h: Hstate, gfp: int):
    """alloc_surplus_hugetlb_folio: one page beyond the persistent pool, while
    surplus_huge_pages < nr_overcommit_hugepages. Returns the folio (refcount 1,
    counted in the pool as surplus) or None."""
    if h.is_gigantic():
        return None
    hs = m.hugetlb
    await hs.lock.lock("alloc_surplus_hugetlb_folio")
    full = h.surplus_huge_pages >= h.nr_overcommit_huge_pages
    await hs.lock.unlock()
    if full:
        return None
    folio = await alloc_fresh_hugetlb_folio(m, h, gfp)
    if folio is None:
        return None
    await hs.lock.lock("alloc_surplus_hugetlb_folio")
    if h.surplus_huge_pages >= h.nr_overcommit_huge_pages:
        # raced past the limit meanwhile (HPG_temporary): give it straight back
        await hs.lock.unlock()
        await folio_ref_freeze(m, folio)
        await update_and_free_hugetlb_folio(m, h, folio)
        return None
    h.nr_huge_pages += 1
    h.surplus_huge_pages += 1
    await hs.lock.unlock()
    return folio


async def gather_surplus_pages(m, h: Hstate, delta: int) -> bool:
    """gather_surplus_pages: make resv_huge_pages += delta possible, allocating surplus
    pages for what the free pool lacks (all or nothing). Context: hugetlb_lock held on
    entry and exit (dropped around allocations)."""
    hs = m.hugetlb
    needed = h.resv_huge_pages + delta - h.free_huge_pages
    if needed <= 0:
        h.resv_huge_pages += delta
        return True
    got = []
    ok = True
    while True:
        await hs.lock.unlock()
        for _ in range(needed):
            folio = await alloc_surplus_hugetlb_folio(m, h, htlb_alloc_mask(h))
            if folio is None:
                ok = False
                break
            got.append(folio)
        await hs.lock.lock("gather_surplus_pages")
        if not ok:
            break
        # the pool may have changed while the lock was dropped
        needed = h.resv_huge_pages + delta - (h.free_huge_pages + len(got))
        if needed <= 0:
            break
    if ok:
        h.resv_huge_pages += delta
    # every page gathered goes on the free list (an unneeded one comes back out as
    # surplus in return_unused_surplus_pages); on failure they all leave again
    for folio in got:
        await folio_ref_freeze(m, folio)
        enqueue_hugetlb_folio(h, folio)
    if not ok:
        await return_unused_surplus_pages(m, h, len(got))
        return False
    extra = h.free_huge_pages - h.resv_huge_pages
    if extra > 0 and got:
        await return_unused_surplus_pages(m, h, min(extra, len(got)))
    return True


async def return_unused_surplus_pages(m, h: Hstate, unused_resv_pages: int) -> None:
    """return_unused_surplus_pages: free surplus pages no reservation needs any more.
    Context: hugetlb_lock held on entry and exit."""
    nr = min(unused_resv_pages, h.surplus_huge_pages)
    victims = []
    while nr > 0:
        folio = dequeue_hugetlb_folio(m, h)
        if folio is None:
            break
        h.nr_huge_pages -= 1
        h.surplus_huge_pages -= 1
        victims.append(folio)
        nr -= 1
    if victims:
        await m.hugetlb.lock.unlock()
        for folio in victims:
            await update_and_free_hugetlb_folio(m, h, folio)
        await m.hugetlb.lock.lock("return_unused_surplus_pages")


async def hugetlb_acct_memory(m, h: Hstate, delta: int) -> bool:
    """hugetlb_acct_memory: take (delta > 0, gathering surplus pages if the free pool
    is short) or give back (delta < 0) global reservations. False: not enough pages."""
    hs = m.hugetlb
    await hs.lock.lock("hugetlb_acct_memory")
    ok = True
    if delta > 0:
        ok = await gather_surplus_pages(m, h, delta)
    elif delta < 0:
        h.resv_huge_pages += delta
        await return_unused_surplus_pages(m, h, -delta)
    await hs.lock.unlock()
    return ok


# ------------------------------------------------------------ fault side
async def alloc_hugetlb_folio(m, vma, addr: int, cow_from_owner: bool):
    """alloc_hugetlb_folio: a folio for a fault at addr (refcount 1), using the VMA's
    reservation if it has one for this index (the folio then carries
    HPG_restore_reserve), else a free unreserved page, else a surplus page. A COW by
    the owner of a private mapping never uses the VMA's reservation (it was consumed
    by the page being copied). Returns the folio, or an errno name ("ENOSPC": the
    fault becomes SIGBUS)."""
    from kmm import hugetlb_resv
    h = hstate_vma(m, vma)
    hs = m.hugetlb
    if cow_from_owner:
        map_chg = 1  # MAP_CHG_ENFORCED
    else:
        map_chg = hugetlb_resv.vma_needs_reservation(m, vma, addr)
    gbl_chg = 1 if map_chg else 0   # hugepage_subpool_get_pages: no subpool
    use_existing_reservation = gbl_chg == 0
    await hs.lock.lock("alloc_hugetlb_folio")
    folio = None
    if use_existing_reservation or h.available_huge_pages():
        folio = dequeue_hugetlb_folio(m, h)
    if folio is not None:
        await folio_ref_unfreeze(m, folio)
    else:
        await hs.lock.unlock()
        folio = await alloc_surplus_hugetlb_folio(m, h, htlb_alloc_mask(h))
        if folio is None:
            return "ENOSPC"
        await hs.lock.lock("alloc_hugetlb_folio")
    if use_existing_reservation:
        hs.restore_reserve.add(folio.pfn)
        h.resv_huge_pages -= 1
    await hs.lock.unlock()
    if not cow_from_owner:  # MAP_CHG_ENFORCED needs no commit
        hugetlb_resv.vma_commit_reservation(m, vma, addr)
    return folio


# ------------------------------------------------------------ reporting
MEMINFO_KEYS = ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp")
EVENTS = ("htlb_buddy_alloc_success", "htlb_buddy_alloc_fail")


def hugetlb_report_meminfo(m) -> dict[str, int]:
    """hugetlb_report_meminfo: the default hstate's counts, Hugepagesize, and Hugetlb
    (kB of every hstate's pool)."""
    h = m.hugetlb.default
    total_kb = sum(x.nr_huge_pages * x.size for x in m.hugetlb.hstates) >> 10
    # the counters are unsigned longs: 6.18 can take resv_huge_pages below zero (the
    # owner of a private mapping unmaps a page a child still maps: its reservation is
    # given back twice until the child frees the page), and meminfo then prints 2^64-1
    # (pinned by workloads/hugetlb_munmap_whole_after_fork)
    u = (1 << 64) - 1
    return {"HugePages_Total": h.nr_huge_pages, "HugePages_Free": h.free_huge_pages,
            "HugePages_Rsvd": h.resv_huge_pages & u, "HugePages_Surp": h.surplus_huge_pages,
            "Hugepagesize": h.size >> 10, "Hugetlb": total_kb}


def snapshot(m) -> dict[str, int]:
    """The figures a report gives as changes: meminfo HugePages_* and the events."""
    mi = hugetlb_report_meminfo(m)
    snap = {k: mi[k] for k in MEMINFO_KEYS}
    snap.update({e: m.vmstat.events[e] for e in EVENTS})
    return snap


__all__ = ["Hstate", "hugetlb_init", "set_max_huge_pages", "set_nr_overcommit_huge_pages",
           "alloc_hugetlb_folio", "free_huge_folio", "hugetlb_report_meminfo"]
