"""The buddy page allocator: one zone, orders 0..10, as an actor.

mm/page_alloc.c. The zone is owned by the ``page_alloc`` actor; callers send it
``AllocPages``/``FreePages`` messages (runtime/msgs.py) and the handler runs under
``zone.lock``. Free lists are LIFO (the kernel takes from and adds to the list head).
Frames above ``untouched`` were never handed out and count as free order-10 blocks, so
start-up costs nothing whatever the memory size.

Watermarks follow ``__setup_per_zone_wmarks``: min from min_free_kbytes (raised by
khugepaged's ``set_recommended_min_free_kbytes`` while THP is enabled), low and high
``watermark_scale_factor`` above it. What the model leaves out: per-CPU page lists,
migrate types and pageblocks, zones other than Normal, memcg charging; reclaim and
compaction arrive through ``Zone.reclaim_hooks`` (the reclaim issue fills them in).
"""

from __future__ import annotations

from math import isqrt

from kmm.mm_types import PG_head, PGTY_buddy
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SIZE
from kmm.runtime.msgs import AllocPages, FreePages, PageReply

MAX_PAGE_ORDER = 10
NR_ORDERS = MAX_PAGE_ORDER + 1
MAX_BLOCK = 1 << MAX_PAGE_ORDER
pageblock_nr_pages = 1 << HPAGE_PMD_ORDER
MIGRATE_PCPTYPES = 3
WATERMARK_SCALE_FACTOR = 10  # /proc/sys/vm/watermark_scale_factor default

COST_RMQUEUE = 100  # ns

# gfp masks by name, with the two properties the model uses
GFP = {
    # name: (may wake kswapd, may direct reclaim/compact)
    "GFP_HIGHUSER_MOVABLE": (True, True),   # 4K anonymous pages
    "GFP_PGTABLE_USER": (True, True),       # page-table pages (GFP_KERNEL_ACCOUNT|__GFP_ZERO)
    "GFP_TRANSHUGE": (True, True),          # defrag stalls: direct reclaim + compaction
    "GFP_TRANSHUGE_DEFER": (True, False),   # defrag=defer: wake kswapd/kcompactd, no stall
    "GFP_TRANSHUGE_LIGHT": (False, False),  # no reclaim at all: fail fast
}


def min_free_kbytes(managed_pages: int, thp_enabled: bool) -> int:
    """calculate_min_free_kbytes, then khugepaged's set_recommended_min_free_kbytes."""
    lowmem_kbytes = managed_pages * PAGE_SIZE // 1024
    kb = max(128, min(isqrt(lowmem_kbytes * 16), 262144))
    if thp_enabled:
        nr_zones = 1
        recommended = pageblock_nr_pages * nr_zones * 2
        recommended += pageblock_nr_pages * nr_zones * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
        recommended = min(recommended, managed_pages // 20)  # at most 5% of memory
        kb = max(kb, recommended * PAGE_SIZE // 1024)
    return kb


class Zone:
    """struct zone (ZONE_NORMAL) with its free_area[] and watermarks."""

    def __init__(self, machine, nr_pages: int) -> None:
        self.machine = machine
        self.physmem = machine.physmem
        self.nr_pages = nr_pages
        self.free_area: list[dict[int, None]] = [{} for _ in range(NR_ORDERS)]
        self.free_order: dict[int, int] = {}  # block head pfn -> order, for every free block
        self.untouched = 0
        self.untouched_end = nr_pages - nr_pages % MAX_BLOCK
        self.nr_free = nr_pages
        self.managed = nr_pages
        # the tail beyond the last whole order-10 block goes on the lists at once
        pfn = self.untouched_end
        for order in range(MAX_PAGE_ORDER - 1, -1, -1):
            if pfn + (1 << order) <= nr_pages:
                self._add(pfn, order)
                pfn += 1 << order
        self.lock = machine.locks.spinlock("zone_lock", "zone.Normal")
        self.actor = machine.sched.server("page_alloc", self.handle, kind="allocator")
        self.reclaim_hooks = None  # (wakeup_kswapd, try_to_free_pages, try_to_compact)
        self.set_watermarks(thp_enabled=True)

    # ----------------------------------------------------------- watermarks
    def set_watermarks(self, thp_enabled: bool) -> None:
        """__setup_per_zone_wmarks."""
        self.min_free_kbytes = min_free_kbytes(self.managed, thp_enabled)
        wmin = self.min_free_kbytes * 1024 // PAGE_SIZE
        step = max(wmin // 4, self.managed * WATERMARK_SCALE_FACTOR // 10000)
        self.wmark = {"min": wmin, "low": wmin + step, "high": wmin + 2 * step}

    def zone_watermark_ok(self, order: int, mark: int) -> bool:
        """__zone_watermark_ok: enough free pages above the mark, and a block of the order."""
        if self.nr_free - (1 << order) + 1 <= mark:
            return False
        if order == 0:
            return True
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
        raise TypeError(f"page_alloc: unexpected message {msg!r}")

    async def _alloc(self, msg: AllocPages) -> int:
        """__alloc_pages: fast path at the low mark; slow path per gfp; prep_new_page."""
        order = msg.order
        wake_kswapd, may_reclaim = GFP[msg.gfp]
        pfn = await self._get_page_from_freelist(order, self.wmark["low"])
        if pfn < 0:
            hooks = self.reclaim_hooks
            if wake_kswapd and hooks is not None:
                await hooks.wakeup_kswapd(order)
            pfn = await self._get_page_from_freelist(order, self.wmark["min"])
            if pfn < 0 and may_reclaim and hooks is not None:
                pfn = await hooks.direct_reclaim_compact(self, order, msg.gfp)
        sched = self.machine.sched
        if pfn < 0:
            if sched.fast:
                sched.tick(1)
            else:
                await sched.point("mm_page_alloc_fail", order=order, gfp=msg.gfp,
                                  purpose=msg.purpose)
            return -1
        self._prep_new_page(pfn, order)
        if sched.fast:
            sched.tick(1)
        else:
            await sched.point("mm_page_alloc", pfn=pfn, order=order, gfp=msg.gfp,
                              purpose=msg.purpose)
        self.machine.vmstat.count_vm_event("pgalloc_normal", 1 << order)
        return pfn

    async def _get_page_from_freelist(self, order: int, mark: int) -> int:
        if not self.zone_watermark_ok(order, mark):
            return -1
        await self.lock.lock("rmqueue")
        pfn = self._rmqueue_smallest(order)
        if self.machine.sched.fast:
            self.machine.sched.tick(COST_RMQUEUE)
        else:
            await self.machine.sched.point("rmqueue", COST_RMQUEUE, order=order, pfn=pfn)
        await self.lock.unlock()
        return pfn

    def _prep_new_page(self, pfn: int, order: int) -> None:
        """prep_new_page / prep_compound_page: refcount 1; a head for order > 0."""
        pages = self.physmem.pages
        for p in range(pfn, pfn + (1 << order)):
            pages.pop(p, None)  # tails are created lazily, pointing at the head
        head = self.physmem.page(pfn)
        head.refcount = 1
        if order:
            head.flags = PG_head
            head.order = order

    async def _free(self, pfn: int, order: int) -> None:
        """free_pages_prepare + __free_one_page under zone->lock."""
        pages = self.physmem.pages
        head = pages.get(pfn)
        if head is not None and (head.refcount or head.mapcount or head.entire_mapcount):
            self.machine.bug(f"freeing in-use page pfn={pfn:#x}: {head!r}")
        for p in range(pfn, pfn + (1 << order)):
            pages.pop(p, None)
        self.physmem.clear(pfn, 1 << order)
        await self.lock.lock("free_one_page")
        self._free_one_page(pfn, order)
        if self.machine.sched.fast:
            self.machine.sched.tick(COST_RMQUEUE)
        else:
            await self.machine.sched.point("mm_page_free", COST_RMQUEUE, pfn=pfn, order=order)
        await self.lock.unlock()
        self.machine.vmstat.count_vm_event("pgfree", 1 << order)

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

    def is_free(self, pfn: int) -> bool:
        if self.untouched <= pfn < self.untouched_end:
            return True
        for order in range(NR_ORDERS):
            head = pfn & ~((1 << order) - 1)
            if self.free_order.get(head) == order:
                return True
        return False


async def alloc_pages(m, order: int, gfp: str, purpose: str) -> int:
    """alloc_pages: a message to the page_alloc actor. Returns the pfn, or -1."""
    reply = await m.sched.call(m.zone.actor, AllocPages(order, gfp, purpose))
    return reply.pfn


async def free_pages(m, pfn: int, order: int) -> None:
    """__free_pages: the page's last reference is gone; return it to the buddy lists."""
    await m.sched.call(m.zone.actor, FreePages(pfn, order))

