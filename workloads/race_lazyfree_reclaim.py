"""Reclaim vs a write to MADV_FREE'd pages: sixteen 4 KiB pages (MADV_NOHUGEPAGE) are
written, then MADV_FREE'd: lazyfree folios, clean and no longer swap-backed, which
reclaim may discard without any swap.

At once: CPU 0 reclaims (memory.reclaim), CPU 1 writes a new byte into each page. A
write to a page still mapped only sets its PTE's dirty bit; try_to_unmap_one clears the
PTE and must carry that bit to the folio, find the folio dirty and keep it (the PTEs
put back, the folio swap-backed again). A page reclaim discards before the write comes
is gone, and the write faults in a zeroed page. Either way each page reads the new byte
where it was written and 0 or the old value elsewhere, never a lost write:

    kmm explore workloads/race_lazyfree_reclaim.py --schedules 1000 --mode pct
"""

MiB = 1 << 20
PAGES = 16


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "nohugepage")
    await p.touch(a, PAGES * 4096, value=1)
    await p.madvise(a, PAGES * 4096, "free")

    async def reclaimer(cpu):
        return await k.memory_reclaim(PAGES, swappiness=0)

    async def writer(cpu):
        q = p.on(cpu)
        for i in range(PAGES):
            await q.store(a + i * 4096 + 8, b"\x02")

    reclaimed, _ = await k.parallel(reclaimer, writer)
    assert 0 <= reclaimed <= PAGES, reclaimed
    for i in range(PAGES):
        got = (await p.load(a + i * 4096), await p.load(a + i * 4096 + 8))
        # the page kept (written before reclaim got to it) or a new zeroed one
        assert got in ((b"\x01", b"\x02"), (b"\x00", b"\x02")), f"page {i} reads {got}"
    return {"reclaimed": reclaimed, "lost_bytes": len(await p.verify())}
