"""hawkeye: a research promotion daemon, HawkEye's access-coverage order with an
Ingens-style utilization threshold, in place of khugepaged.

Stock khugepaged walks the registered mms in list order and each mm in address order,
``pages_to_scan`` at a time, and under the default max_ptes_none (511) collapses any
2 MiB block with one young page in it: sparse blocks become THPs (RSS bloat) and hot
blocks late in the address space wait for their turn. This daemon spends the same budget
(``khugepaged/pages_to_scan`` / 512 collapses per pass, a pass every
``khugepaged/scan_sleep_millisecs``) in another order:

- HawkEye (Panwar et al., ASPLOS 2019): promote first the 2 MiB regions with the most
  accessed base pages ("access coverage"). Each pass samples the accessed bits of every
  THP-eligible block (test-and-clear-young), and keeps a decaying score per block:
  ``score = (score >> decay_shift) + young``.
- Ingens (Kwon et al., OSDI 2016): promote only blocks whose utilization (present
  pages / 512) is at least ``util_threshold_pct``, so sparse blocks never bloat.

Collapses go through the MADV_COLLAPSE flavour of the mechanism (``mode="madvise"``):
this policy replaces khugepaged's max_ptes_none and young-page rules with its own, and
its own sampling has just cleared the accessed bits the young rule would read.

Written against the public daemon API only (kmm.daemon): every call takes and returns
plain data, so it runs the same in a child process. Its choices are a deterministic
function of machine state: blocks are visited in (pid, address) order and ties in score
are broken the same way.

Left out from the papers: HawkEye's asynchronous pre-zeroing and bloat recovery by
zero-page deduplication, its per-process fairness (MMU-overhead estimates from hardware
counters); Ingens's adaptive threshold under fragmentation and its huge-page-aware
fairness. The sampling does not flush the TLB (as the kernel's own accessed-bit walkers
on x86 do not), so a page whose translation stays cached reads as idle until evicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kmm.daemon import HPAGE_PMD_NR, HPAGE_PMD_SIZE, DaemonContext

MSEC = 1_000_000  # ns
WAITQUEUE = "khugepaged_wait"


class HawkEye:
    """Promote the most-covered 2 MiB blocks first; never the under-used ones."""

    name: ClassVar[str] = "hawkeye"

    @dataclass(frozen=True)
    class Knobs:
        """util_threshold_pct: the utilization (present PTEs of 512, in percent) a block
        needs before it may be promoted (Ingens uses 90; 0 promotes anything with a
        page). decay_shift: how fast old samples fade from a block's score (each pass
        halves it at 1). min_young: the fewest accessed pages in a block's score for it
        to be worth a collapse. The budget and the period are khugepaged's sysfs knobs
        (pages_to_scan, scan_sleep_millisecs), read live, so both policies get the
        same."""

        util_threshold_pct: int = 90
        decay_shift: int = 1
        min_young: int = 1

    def __init__(self, knobs: "HawkEye.Knobs | None" = None) -> None:
        self.knobs = knobs or self.Knobs()
        self.scores: dict[tuple[int, int], int] = {}  # (pid, block address) -> score
        self.results: dict[str, int] = {}             # SCAN_* name -> collapses ended so
        self.passes = 0

    async def run(self, ctx: DaemonContext) -> None:
        """Sample and promote the best, then wait a period (as khugepaged: an mm
        registering with MADV_HUGEPAGE or a sleep knob write wakes it early); forever."""
        while True:
            if ctx.hugepage_pmd_enabled():
                await self.promote(ctx)
            sleep = ctx.knob("khugepaged/scan_sleep_millisecs") * MSEC
            await ctx.wait(WAITQUEUE, max(sleep, MSEC))

    async def promote(self, ctx: DaemonContext) -> None:
        """One pass: sample every eligible block, collapse the best within the budget."""
        candidates = await self.sample(ctx)
        budget = max(1, ctx.knob("khugepaged/pages_to_scan") // HPAGE_PMD_NR)
        for _score, pid, addr in candidates[:budget]:
            r = await ctx.collapse(pid, addr, mode="madvise")
            self.results[r] = self.results.get(r, 0) + 1
            if r == "SCAN_ALLOC_HUGE_PAGE_FAIL":
                break  # no huge page to be had: try again next period
        self.passes += 1

    async def sample(self, ctx: DaemonContext) -> list:
        """One pass of access sampling over every THP-eligible block: update the
        scores and return the promotable blocks, best first, as (-score, pid, addr)."""
        k = self.knobs
        seen: dict[tuple[int, int], int] = {}
        candidates = []
        for mm in ctx.mm_list():
            pid = mm["pid"]
            for vma in mm["vmas"]:
                if not vma["thp"]:
                    continue
                start = -(-vma["start"] // HPAGE_PMD_SIZE) * HPAGE_PMD_SIZE
                end = vma["end"] // HPAGE_PMD_SIZE * HPAGE_PMD_SIZE
                if start >= end:
                    continue
                views = {v.addr: v for v in ctx.page_table(pid, start, end)}
                for addr, young in await ctx.clear_young(pid, start, end):
                    v = views.get(addr)
                    if v is None or v.kind != "table":
                        continue  # already huge, or gone since the snapshot
                    key = (pid, addr)
                    score = seen[key] = (self.scores.get(key, 0) >> k.decay_shift) + young
                    useful = v.present - v.zero_ptes
                    if (score >= k.min_young
                            and useful * 100 >= k.util_threshold_pct * HPAGE_PMD_NR):
                        candidates.append((-score, pid, addr))
        self.scores = seen  # blocks no longer PTE-mapped (or gone) drop their history
        candidates.sort()
        return candidates
