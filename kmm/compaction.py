"""Memory compaction: mm/compaction.c.

``compact_zone`` runs two scanners towards each other: the migrate scanner from the
zone's start isolates movable pages (order-0 anonymous folios on the LRU) a pageblock at
a time, at most COMPACT_CLUSTER_MAX per round; the free scanner from the zone's end
isolates free buddy blocks (whole, at their order, as 6.18 does) to move them into; and
``migrate.migrate_pages`` moves each folio through migration entries. The run ends when
a free block of the requested order exists (``compact_finished``) or the scanners meet.
Direct compaction (``try_to_compact_pages``, from the allocation slow path) runs async
first: a pageblock holding anything it cannot isolate is abandoned at once
(skip_on_failure). kcompactd and direct compaction at a raised priority run
MIGRATE_SYNC_LIGHT and move what they can even from such blocks. A run that fails at
sync priority defers the next ones (``defer_compaction``: 1, 2, 4 ... 64 attempts).
Large folios are never isolated for an order-9 request (skip_isolation_on_order), so
compaction does not migrate THPs and counts no thp_migration_*.

Left out: the pageblock skip bits (PB_migrate_skip) and their reset, the fast searches
(fast_find_migrateblock, fast_isolate_freepages), migrate types (every pageblock is
movable), capture of a freed page, proactive compaction, and the too_many_isolated
throttle. Free pages are isolated before migrate_pages starts, as many as the folios
to move (compaction_alloc isolates them lazily; the result is the same). Emulated cost:
COST_SCAN_PFN per pfn either scanner looks at (a free block or a large folio skipped at
once is one look), plus the locks, allocator messages and page-table work of isolation
and migration.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from kmm import atomic, migrate, mmzone, page_alloc, swap, wait
from kmm.cost import COST_SCAN_PFN
from kmm.gfp import GFP_KERNEL, PAGE_ALLOC_COSTLY_ORDER, gfp_compaction_allowed
from kmm.mm_types import PG_head, PG_lru, PG_swapcache, PG_dirty, PG_writeback
from kmm.page_alloc import (
    ALLOC_CMA, ALLOC_WMARK_MIN, NR_ORDERS, pageblock_nr_pages, pageblock_order,
)

COMPACT_CLUSTER_MAX = 32       # SWAP_CLUSTER_MAX
COMPACT_MAX_DEFER_SHIFT = 6
COMPACTION_HPAGE_ORDER = pageblock_order
sysctl_extfrag_threshold = 500  # /proc/sys/vm/extfrag_threshold
KCOMPACTD_WAIT = "kcompactd_wait"


class CompactResult(IntEnum):
    """enum compact_result, in the kernel's order (try_to_compact_pages takes the max)."""
    COMPACT_NOT_SUITABLE_ZONE = 0
    COMPACT_SKIPPED = 1
    COMPACT_DEFERRED = 2
    COMPACT_NO_SUITABLE_PAGE = 3
    COMPACT_CONTINUE = 4
    COMPACT_COMPLETE = 5
    COMPACT_PARTIAL_SKIPPED = 6
    COMPACT_CONTENDED = 7
    COMPACT_SUCCESS = 8


class CompactPriority(IntEnum):
    """enum compact_priority: lower is more thorough."""
    COMPACT_PRIO_SYNC_FULL = 0
    COMPACT_PRIO_SYNC_LIGHT = 1
    COMPACT_PRIO_ASYNC = 2


MIN_COMPACT_PRIORITY = CompactPriority.COMPACT_PRIO_SYNC_FULL
MIN_COMPACT_COSTLY_PRIORITY = CompactPriority.COMPACT_PRIO_SYNC_LIGHT
DEF_COMPACT_PRIORITY = CompactPriority.COMPACT_PRIO_SYNC_LIGHT
INIT_COMPACT_PRIORITY = CompactPriority.COMPACT_PRIO_ASYNC

# enum migrate_mode
MIGRATE_ASYNC, MIGRATE_SYNC_LIGHT, MIGRATE_SYNC = 0, 1, 2


class IsolateMigrate(IntEnum):
    """isolate_migrate_t."""
    ISOLATE_ABORT = 0
    ISOLATE_NONE = 1
    ISOLATE_SUCCESS = 2


CR = CompactResult


class CompactControl:
    """struct compact_control: one compaction run over the zone."""

    __slots__ = (
        "zone", "order", "gfp_mask", "mode", "alloc_flags", "direct_compaction", "whole_zone",
        "ignore_block_suitable", "finish_pageblock", "contended", "migrate_pfn",
        "free_pfn", "freepages", "nr_freepages", "migratepages", "nr_migratepages",
        "total_migrate_scanned", "total_free_scanned", "alloc_failed",
    )

    def __init__(self, zone, order: int, gfp_mask: int, mode: int, alloc_flags: int,
                 direct_compaction: bool, whole_zone: bool = False,
                 ignore_block_suitable: bool = False) -> None:
        self.zone = zone
        self.order = order
        self.gfp_mask = gfp_mask
        self.mode = mode
        self.alloc_flags = alloc_flags
        self.direct_compaction = direct_compaction
        self.whole_zone = whole_zone
        self.ignore_block_suitable = ignore_block_suitable
        self.finish_pageblock = False
        self.contended = False
        self.migrate_pfn = 0
        self.free_pfn = 0
        self.freepages: list[deque[int]] = [deque() for _ in range(NR_ORDERS)]
        self.nr_freepages = 0
        self.migratepages: list = []
        self.nr_migratepages = 0
        self.total_migrate_scanned = 0
        self.total_free_scanned = 0
        self.alloc_failed = False


def pageblock_start_pfn(pfn: int) -> int:
    return pfn & ~(pageblock_nr_pages - 1)


def pageblock_end_pfn(pfn: int) -> int:
    """ALIGN(pfn + 1, pageblock_nr_pages)."""
    return pageblock_start_pfn(pfn) + pageblock_nr_pages


def block_end_pfn(pfn: int, order: int) -> int:
    return (pfn & ~((1 << order) - 1)) + (1 << order)


def compact_gap(order: int) -> int:
    """compact_gap: free pages compaction needs beyond the watermark (2 << order: room
    for the targets while the sources are still held)."""
    return 2 << order


# ------------------------------------------------------------- suitability
def fragmentation_index(zone, order: int) -> int:
    """fragmentation_index: towards 0 a failure would be for lack of memory, towards
    1000 for fragmentation; -1000 when a block of the order is free."""
    total = free_pages = suitable = 0
    for o, n in enumerate(zone.buddyinfo()):  # fill_contig_page_info
        total += n
        free_pages += n << o
        if o >= order:
            suitable += n << (o - order)
    if not total:
        return 0
    if suitable:
        return -1000
    return 1000 - (1000 + free_pages * 1000 // (1 << order)) // total


def __compaction_suitable(zone, order: int, watermark: int, free_pages: int) -> bool:
    """Room for compaction: the order-0 watermark plus compact_gap (plus low - min for
    costly orders) must hold, or the free scanner would find too few targets."""
    watermark += compact_gap(order)
    if order > PAGE_ALLOC_COSTLY_ORDER:
        watermark += zone.wmark["low"] - zone.wmark["min"]
    return zone.zone_watermark_ok(0, watermark, ALLOC_CMA, free_pages)


def compaction_suitable(zone, order: int, watermark: int) -> bool:
    """compaction_suitable: __compaction_suitable, and for costly orders only if a
    failure would be due to fragmentation (fragmentation_index above
    extfrag_threshold), not to a lack of memory."""
    suitable = __compaction_suitable(zone, order, watermark, zone.nr_free)
    if suitable and order > PAGE_ALLOC_COSTLY_ORDER:
        fragindex = fragmentation_index(zone, order)
        if 0 <= fragindex <= sysctl_extfrag_threshold:
            suitable = False
    return suitable


def compaction_suit_allocation_order(zone, order: int, alloc_flags: int, async_: bool,
                                     kcompactd: bool) -> CompactResult:
    """compaction_suit_allocation_order: COMPACT_SUCCESS if the allocation would
    already succeed, COMPACT_SKIPPED if compaction is unlikely to help, else
    COMPACT_CONTINUE."""
    watermark = zone.wmark_pages(alloc_flags)
    if zone.zone_watermark_ok(order, watermark, alloc_flags):
        return CR.COMPACT_SUCCESS
    if order > PAGE_ALLOC_COSTLY_ORDER and async_ and not alloc_flags & ALLOC_CMA:
        if not zone.zone_watermark_ok(0, watermark + compact_gap(order)):
            return CR.COMPACT_SKIPPED
    if not compaction_suitable(zone, order, watermark):
        return CR.COMPACT_SKIPPED
    return CR.COMPACT_CONTINUE


# ---------------------------------------------------------------- deferral
def defer_compaction(zone, order: int) -> None:
    """defer_compaction: after a failure, skip the next 1 << compact_defer_shift
    attempts at this order or above (the shift grows to COMPACT_MAX_DEFER_SHIFT)."""
    zone.compact_considered = 0
    zone.compact_defer_shift = min(zone.compact_defer_shift + 1, COMPACT_MAX_DEFER_SHIFT)
    if order < zone.compact_order_failed:
        zone.compact_order_failed = order


def compaction_deferred(zone, order: int) -> bool:
    """compaction_deferred: True if this attempt is to be skipped (and counted)."""
    defer_limit = 1 << zone.compact_defer_shift
    if order < zone.compact_order_failed:
        return False
    zone.compact_considered += 1
    if zone.compact_considered >= defer_limit:
        zone.compact_considered = defer_limit
        return False
    return True


def compaction_defer_reset(zone, order: int, alloc_success: bool) -> None:
    """compaction_defer_reset: compaction of this order worked (or will): forget the
    backoff when the allocation did succeed; orders up to this one may run again."""
    if alloc_success:
        zone.compact_considered = 0
        zone.compact_defer_shift = 0
    if order >= zone.compact_order_failed:
        zone.compact_order_failed = order + 1


def compaction_restarting(zone, order: int) -> bool:
    """compaction_restarting: the backoff ran its full length at this order."""
    if order < zone.compact_order_failed:
        return False
    return (zone.compact_defer_shift == COMPACT_MAX_DEFER_SHIFT
            and zone.compact_considered >= 1 << zone.compact_defer_shift)


# --------------------------------------------------------- migrate scanner
def skip_isolation_on_order(order: int, target_order: int) -> bool:
    """skip_isolation_on_order: moving a folio as large as the target (or a pageblock)
    cannot help form the target."""
    return (target_order != -1 and order >= target_order) or order >= pageblock_order


def _compound_head(pages, pfn: int):
    """The head page of the large folio covering pfn (tails are created lazily)."""
    for order in range(1, NR_ORDERS):
        hp = pages.get(pfn & ~((1 << order) - 1))
        if hp is not None and hp.head == hp.pfn and hp.order >= order:
            return hp
    return None


def update_cached_migrate(cc: CompactControl, pfn: int) -> None:
    """update_cached_migrate: where the async (and sync) migrate scanner restarts."""
    zone = cc.zone
    pfn = pageblock_end_pfn(pfn)
    if pfn > zone.compact_cached_migrate_pfn[0]:
        zone.compact_cached_migrate_pfn[0] = pfn
    if cc.mode != MIGRATE_ASYNC and pfn > zone.compact_cached_migrate_pfn[1]:
        zone.compact_cached_migrate_pfn[1] = pfn


async def _putback_movable_pages(m, cc: CompactControl) -> None:
    for folio in cc.migratepages:
        await swap.folio_putback_lru(m, folio)
    cc.migratepages = []
    cc.nr_migratepages = 0


async def isolate_migratepages_block(m, cc: CompactControl, low_pfn: int,
                                     end_pfn: int) -> None:
    """isolate_migratepages_block: isolate LRU folios in [low_pfn, end_pfn): order-0
    ones and mTHPs below the target order (skip_isolation_on_order), skipping free
    blocks and larger folios, up to COMPACT_CLUSTER_MAX pages unless the block
    is to be finished. Async direct compaction gives up on a cc->order block at the
    first page it cannot isolate and puts back what it took there."""
    zone = cc.zone
    pages = m.physmem.pages
    start_pfn = low_pfn
    nr_scanned = nr_isolated = steps = 0
    skip_on_failure = cc.direct_compaction and cc.mode == MIGRATE_ASYNC
    next_skip_pfn = block_end_pfn(low_pfn, cc.order) if skip_on_failure else 0
    while low_pfn < end_pfn:
        if skip_on_failure and low_pfn >= next_skip_pfn:
            if nr_isolated:
                break  # a whole cc->order block isolated: migrate it now
            next_skip_pfn = block_end_pfn(low_pfn, cc.order)
        nr_scanned += 1
        steps += 1
        page = pages.get(low_pfn)
        if page is None or not page.refcount:
            blk = zone.free_block_at(low_pfn)  # PageBuddy: skip the free block
            if blk is not None:
                skip = blk[0] + (1 << blk[1]) - low_pfn
                low_pfn += skip
                nr_scanned += skip - 1
                continue
        ok = False
        if page is None or page.head != low_pfn:
            head = _compound_head(pages, low_pfn)
            if head is not None:  # a tail: skip the rest of its folio
                skip = head.pfn + head.nr_pages - low_pfn - 1
                low_pfn += skip
                nr_scanned += skip
        elif page.flags & PG_head and skip_isolation_on_order(page.order, cc.order):
            skip = page.nr_pages - 1
            low_pfn += skip
            nr_scanned += skip
        elif page.flags & PG_head and page.order < 2:
            pass  # order-1 folios are not anonymous THPs here: nothing makes them
        elif not page.flags & PG_lru:
            pass  # page tables, kernel allocations, isolated folios: unmovable here
        elif not page.flags & PG_swapcache and page.refcount > (
                page.large_mapcount if page.order else page.mapcount):
            pass  # pinned, or mid-fault: migration would fail
        elif cc.mode == MIGRATE_ASYNC and page.flags & PG_writeback:
            pass
        elif (cc.mode == MIGRATE_ASYNC and page.flags & PG_dirty and page.lock is not None
              and page.lock.is_locked()):
            pass  # async isolation needs folio_trylock for a dirty folio
        else:
            ok = await swap.folio_isolate_lru(m, page)
        if ok:  # an mTHP below the target order moves whole (6.18 isolates it too)
            nr = page.nr_pages
            cc.migratepages.append(page)
            cc.nr_migratepages += nr
            nr_isolated += nr
            nr_scanned += nr - 1
            low_pfn += nr
            if cc.nr_migratepages >= COMPACT_CLUSTER_MAX and not cc.finish_pageblock \
                    and not cc.contended:
                break
            continue
        # isolate_fail:
        if skip_on_failure:
            if nr_isolated:
                await _putback_movable_pages(m, cc)
                nr_isolated = 0
            if low_pfn < next_skip_pfn:
                low_pfn = next_skip_pfn - 1
                next_skip_pfn += 1 << cc.order
        low_pfn += 1
    low_pfn = min(low_pfn, end_pfn)
    if low_pfn == end_pfn and (not nr_isolated or cc.finish_pageblock):
        update_cached_migrate(cc, low_pfn)
    cc.total_migrate_scanned += nr_scanned
    if nr_isolated:
        m.vmstat.count_vm_event("compact_isolated", nr_isolated)
    cc.migrate_pfn = low_pfn
    await atomic.point(m.sched, "mm_compaction_isolate_migratepages", steps * COST_SCAN_PFN,
                 start_pfn=start_pfn, end_pfn=low_pfn, nr_scanned=nr_scanned,
                 nr_taken=nr_isolated)


async def isolate_migratepages(m, cc: CompactControl) -> IsolateMigrate:
    """isolate_migratepages: scan the next pageblock below the free scanner."""
    low_pfn = cc.migrate_pfn
    block_end = pageblock_end_pfn(low_pfn)
    if block_end <= cc.free_pfn:
        await isolate_migratepages_block(m, cc, low_pfn, block_end)
    return IsolateMigrate.ISOLATE_SUCCESS if cc.nr_migratepages else IsolateMigrate.ISOLATE_NONE


# ------------------------------------------------------------ free scanner
def suitable_migration_target(cc: CompactControl, pfn: int) -> bool:
    """suitable_migration_target: not a block whose first page starts a free block of
    cc->order or more (that is what compaction wants to make, not to fill)."""
    zone = cc.zone
    if zone.untouched <= pfn < zone.untouched_end:
        return False
    order = zone.free_order.get(pfn)
    if order is not None and order >= (cc.order if cc.order > 0 else pageblock_order):
        return False
    return True  # every pageblock is MIGRATE_MOVABLE in the model


async def isolate_freepages_block(m, cc: CompactControl, start_pfn: int, end_pfn: int,
                                  stride: int) -> tuple[int, int]:
    """isolate_freepages_block: take free blocks (whole, at their order) from
    [start_pfn, end_pfn), looking at every stride-th pfn, until there are as many free
    pages as pages to migrate. Returns (pages isolated, pfn reached)."""
    zone = cc.zone
    pages = m.physmem.pages
    nr_scanned = total = steps = 0
    blockpfn = start_pfn
    while blockpfn < end_pfn:
        nr_scanned += 1
        steps += 1
        page = pages.get(blockpfn)
        if page is not None and page.head == blockpfn and page.flags & PG_head:
            n = page.nr_pages
            if blockpfn + n <= end_pfn:  # skip a compound page at once
                blockpfn += n - 1
                nr_scanned += n - 1
            blockpfn += stride
            continue
        order = zone.free_order.get(blockpfn)
        if order is None:
            blockpfn += stride
            continue
        got = await page_alloc.isolate_free_page(m, blockpfn, order)
        if got == -2:
            break  # below the watermark: stop taking free pages
        if got < 0:
            blockpfn += stride  # allocated meanwhile
            continue
        isolated = 1 << order
        nr_scanned += isolated - 1
        total += isolated
        cc.nr_freepages += isolated
        cc.freepages[order].append(blockpfn)
        if cc.nr_migratepages <= cc.nr_freepages:
            blockpfn += isolated
            break
        blockpfn += isolated - 1 + stride
    blockpfn = min(blockpfn, end_pfn)
    cc.total_free_scanned += nr_scanned
    if total:
        m.vmstat.count_vm_event("compact_isolated", total)
    await atomic.point(m.sched, "mm_compaction_isolate_freepages", steps * COST_SCAN_PFN,
                 start_pfn=start_pfn, end_pfn=blockpfn, nr_scanned=nr_scanned,
                 nr_taken=total)
    return total, blockpfn


async def isolate_freepages(m, cc: CompactControl) -> None:
    """isolate_freepages: walk pageblocks down from cc->free_pfn to the migrate
    scanner's block, isolating free pages until there are enough targets."""
    zone = cc.zone
    isolate_start = cc.free_pfn
    block_start = pageblock_start_pfn(isolate_start)
    block_end = min(block_start + pageblock_nr_pages, zone.zone_end_pfn)
    low_pfn = pageblock_end_pfn(cc.migrate_pfn)
    stride = COMPACT_CLUSTER_MAX if cc.mode == MIGRATE_ASYNC else 1
    while block_start >= low_pfn:
        if zone.untouched <= block_start < zone.untouched_end:
            # never-touched memory: free order-10 blocks, none a target; jump below
            block_start = max(zone.untouched, low_pfn) - pageblock_nr_pages
            block_end = block_start + pageblock_nr_pages
            isolate_start = block_start
            continue
        if suitable_migration_target(cc, block_start):
            nr_isolated, isolate_start = await isolate_freepages_block(
                m, cc, isolate_start, block_end, stride)
            if isolate_start == block_end:  # update_pageblock_skip
                nxt = block_start - pageblock_nr_pages
                if nxt < zone.compact_cached_free_pfn:
                    zone.compact_cached_free_pfn = nxt
            if cc.nr_freepages >= cc.nr_migratepages:
                if isolate_start >= block_end:
                    isolate_start = block_start - pageblock_nr_pages
                break
            if isolate_start < block_end:
                break  # isolation failed early (the watermark)
            stride = 1 if nr_isolated else min(COMPACT_CLUSTER_MAX, stride << 1)
        block_end = block_start
        block_start -= pageblock_nr_pages
        isolate_start = block_start
    cc.free_pfn = isolate_start


def compaction_alloc(m, cc: CompactControl, src) -> int:
    """compaction_alloc: the migration target for src, from the isolated free blocks
    (the smallest that fits; a larger one is split and its upper halves kept).
    Returns the pfn, prepared as an allocation (refcount 1), or -1."""
    order = src.order
    for start in range(order, NR_ORDERS):
        if cc.freepages[start]:
            break
    else:
        cc.alloc_failed = True
        return -1
    pfn = cc.freepages[start].popleft()
    size = 1 << start
    while start > order:
        start -= 1
        size >>= 1
        cc.freepages[start].appendleft(pfn + size)
    cc.zone._prep_new_page(pfn, order)
    cc.nr_freepages -= 1 << order
    cc.nr_migratepages -= 1 << order
    return pfn


async def release_free_list(m, cc: CompactControl) -> int:
    """release_free_list: the free pages left over go back to the buddy. Returns the
    highest pfn released (0 if none)."""
    high = 0
    for order, lst in enumerate(cc.freepages):
        while lst:
            pfn = lst.popleft()
            await page_alloc.free_pages(m, pfn, order)
            high = max(high, pfn)
    cc.nr_freepages = 0
    return high


# ------------------------------------------------------------- compact_zone
def compact_scanners_met(cc: CompactControl) -> bool:
    return cc.free_pfn >> pageblock_order <= cc.migrate_pfn >> pageblock_order


def __compact_finished(cc: CompactControl) -> CompactResult:
    zone = cc.zone
    if compact_scanners_met(cc):
        zone.reset_cached_positions()  # the next run starts anew
        return CR.COMPACT_COMPLETE if cc.whole_zone else CR.COMPACT_PARTIAL_SKIPPED
    if cc.migrate_pfn & (pageblock_nr_pages - 1):
        return CR.COMPACT_CONTINUE  # always finish a pageblock
    if zone.has_free_block(cc.order):
        return CR.COMPACT_SUCCESS
    return CR.COMPACT_CONTENDED if cc.contended else CR.COMPACT_NO_SUITABLE_PAGE


def compact_finished(cc: CompactControl) -> CompactResult:
    ret = __compact_finished(cc)
    return CR.COMPACT_CONTINUE if ret == CR.COMPACT_NO_SUITABLE_PAGE else ret


async def compact_zone(m, cc: CompactControl) -> CompactResult:
    """compact_zone: run both scanners until a free block of cc->order exists or they
    meet. Counts compact_migrate_scanned and compact_free_scanned."""
    zone = cc.zone
    start_pfn, end_pfn = zone.zone_start_pfn, zone.zone_end_pfn
    sync = cc.mode != MIGRATE_ASYNC
    ret = compaction_suit_allocation_order(zone, cc.order, cc.alloc_flags,
                                           cc.mode == MIGRATE_ASYNC, not cc.direct_compaction)
    if ret != CR.COMPACT_CONTINUE:
        return ret
    if cc.whole_zone:
        cc.migrate_pfn = start_pfn
        cc.free_pfn = pageblock_start_pfn(end_pfn - 1)
    else:
        cc.migrate_pfn = zone.compact_cached_migrate_pfn[sync]
        cc.free_pfn = zone.compact_cached_free_pfn
        if not start_pfn <= cc.free_pfn < end_pfn:
            cc.free_pfn = zone.compact_cached_free_pfn = pageblock_start_pfn(end_pfn - 1)
        if not start_pfn <= cc.migrate_pfn < end_pfn:
            cc.migrate_pfn = start_pfn
            zone.compact_cached_migrate_pfn = [start_pfn, start_pfn]
        if cc.migrate_pfn <= zone.compact_init_migrate_pfn:
            cc.whole_zone = True
    last_migrated_pfn = 0
    update_cached = not sync and (zone.compact_cached_migrate_pfn[0]
                                  == zone.compact_cached_migrate_pfn[1])
    await atomic.point(m.sched, "mm_compaction_begin", 1, order=cc.order, mode=cc.mode,
                 migrate_pfn=cc.migrate_pfn, free_pfn=cc.free_pfn)
    while (ret := compact_finished(cc)) == CR.COMPACT_CONTINUE:
        iteration_start_pfn = cc.migrate_pfn
        # a block migrated from last round is scanned to its end this time
        cc.finish_pageblock = (pageblock_start_pfn(last_migrated_pfn)
                               == pageblock_start_pfn(iteration_start_pfn))
        while True:  # rescan:
            if await isolate_migratepages(m, cc) == IsolateMigrate.ISOLATE_NONE:
                if update_cached:
                    zone.compact_cached_migrate_pfn[1] = zone.compact_cached_migrate_pfn[0]
                break
            update_cached = False
            last_migrated_pfn = max(start_pfn, pageblock_start_pfn(cc.migrate_pfn - 1))
            # compaction_alloc isolates more free pages whenever its lists run dry
            while cc.nr_freepages < cc.nr_migratepages and not compact_scanners_met(cc):
                nr, pfn = cc.nr_freepages, cc.free_pfn
                await isolate_freepages(m, cc)
                if (cc.nr_freepages, cc.free_pfn) == (nr, pfn):
                    break
            folios, cc.migratepages = cc.migratepages, []
            cc.alloc_failed = False
            _, failed = await migrate.migrate_pages(
                m, folios, lambda f: compaction_alloc(m, cc, f), "compaction")
            cc.nr_migratepages = 0
            if not failed:
                break
            if cc.alloc_failed and not compact_scanners_met(cc):
                ret = CR.COMPACT_CONTENDED  # -ENOMEM: no target though the scanners go on
                break
            if (cc.migrate_pfn & (pageblock_nr_pages - 1) and not cc.finish_pageblock
                    and cc.mode < MIGRATE_SYNC):
                # scan the rest of the block now rather than revisit it
                cc.finish_pageblock = True
                if cc.order == COMPACTION_HPAGE_ORDER:
                    last_migrated_pfn = 0
                continue
            break
        if ret == CR.COMPACT_CONTENDED:
            break
    if cc.nr_freepages > 0:
        free_pfn = pageblock_start_pfn(await release_free_list(m, cc))
        if free_pfn > zone.compact_cached_free_pfn:
            zone.compact_cached_free_pfn = free_pfn
    ev = m.vmstat
    ev.count_vm_event("compact_migrate_scanned", cc.total_migrate_scanned)
    ev.count_vm_event("compact_free_scanned", cc.total_free_scanned)
    await atomic.point(m.sched, "mm_compaction_end", 1, order=cc.order, status=ret.name)
    return ret


async def compact_zone_order(m, order: int, gfp_mask: int, prio: CompactPriority,
                             alloc_flags: int, zone=None) -> CompactResult:
    """compact_zone_order: direct compaction of a zone (node 0's by default) at a
    priority (async, or sync-light; sync-full scans the whole zone and every block)."""
    full = prio == MIN_COMPACT_PRIORITY
    cc = CompactControl(zone or m.zone, order, gfp_mask,
                        MIGRATE_ASYNC if prio == CompactPriority.COMPACT_PRIO_ASYNC
                        else MIGRATE_SYNC_LIGHT,
                        alloc_flags, direct_compaction=True, whole_zone=full,
                        ignore_block_suitable=full)
    return await compact_zone(m, cc)


async def try_to_compact_pages(m, order: int, gfp_mask: int, alloc_flags: int,
                               prio: CompactPriority, zones=None) -> CompactResult:
    """try_to_compact_pages: direct compaction for the slow path, zone by zone of the
    allocation's zonelist (``zones``; node 0's zone by default) until one succeeds.
    Deferred at all but the highest priority while recent runs failed; a failed sync
    run defers the next."""
    if not gfp_compaction_allowed(gfp_mask):
        return CR.COMPACT_SKIPPED
    rc = CR.COMPACT_SKIPPED
    await atomic.point(m.sched, "mm_compaction_try_to_compact_pages", 1, order=order,
                       prio=prio.name)
    for zone in zones or (m.zone,):
        if prio > MIN_COMPACT_PRIORITY and compaction_deferred(zone, order):
            rc = max(CR.COMPACT_DEFERRED, rc)
            continue
        status = await compact_zone_order(m, order, gfp_mask, prio, alloc_flags, zone)
        rc = max(status, rc)
        if status == CR.COMPACT_SUCCESS:
            compaction_defer_reset(zone, order, False)
            break
        if prio != CompactPriority.COMPACT_PRIO_ASYNC and status in (
                CR.COMPACT_COMPLETE, CR.COMPACT_PARTIAL_SKIPPED):
            defer_compaction(zone, order)
    return rc


# ---------------------------------------------------------------- kcompactd
def kcompactd_work_requested(m, nid: int = 0) -> bool:
    """kcompactd_work_requested: an order is waiting for node ``nid``'s kcompactd."""
    return m.node_data[nid].zone.kcompactd_max_order > 0


def kcompactd_node_suitable(m, nid: int = 0) -> bool:
    """kcompactd_node_suitable: compaction at the requested order could run."""
    z = m.node_data[nid].zone
    return compaction_suit_allocation_order(z, z.kcompactd_max_order, ALLOC_WMARK_MIN,
                                            False, True) == CR.COMPACT_CONTINUE


def wakeup_kcompactd(m, order: int, nid: int = 0) -> None:
    """wakeup_kcompactd: record the order, and wake node ``nid``'s kcompactd if it
    sleeps and the node could be compacted for it."""
    if not order:
        return
    z = m.node_data[nid].zone
    if z.kcompactd_max_order < order:
        z.kcompactd_max_order = order
    wq = mmzone.node_wq(KCOMPACTD_WAIT, nid)
    if not wait.wq_has_sleeper(m, wq):
        return
    if not kcompactd_node_suitable(m, nid):
        return
    wait.wake_up(m, wq)


async def kcompactd_do_work(m, nid: int = 0) -> CompactResult:
    """kcompactd_do_work: one sync-light compaction of node ``nid``'s zone for the
    requested order, unless deferred or unsuitable; then the request is done. Counts
    compact_daemon_wake and the compact_daemon_*_scanned events."""
    z = m.node_data[nid].zone
    cc = CompactControl(z, z.kcompactd_max_order, GFP_KERNEL, MIGRATE_SYNC_LIGHT,
                        ALLOC_WMARK_MIN, direct_compaction=False)
    ev = m.vmstat
    ev.count_vm_event("compact_daemon_wake")
    await atomic.point(m.sched, "mm_compaction_kcompactd_wake", 1, order=cc.order)
    status = CR.COMPACT_SKIPPED
    if (not compaction_deferred(z, cc.order) and compaction_suit_allocation_order(
            z, cc.order, cc.alloc_flags, False, True) == CR.COMPACT_CONTINUE):
        status = await compact_zone(m, cc)
        if status == CR.COMPACT_SUCCESS:
            compaction_defer_reset(z, cc.order, False)
        elif status in (CR.COMPACT_PARTIAL_SKIPPED, CR.COMPACT_COMPLETE):
            defer_compaction(z, cc.order)
        ev.count_vm_event("compact_daemon_migrate_scanned", cc.total_migrate_scanned)
        ev.count_vm_event("compact_daemon_free_scanned", cc.total_free_scanned)
    if z.kcompactd_max_order <= cc.order:
        z.kcompactd_max_order = 0
    return status
