"""The buddy page allocator: one zone, orders 0..10, as an actor; and the allocation
slow path. mm/page_alloc.c (with the THP part of mm/mempolicy.c's alloc_pages_mpol);
the gfp masks are in kmm/gfp.py.

The zone is owned by the ``page_alloc`` actor; callers send it ``AllocPages``,
``FreePages`` and ``IsolateFreePage`` messages (runtime/msgs.py) and the handler runs
under ``zone.lock``. Free lists are LIFO (the kernel takes from and adds to the list
head). Frames above ``untouched`` were never handed out and count as free order-10
blocks, so start-up costs nothing whatever the memory size.

``alloc_pages`` is the fast path: one message asking for a block above the low
watermark. When that fails, ``__alloc_pages_slowpath`` runs in the *caller's* actor, as
in the kernel (the zone actor never re-enters itself): wake kswapd, retry at the min
watermark, then, as the gfp mask allows, direct compaction (kmm/compaction.py), direct
reclaim (kmm/vmscan.py, when present) and compaction again, with the kernel's rules for
``__GFP_NORETRY`` and costly orders. gfp masks are the kernel's bits (gfp_types.h); the
kernel's composite names (``GFP_KERNEL``, ``GFP_TRANSHUGE``...) are accepted too.

Watermarks follow ``__setup_per_zone_wmarks``: min from min_free_kbytes (raised by
khugepaged's ``set_recommended_min_free_kbytes`` while THP is enabled), low and high
``watermark_scale_factor`` above it. What the model leaves out: per-CPU page lists,
migrate types and pageblock stealing (so mobility grouping does not keep unmovable pages
together), the highatomic and CMA reserves, zones other than Normal, memcg charging,
cpusets, the OOM killer (an allocation that would invoke it fails), and compaction's
capture of a freed page.
"""

from __future__ import annotations

from kmm import atomic, mmzone
from kmm.atomic import ticked
from math import isqrt

from kmm.locking import FolioLock, SpinLock
from kmm.gfp import (
    GFP, PAGE_ALLOC_COSTLY_ORDER, __GFP_DIRECT_RECLAIM, __GFP_HIGH, __GFP_KSWAPD_RECLAIM,
    __GFP_MEMALLOC,
    __GFP_MOVABLE, __GFP_NOMEMALLOC, __GFP_NORETRY, __GFP_RETRY_MAYFAIL, __GFP_THISNODE,
    format_gfp, gfp_compaction_allowed,
)
from kmm.mm_types import PGTY_buddy
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SIZE
from kmm.runtime.msgs import AllocPages, FreePages, IsolateFreePage, PageReply
from kmm.cost import COST_RMQUEUE, COST_WMARK_CHECK

MAX_PAGE_ORDER = 10
NR_ORDERS = MAX_PAGE_ORDER + 1
MAX_BLOCK = 1 << MAX_PAGE_ORDER
pageblock_order = HPAGE_PMD_ORDER
pageblock_nr_pages = 1 << pageblock_order
MIGRATE_PCPTYPES = 3
WATERMARK_SCALE_FACTOR = 10  # /proc/sys/vm/watermark_scale_factor default
MAX_RECLAIM_RETRIES = 16
MAX_COMPACT_RETRIES = 16


# alloc_flags (mm/internal.h)
ALLOC_WMARK_MIN, ALLOC_WMARK_LOW, ALLOC_WMARK_HIGH = 0, 1, 2
ALLOC_WMARK_MASK = 3
ALLOC_NO_WATERMARKS = 0x04    # __GFP_MEMALLOC: the reserves too
ALLOC_MIN_RESERVE = 0x08      # __GFP_HIGH: may dip into half the min reserve
ALLOC_NON_BLOCK = 0x10        # cannot block: a quarter more
ALLOC_CMA = 0x80
ALLOC_KSWAPD = 0x800          # __GFP_KSWAPD_RECLAIM: the slow path wakes kswapd
WMARK_NAMES = ("min", "low", "high")


def min_free_kbytes(managed_pages: int, thp_enabled: bool, nr_zones: int = 1) -> int:
    """calculate_min_free_kbytes, then khugepaged's set_recommended_min_free_kbytes
    (``nr_zones``: the populated zones, one per node)."""
    lowmem_kbytes = managed_pages * PAGE_SIZE // 1024
    kb = max(128, min(isqrt(lowmem_kbytes * 16), 262144))
    if thp_enabled:
        recommended = pageblock_nr_pages * nr_zones * 2
        recommended += pageblock_nr_pages * nr_zones * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
        recommended = min(recommended, managed_pages // 20)  # at most 5% of memory
        kb = max(kb, recommended * PAGE_SIZE // 1024)
    return kb


class Zone:
    """struct zone (ZONE_NORMAL) of node ``nid`` with its free_area[], watermarks and the
    compaction state that mm/compaction.c keeps in it (deferral, cached scanner
    positions), plus the node's kcompactd request (pgdat->kcompactd_max_order: one zone
    per node). Node 0's actor and lock keep the one-node names (page_alloc,
    zone.Normal); node N's are page_allocN and zone.Normal:N."""

    def __init__(self, machine, nr_pages: int, start_pfn: int = 0, nid: int = 0) -> None:
        self.machine = machine
        self.physmem = machine.physmem
        self.nid = nid
        self.nr_pages = nr_pages
        self.zone_start_pfn = start_pfn
        self.free_area: list[dict[int, None]] = [{} for _ in range(NR_ORDERS)]
        self.free_order: dict[int, int] = {}  # block head pfn -> order, for every free block
        self.untouched = start_pfn
        self.untouched_end = start_pfn + nr_pages - nr_pages % MAX_BLOCK
        self.nr_free = nr_pages
        self.managed = nr_pages
        # the tail beyond the last whole order-10 block goes on the lists at once
        pfn = self.untouched_end
        for order in range(MAX_PAGE_ORDER - 1, -1, -1):
            if pfn + (1 << order) <= start_pfn + nr_pages:
                self._add(pfn, order)
                pfn += 1 << order
        sfx = f":{nid}" if nid else ""
        self.lock = machine.locks.spinlock("zone_lock", "zone.Normal" + sfx)
        self.actor = machine.sched.server("page_alloc" + (str(nid) if nid else ""),
                                          self.handle, kind="allocator")
        self.numa_events = {item: 0 for item in mmzone.NUMA_EVENTS}
        # compaction (mm/compaction.c): deferral and where the scanners restart
        self.compact_considered = 0
        self.compact_defer_shift = 0
        self.compact_order_failed = 0
        self.compact_init_migrate_pfn = self.zone_start_pfn
        self.compact_cached_migrate_pfn = [0, 0]  # [async, sync]
        self.compact_cached_free_pfn = 0
        self.kcompactd_max_order = 0
        self.reset_cached_positions()
        self.set_watermarks(thp_enabled=True)

    @property
    def zone_end_pfn(self) -> int:
        return self.zone_start_pfn + self.nr_pages

    def reset_cached_positions(self) -> None:
        """reset_cached_positions: the migrate scanner restarts at the zone's start,
        the free scanner at its last pageblock."""
        self.compact_cached_migrate_pfn = [self.zone_start_pfn, self.zone_start_pfn]
        self.compact_cached_free_pfn = (self.zone_end_pfn - 1) & ~(pageblock_nr_pages - 1)

    # ----------------------------------------------------------- watermarks
    def set_watermarks(self, thp_enabled: bool, lowmem_pages: int | None = None,
                       nr_zones: int = 1) -> None:
        """__setup_per_zone_wmarks: the zone's share of min_free_kbytes, in proportion
        to its managed pages among all zones' (``lowmem_pages``)."""
        total = self.managed if lowmem_pages is None else lowmem_pages
        self.min_free_kbytes = min_free_kbytes(total, thp_enabled, nr_zones)
        wmin = self.min_free_kbytes * 1024 // PAGE_SIZE * self.managed // total
        step = max(wmin // 4, self.managed * WATERMARK_SCALE_FACTOR // 10000)
        self.wmark = {"min": wmin, "low": wmin + step, "high": wmin + 2 * step}

    def wmark_pages(self, alloc_flags: int) -> int:
        """wmark_pages(zone, alloc_flags & ALLOC_WMARK_MASK)."""
        return self.wmark[WMARK_NAMES[alloc_flags & ALLOC_WMARK_MASK]]

    def zone_watermark_ok(self, order: int, mark: int, alloc_flags: int = 0,
                          free_pages: int | None = None) -> bool:
        """__zone_watermark_ok: enough free pages above the mark, and a block of the order."""
        free = self.nr_free if free_pages is None else free_pages
        if alloc_flags & (ALLOC_MIN_RESERVE | ALLOC_NON_BLOCK):  # ALLOC_RESERVES
            if alloc_flags & ALLOC_MIN_RESERVE:
                mark -= mark // 2
            if alloc_flags & ALLOC_NON_BLOCK:
                mark -= mark // 4
        if free - (1 << order) + 1 <= mark:
            return False
        if order == 0:
            return True
        return self.has_free_block(order)

    def has_free_block(self, order: int) -> bool:
        """Some free block of at least ``order`` (free_area_empty over order..10)."""
        for o in range(order, NR_ORDERS):
            if self.free_area[o]:
                return True
        return self.untouched < self.untouched_end

    def buddyinfo(self) -> list[int]:
        """/proc/buddyinfo: free blocks per order."""
        counts = [len(a) for a in self.free_area]
        counts[MAX_PAGE_ORDER] += (self.untouched_end - self.untouched) // MAX_BLOCK
        return counts

    # ------------------------------------------------------------ free lists
    def _add(self, pfn: int, order: int) -> None:
        self.free_area[order][pfn] = None
        self.free_order[pfn] = order

    def _del(self, pfn: int, order: int) -> None:
        del self.free_area[order][pfn]
        del self.free_order[pfn]

    def _rmqueue_smallest(self, order: int) -> int:
        """__rmqueue_smallest + expand: the lower half is used, upper halves go free."""
        for cur in range(order, NR_ORDERS):
            area = self.free_area[cur]
            if area:
                pfn, _ = area.popitem()
                del self.free_order[pfn]
                break
        else:
            if self.untouched >= self.untouched_end:
                return -1
            pfn, cur = self.untouched, MAX_PAGE_ORDER
            self.untouched += MAX_BLOCK
        while cur > order:
            cur -= 1
            self._add(pfn + (1 << cur), cur)
        self.nr_free -= 1 << order
        return pfn

    def _free_one_page(self, pfn: int, order: int) -> None:
        """__free_one_page: merge with free buddies up to MAX_PAGE_ORDER."""
        self.nr_free += 1 << order
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if self.free_order.get(buddy) != order:
                break
            self._del(buddy, order)
            pfn &= ~(1 << order)
            order += 1
        self._add(pfn, order)

    def boot_alloc(self, order: int) -> int:
        """memblock-time allocation, before any actor runs (no lock, no point)."""
        pfn = self._rmqueue_smallest(order)
        self.managed -= 1 << order
        return pfn

    # -------------------------------------------------------------- messages
    async def handle(self, msg):
        if isinstance(msg, AllocPages):
            return PageReply(await self._alloc(msg))
        if isinstance(msg, FreePages):
            await self._free(msg.pfn, msg.order)
            return PageReply(msg.pfn)
        if isinstance(msg, IsolateFreePage):
            return PageReply(await self._isolate_free_page(msg.pfn, msg.order))
        raise TypeError(f"page_alloc: unexpected message {msg!r}")

    async def _alloc(self, msg: AllocPages) -> int:
        """get_page_from_freelist for one zone, then prep_new_page."""
        order = msg.order
        sched = self.machine.sched
        pfn = await self._get_page_from_freelist(order, msg.alloc_flags)
        if pfn < 0:
            if not ticked(sched, COST_WMARK_CHECK):
                await sched.point("get_page_from_freelist", COST_WMARK_CHECK, order=order,
                                  wmark=WMARK_NAMES[msg.alloc_flags & ALLOC_WMARK_MASK],
                                  gfp_flags=msg.gfp, pfn=-1)
            return -1
        self._prep_new_page(pfn, order)
        if not ticked(sched, 1):
            await sched.point("mm_page_alloc", pfn=pfn, order=order, gfp_flags=msg.gfp,
                              purpose=msg.purpose)
        self.machine.vmstat.count_vm_event("pgalloc_normal", 1 << order)
        return pfn

    async def _get_page_from_freelist(self, order: int, alloc_flags: int) -> int:
        if not alloc_flags & ALLOC_NO_WATERMARKS and not self.zone_watermark_ok(
                order, self.wmark_pages(alloc_flags), alloc_flags):
            return -1
        await self.lock.lock("rmqueue")
        pfn = self._rmqueue_smallest(order)
        atomic.step_locked(self.machine, self.lock, "rmqueue", COST_RMQUEUE, order=order,
                           pfn=pfn)
        await self.lock.unlock()
        return pfn

    def _prep_new_page(self, pfn: int, order: int) -> None:
        """prep_new_page / prep_compound_page: refcount 1; a head for order > 0."""
        pages = self.physmem.pages
        for p in range(pfn, pfn + (1 << order)):
            pages.pop(p, None)  # tails are created lazily, pointing at the head
        head = self.physmem.page(pfn)
        atomic.prep_new_page(head, order)

    async def _free(self, pfn: int, order: int) -> None:
        """free_pages_prepare + __free_one_page under zone->lock."""
        pages = self.physmem.pages
        head = pages.get(pfn)
        if head is not None and (head.refcount or head.mapcount or head.entire_mapcount):
            self.machine.bug(f"freeing in-use page pfn={pfn:#x}: {head!r}")
        lk = head.lock if head is not None else None
        if lk is not None and (lk.owner is not None or lk.waiters):
            # free_page_is_bad: PG_locked is among PAGE_FLAGS_CHECK_AT_FREE; an actor
            # sleeping in folio_lock holds no reference (folio_lock wants one) and would
            # wake on whatever page is allocated there next. A migration-entry waiter
            # (handed the lock by the unlock, not yet run) is excused: see Machine
            excused = self.machine.unref_waiters
            who = [a for a in (lk.owner, *lk.waiters) if a is not None and a not in excused]
            if who:
                self.machine.bug(f"freeing a locked page pfn={pfn:#x} (its lock held or "
                                 f"waited for by {[a.name for a in who]}): {head!r}")
        for p in range(pfn, pfn + (1 << order)):
            pages.pop(p, None)
        self.physmem.clear(pfn, 1 << order)
        await self.lock.lock("free_one_page")
        self._free_one_page(pfn, order)
        atomic.step_locked(self.machine, self.lock, "mm_page_free", COST_RMQUEUE, pfn=pfn,
                           order=order)
        await self.lock.unlock()
        self.machine.vmstat.count_vm_event("pgfree", 1 << order)

    async def _isolate_free_page(self, pfn: int, order: int) -> int:
        """__isolate_free_page under zone->lock, for compaction's free scanner: take a
        free block off its list if it is still free at that order and the order-0
        watermark (min + the block) holds. Returns the pfn; -1 if the block is no
        longer free at that order, -2 if the watermark stops it."""
        await self.lock.lock("isolate_freepages_block")
        ret = pfn
        if self.free_order.get(pfn) != order:
            ret = -1
        elif not self.zone_watermark_ok(0, self.wmark["min"] + (1 << order)):
            ret = -2
        else:
            self._del(pfn, order)
            self.nr_free -= 1 << order
        atomic.step_locked(self.machine, self.lock, "isolate_free_page", COST_RMQUEUE,
                           pfn=pfn, order=order, ret=ret)
        await self.lock.unlock()
        return ret

    # ------------------------------------------------------------ invariants
    def check(self) -> list[str]:
        """Free lists consistent: aligned, disjoint, counted, no in-use page inside."""
        errs = []
        total = (self.untouched_end - self.untouched)
        seen = []
        for order, area in enumerate(self.free_area):
            for pfn in area:
                if pfn & ((1 << order) - 1):
                    errs.append(f"free block pfn={pfn:#x} not aligned to order {order}")
                if self.free_order.get(pfn) != order:
                    errs.append(f"free block pfn={pfn:#x} order {order} not indexed")
                seen.append((pfn, pfn + (1 << order)))
                total += 1 << order
        if len(self.free_order) != sum(len(a) for a in self.free_area):
            errs.append("free_order index and free lists differ")
        if total != self.nr_free:
            errs.append(f"nr_free {self.nr_free} != pages on free lists {total}")
        seen.sort()
        for (a0, a1), (b0, b1) in zip(seen, seen[1:]):
            if b0 < a1:
                errs.append(f"free blocks overlap at pfn {b0:#x}")
        pages = self.physmem.pages
        for s, e in seen:
            if len(pages) < e - s:
                cand = [p for p in pages if s <= p < e]
            else:
                cand = [p for p in range(s, e) if p in pages]
            for p in cand:
                pg = pages[p]
                if pg.refcount or pg.mapcount or pg.page_type not in ("", PGTY_buddy):
                    errs.append(f"page in a free block is in use: {pg!r}")
        return errs

    def free_block_at(self, pfn: int) -> tuple[int, int] | None:
        """The free block holding pfn, as (head pfn, order), or None (PageBuddy and
        buddy_order of the block's head)."""
        if self.untouched <= pfn < self.untouched_end:
            return pfn & ~(MAX_BLOCK - 1), MAX_PAGE_ORDER
        fo = self.free_order
        for order in range(NR_ORDERS):
            head = pfn & ~((1 << order) - 1)
            if fo.get(head) == order:
                return head, order
        return None

    def is_free(self, pfn: int) -> bool:
        return self.free_block_at(pfn) is not None


# ------------------------------------------------------------------ allocation
def might_sleep(m, where: str) -> None:
    """might_sleep (CONFIG_DEBUG_ATOMIC_SLEEP): a caller that may sleep (an allocation
    that may enter direct reclaim) holds no spinlock; else the kernel's splat, as a
    KernelBug naming the spinlocks held."""
    held = m.sched.current.held
    if held:
        held = [h for h in held
                if isinstance(h.lock, SpinLock) and not isinstance(h.lock, FolioLock)]
    if held:
        actor = m.sched.current
        m.bug(f"BUG: sleeping function called from invalid context at {where}: "
              f"in_atomic(): 1, name: {actor.name}; holding "
              + ", ".join(f"{h.lock.name} (taken at {h.site})" for h in held))


class AllocContext:
    """struct alloc_context: the zones of the zonelist the allocation may use, in
    fallback order (the preferred node's zonelist filtered by the nodemask), and the
    preferred zone (the first of them), against which numa_hit/numa_miss count."""

    __slots__ = ("zones", "preferred_zone")

    def __init__(self, zones: list) -> None:
        self.zones = zones
        self.preferred_zone = zones[0] if zones else None


def prepare_alloc_pages(m, gfp: int, nid: int | None = None,
                        nodemask=None) -> AllocContext:
    """prepare_alloc_pages: the zonelist of ``nid`` (the running CPU's node when None),
    ZONELIST_NOFALLBACK for __GFP_THISNODE, filtered by ``nodemask`` (node ids; None:
    every node); first_zones_zonelist gives the preferred zone."""
    if len(m.node_data) == 1:
        zones = [m.zone]
    else:
        if nid is None or nid == mmzone.NUMA_NO_NODE:
            nid = mmzone.numa_node_id(m)
        zones = mmzone.node_zonelist(m, nid, gfp)
    if nodemask is not None:
        zones = [z for z in zones if z.nid in nodemask]
    return AllocContext(zones)


async def alloc_pages(m, order: int, gfp, purpose: str, nid: int | None = None,
                      nodemask=None) -> int:
    """__alloc_pages(gfp, order, preferred_nid, nodemask): the fast path
    (get_page_from_freelist at the low watermark: one message to each zone actor of the
    zonelist in turn), then __alloc_pages_slowpath in the caller's context. ``gfp`` is
    a mask or a composite name; ``nid`` None means the running CPU's node
    (alloc_pages). Returns the pfn, or -1."""
    if isinstance(gfp, str):
        gfp = GFP[gfp]
    if gfp & __GFP_DIRECT_RECLAIM:
        might_sleep(m, "__alloc_pages")
    ac = prepare_alloc_pages(m, gfp, nid, nodemask)
    if not ac.zones:
        return -1
    pfn = await get_page_from_freelist(m, order, gfp, ALLOC_WMARK_LOW, purpose, ac)
    if pfn >= 0:
        return pfn
    return await __alloc_pages_slowpath(m, order, gfp, purpose, ac)


async def vma_alloc_folio(m, gfp: int, order: int, vma, addr: int) -> int:
    """vma_alloc_folio -> alloc_pages_mpol (mm/mempolicy.c) with the VMA's policy
    (kmm.mempolicy). Returns the pfn, or -1."""
    from kmm import mempolicy
    return await mempolicy.vma_alloc_folio(m, gfp, order, vma, addr)


async def get_page_from_freelist(m, order: int, gfp: int, alloc_flags: int,
                                 purpose: str, ac: AllocContext | None = None) -> int:
    """get_page_from_freelist: one attempt at the watermark alloc_flags names in each
    zone of the zonelist, in order; the zone that gives the page counts zone_statistics
    (done here, in the allocating actor, where rmqueue does it on the allocating CPU)."""
    zones = ac.zones if ac is not None else (m.zone,)
    for z in zones:
        reply = await m.sched.call(z.actor, AllocPages(order, format_gfp(gfp), purpose,
                                                       alloc_flags))
        if reply.pfn >= 0:
            mmzone.zone_statistics(m, ac.preferred_zone if ac is not None else z, z)
            return reply.pfn
    return -1


def gfp_to_alloc_flags(gfp: int, order: int) -> int:
    """gfp_to_alloc_flags: the slow path works at the min watermark; __GFP_HIGH and
    non-blocking callers may dip below it; __GFP_KSWAPD_RECLAIM wakes kswapd."""
    alloc_flags = ALLOC_WMARK_MIN
    if gfp & __GFP_HIGH:
        alloc_flags |= ALLOC_MIN_RESERVE
    if gfp & __GFP_KSWAPD_RECLAIM:
        alloc_flags |= ALLOC_KSWAPD
    if not gfp & __GFP_DIRECT_RECLAIM and not gfp & __GFP_NOMEMALLOC:
        alloc_flags |= ALLOC_NON_BLOCK
    if gfp & __GFP_MOVABLE:
        alloc_flags |= ALLOC_CMA  # gfp_to_alloc_flags_cma
    return alloc_flags


async def wake_all_kswapds(m, order: int, gfp: int, ac: AllocContext | None = None) -> None:
    """wake_all_kswapds -> wakeup_kswapd (mm/vmscan.c) of each node of the zonelist,
    which hands a high-order request that may not stall to kcompactd when kswapd cannot
    help (node balanced or hopeless)."""
    from kmm import vmscan_node
    for z in (ac.zones if ac is not None else (m.zone,)):
        await vmscan_node.wakeup_kswapd(m, order, gfp, z.nid)


async def __perform_reclaim(m, order: int, gfp: int) -> int:
    """__perform_reclaim: try_to_free_pages in the allocating task; pages reclaimed."""
    from kmm import vmscan_node
    return await vmscan_node.try_to_free_pages(m, order, gfp)


async def __alloc_pages_direct_reclaim(m, order: int, gfp: int, alloc_flags: int,
                                       purpose: str, ac: AllocContext | None = None
                                       ) -> tuple[int, int]:
    """__alloc_pages_direct_reclaim: reclaim, then one more attempt if it made progress
    (no per-CPU lists to drain). Returns (pfn or -1, pages reclaimed)."""
    progress = await __perform_reclaim(m, order, gfp)
    if not progress:
        return -1, 0
    return await get_page_from_freelist(m, order, gfp, alloc_flags, purpose, ac), progress


async def __alloc_pages_direct_compact(m, order: int, gfp: int, alloc_flags: int,
                                       purpose: str, prio, ac: AllocContext | None = None):
    """__alloc_pages_direct_compact: try_to_compact_pages, then an allocation attempt.
    compact_stall counts every run that was not skipped (a deferred one too),
    compact_success / compact_fail whether the allocation then succeeded.
    Returns (pfn or -1, enum compact_result)."""
    from kmm import compaction
    if not order:
        return -1, compaction.CompactResult.COMPACT_SKIPPED
    result = await compaction.try_to_compact_pages(m, order, gfp, alloc_flags, prio,
                                                   ac.zones if ac is not None else None)
    if result == compaction.CompactResult.COMPACT_SKIPPED:
        return -1, result
    ev = m.vmstat
    ev.count_vm_event("compact_stall")
    pfn = await get_page_from_freelist(m, order, gfp, alloc_flags, purpose, ac)
    if pfn >= 0:
        compaction.compaction_defer_reset(mmzone.page_zone(m, pfn), order, True)
        ev.count_vm_event("compact_success")
    else:
        ev.count_vm_event("compact_fail")
    return pfn, result


def zone_reclaimable_pages(m) -> int:
    """zone_reclaimable_pages (mm/vmscan.c): file LRU pages, and anon ones while swap
    has room."""
    from kmm import vmscan
    return vmscan.zone_reclaimable_pages(m)


def should_reclaim_retry(m, order: int, alloc_flags: int, did_some_progress: bool,
                         no_progress_loops: int, ac: AllocContext | None = None
                         ) -> tuple[bool, int]:
    """should_reclaim_retry: retry while reclaiming everything reclaimable could meet
    the min watermark in some zone of the zonelist, at most MAX_RECLAIM_RETRIES rounds
    without progress (costly orders count every round). Returns (retry,
    no_progress_loops). The reclaimable pages are the machine's (one LRU)."""
    if did_some_progress and order <= PAGE_ALLOC_COSTLY_ORDER:
        no_progress_loops = 0
    else:
        no_progress_loops += 1
    if no_progress_loops > MAX_RECLAIM_RETRIES:
        return False, no_progress_loops
    reclaimable = zone_reclaimable_pages(m)
    for z in (ac.zones if ac is not None else (m.zone,)):
        available = reclaimable + z.nr_free
        if z.zone_watermark_ok(order, z.wmark["min"], alloc_flags, available):
            return True, no_progress_loops
    return False, no_progress_loops


def should_compact_retry(m, order: int, alloc_flags: int, compact_result, prio,
                         retries: int, ac: AllocContext | None = None):
    """should_compact_retry: after a skipped run retry if compaction could now run;
    after a success (lost to a race) retry a few times; after a failure raise the
    priority down to MIN_COMPACT(_COSTLY)_PRIORITY. Returns (retry, prio, retries)."""
    from kmm import compaction
    CR = compaction.CompactResult
    if not order:
        return False, prio, retries
    if compact_result == CR.COMPACT_SKIPPED:  # compaction_zonelist_suitable
        ok = any(compaction.compaction_suitable(z, order, z.wmark_pages(alloc_flags))
                 for z in (ac.zones if ac is not None else (m.zone,)))
        return ok, prio, retries
    if compact_result == CR.COMPACT_SUCCESS:
        max_retries = MAX_COMPACT_RETRIES
        if order > PAGE_ALLOC_COSTLY_ORDER:
            max_retries //= 4
        retries += 1
        if retries <= max_retries:
            return True, prio, retries
    min_priority = (compaction.MIN_COMPACT_COSTLY_PRIORITY if order > PAGE_ALLOC_COSTLY_ORDER
                    else compaction.MIN_COMPACT_PRIORITY)
    if prio > min_priority:
        return True, prio - 1, 0
    return False, prio, retries


async def __alloc_pages_slowpath(m, order: int, gfp: int, purpose: str,
                                 ac: AllocContext | None = None) -> int:
    """__alloc_pages_slowpath, in the allocating actor's context. Returns pfn or -1."""
    from kmm import compaction
    CR = compaction.CompactResult
    can_direct_reclaim = bool(gfp & __GFP_DIRECT_RECLAIM)
    can_compact = gfp_compaction_allowed(gfp)
    costly_order = order > PAGE_ALLOC_COSTLY_ORDER
    compact_result = CR.COMPACT_SKIPPED
    compact_priority = compaction.DEF_COMPACT_PRIORITY
    compaction_retries = 0
    no_progress_loops = 0
    alloc_flags = gfp_to_alloc_flags(gfp, order)
    if alloc_flags & ALLOC_KSWAPD:
        await wake_all_kswapds(m, order, gfp, ac)
    pfn = await get_page_from_freelist(m, order, gfp, alloc_flags, purpose, ac)
    if pfn >= 0:
        return pfn
    # Costly orders (and unmovable high orders) try compaction before reclaim: there
    # are likely enough free base pages, just not together.
    if can_direct_reclaim and can_compact and (
            costly_order or (order > 0 and not gfp & __GFP_MOVABLE)):
        pfn, compact_result = await __alloc_pages_direct_compact(
            m, order, gfp, alloc_flags, purpose, compaction.INIT_COMPACT_PRIORITY, ac)
        if pfn >= 0:
            return pfn
        if costly_order and gfp & __GFP_NORETRY:
            # THP faults: if compaction could not even run (too little free memory, or
            # deferred after recent failures) reclaim is not worth it either
            if compact_result in (CR.COMPACT_SKIPPED, CR.COMPACT_DEFERRED):
                return -1
            compact_priority = compaction.INIT_COMPACT_PRIORITY  # stay async
    while True:  # retry:
        if alloc_flags & ALLOC_KSWAPD:
            await wake_all_kswapds(m, order, gfp, ac)
        if gfp & __GFP_MEMALLOC and not gfp & __GFP_NOMEMALLOC:  # __gfp_pfmemalloc_flags
            alloc_flags = ALLOC_NO_WATERMARKS | alloc_flags & (ALLOC_KSWAPD | ALLOC_CMA)
        pfn = await get_page_from_freelist(m, order, gfp, alloc_flags, purpose, ac)
        if pfn >= 0:
            return pfn
        if not can_direct_reclaim:
            return -1
        pfn, progress = await __alloc_pages_direct_reclaim(m, order, gfp, alloc_flags,
                                                           purpose, ac)
        if pfn >= 0:
            return pfn
        pfn, compact_result = await __alloc_pages_direct_compact(
            m, order, gfp, alloc_flags, purpose, compact_priority, ac)
        if pfn >= 0:
            return pfn
        if gfp & __GFP_NORETRY:
            return -1
        if costly_order and (not can_compact or not gfp & __GFP_RETRY_MAYFAIL):
            return -1
        retry, no_progress_loops = should_reclaim_retry(m, order, alloc_flags,
                                                        progress > 0, no_progress_loops, ac)
        if retry:
            continue
        if progress > 0 and can_compact:
            retry, compact_priority, compaction_retries = should_compact_retry(
                m, order, alloc_flags, compact_result, compact_priority, compaction_retries, ac)
            if retry:
                continue
        return -1  # __alloc_pages_may_oom: no OOM killer in the model


async def free_pages(m, pfn: int, order: int) -> None:
    """__free_pages: the page's last reference is gone; return it to the buddy lists."""
    await m.sched.call(mmzone.page_zone(m, pfn).actor, FreePages(pfn, order))


async def isolate_free_page(m, pfn: int, order: int) -> int:
    """__isolate_free_page, for compaction: a message to the zone actor. The pfn; -1
    if the block was allocated or merged meanwhile, -2 below the watermark."""
    reply = await m.sched.call(mmzone.page_zone(m, pfn).actor, IsolateFreePage(pfn, order))
    return reply.pfn
