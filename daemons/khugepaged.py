"""khugepaged: the collapse daemon's loop (the khugepaged() thread of mm/khugepaged.c),
as policy.

Each pass (``khugepaged_do_scan``) spends a budget of ``pages_to_scan`` progress units
over the registered mms in list order, from where the last pass stopped, and goes
around the list at most once (the cursor passing the list head twice ends a pass).
A huge-page allocation failure makes it sleep ``alloc_sleep_millisecs`` once, and end
the pass the second time. Between passes it sleeps ``scan_sleep_millisecs`` on
``khugepaged_wait``, unless a write to scan_sleep_millisecs or alloc_sleep_millisecs
wakes it (the store resets khugepaged_sleep_expire); with nothing registered it sleeps
until an mm registers. Everything it scans and collapses is mechanism (kmm/khugepaged.py,
through the ctx.khugepaged_* calls), with ``collapse_control.is_khugepaged`` set, so
the max_ptes_* limits apply.

Written against kmm.daemon only. Left out: the freezer, and kthread_stop (with
enabled=never the thread waits until THPs are enabled again instead of exiting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kmm.daemon import DaemonContext

KHUGEPAGED_WAIT = "khugepaged_wait"
MSEC = 1_000_000  # ns


class Khugepaged:
    """khugepaged: collapses eligible ranges of registered mms in the background."""

    name: ClassVar[str] = "khugepaged"

    @dataclass(frozen=True)
    class Knobs:
        """The sysfs files the loop reads (/sys/kernel/mm/transparent_hugepage/
        khugepaged/), with the kernel's defaults; the loop reads the live values
        through ctx.knob at each use, as the kernel reads its globals."""

        pages_to_scan: int = 4096
        scan_sleep_millisecs: int = 10000
        alloc_sleep_millisecs: int = 60000

    async def run(self, ctx: DaemonContext) -> None:
        """khugepaged(): scan, then wait for more work, forever."""
        while True:
            if not ctx.hugepage_pmd_enabled():
                # the kernel stops the thread; a write to `enabled` starts it again
                await ctx.wait(KHUGEPAGED_WAIT)
                continue
            await self.khugepaged_do_scan(ctx)
            await self.khugepaged_wait_work(ctx)

    async def khugepaged_do_scan(self, ctx: DaemonContext) -> None:
        """khugepaged_do_scan: up to pages_to_scan of progress, at most once around the
        list; one alloc_sleep after the first allocation failure, stop at the second."""
        pages = ctx.knob("khugepaged/pages_to_scan")
        progress = 0
        pass_through_head = 0
        wait = True
        result = "SCAN_SUCCEED"
        while True:
            if ctx.khugepaged_scan_at_head():
                pass_through_head += 1
            if ctx.khugepaged_has_work() and pass_through_head < 2:
                done, result = await ctx.khugepaged_scan_mm_slot(pages - progress)
                progress += done
            else:
                progress = pages
            if progress >= pages:
                break
            if result == "SCAN_ALLOC_HUGE_PAGE_FAIL":
                if not wait:
                    break
                wait = False
                await self.khugepaged_alloc_sleep(ctx)

    async def khugepaged_alloc_sleep(self, ctx: DaemonContext) -> None:
        """khugepaged_alloc_sleep: alloc_sleep_millisecs on khugepaged_wait; any wake-up
        ends it."""
        await ctx.wait(KHUGEPAGED_WAIT, ctx.knob("khugepaged/alloc_sleep_millisecs") * MSEC)

    async def khugepaged_wait_work(self, ctx: DaemonContext) -> None:
        """khugepaged_wait_work: with work, sleep scan_sleep_millisecs (none at 0) until
        khugepaged_should_wakeup (the time is up, or a sleep knob was written); without,
        sleep until an mm registers."""
        if ctx.khugepaged_has_work():
            sleep = ctx.knob("khugepaged/scan_sleep_millisecs") * MSEC
            if not sleep:
                return
            expire = ctx.khugepaged_sleep_expire = ctx.now + sleep
            # wait_event_freezable_timeout(khugepaged_wait, khugepaged_should_wakeup())
            while ctx.now < ctx.khugepaged_sleep_expire:
                if not await ctx.wait(KHUGEPAGED_WAIT, expire - ctx.now):
                    return  # timed out
            return
        while ctx.hugepage_pmd_enabled() and not ctx.khugepaged_has_work():
            await ctx.wait(KHUGEPAGED_WAIT)
