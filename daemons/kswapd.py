"""kswapd: the background reclaim daemon (the kswapd() loop of mm/vmscan.c), as policy.

It sleeps on the ``kswapd_wait`` waitqueue until the allocator's wakeup_kswapd finds
the zone below its low watermark, then runs ``balance_pgdat`` (reclaim at falling
priority) until free pages are back above the high watermark for the order asked, and
tries to sleep again: first a short nap (HZ/10) to see whether the balance holds, then
a full sleep until the next wake-up. A wake-up during the nap means the low watermark
was hit quickly (``kswapd_low_wmark_hit_quickly``); finding the zone unbalanced again
right after the nap, the high one (``kswapd_high_wmark_hit_quickly``).

Written against kmm.daemon only. Left out: the freezer, kthread_should_stop, the
per-CPU vmstat threshold switch, the highest zone index (one zone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kmm.daemon import DaemonContext

HZ = 1000
JIFFY_NS = 1_000_000_000 // HZ
KSWAPD_WAIT = "kswapd_wait"


class Kswapd:
    """kswapd0: reclaims in the background between the low and high watermarks."""

    name: ClassVar[str] = "kswapd"

    @dataclass(frozen=True)
    class Knobs:
        """kswapd has no knobs of its own: what drives it (vm.swappiness,
        vm.watermark_scale_factor) are sysctls the model keeps at their defaults."""

    async def run(self, ctx: DaemonContext) -> None:
        """kswapd(): sleep, reclaim for the order asked, sleep again; when reclaim had
        to settle for a lower order than asked, try to sleep at that order."""
        ctx.set_kswapd_order(0)
        while True:
            alloc_order = reclaim_order = ctx.kswapd_order()
            while True:  # kswapd_try_sleep:
                await self.kswapd_try_to_sleep(ctx, alloc_order, reclaim_order)
                alloc_order = ctx.kswapd_order()
                ctx.set_kswapd_order(0)
                reclaim_order = await ctx.balance_pgdat(alloc_order)
                if reclaim_order >= alloc_order:
                    break

    async def kswapd_try_to_sleep(self, ctx: DaemonContext, alloc_order: int,
                                  reclaim_order: int) -> None:
        """kswapd_try_to_sleep: nap HZ/10 if the zone is balanced; if nobody woke us and
        it is still balanced, sleep until woken (wakeup_kswapd)."""
        woken = False
        if ctx.prepare_kswapd_sleep(reclaim_order):
            ctx.wakeup_kcompactd(alloc_order)  # compact what reclaim freed
            woken = await ctx.wait(KSWAPD_WAIT, HZ // 10 * JIFFY_NS)
            if woken and ctx.kswapd_order() < reclaim_order:
                ctx.set_kswapd_order(reclaim_order)
        if not woken and ctx.prepare_kswapd_sleep(reclaim_order):
            await ctx.wait(KSWAPD_WAIT)
        elif woken:
            ctx.count_vm_event("kswapd_low_wmark_hit_quickly")
        else:
            ctx.count_vm_event("kswapd_high_wmark_hit_quickly")
