"""kcompactd: the per-node background compaction thread (mm/compaction.c kcompactd()).

It sleeps on ``kcompactd_wait`` until an allocation that may not stall hands it an
order (wakeup_kcompactd: a defrag=defer THP fault, or kswapd going back to sleep after
reclaiming for a high order), then compacts the zone until a free block of that order
exists, and sleeps again. The compaction itself (the scanners, migration, deferral
after failures) is mechanism, in kmm/compaction.py; the daemon decides when.

Left out: proactive compaction (vm.compaction_proactiveness, the 500 ms fragmentation
score check): the thread waits without a timeout, as with proactiveness 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kmm.daemon import DaemonContext


class Kcompactd:
    name: ClassVar[str] = "kcompactd"

    @dataclass(frozen=True)
    class Knobs:
        """kcompactd has no knobs of its own in the model (compaction_proactiveness,
        the only sysctl that drives the thread itself, is left out)."""

    async def run(self, ctx: DaemonContext) -> None:
        while True:
            # wait_event_freezable(kcompactd_wait, kcompactd_work_requested(pgdat))
            if not ctx.kcompactd_work_requested():
                await ctx.wait("kcompactd_wait")
                continue
            await ctx.kcompactd_do_work()
