"""Reclaim of shmem pages vs faults on them: a memfd of sixteen 4 KiB pages is written;
then at once CPU 0 pages the range out (MADV_PAGEOUT: each folio is unmapped, gets a
swap slot and joins the swap cache, leaves the page cache for a swap entry, is written,
and is freed if reclaim can still take its lock and nobody holds it), while CPU 1
writes a byte into each page and reads others back.

A fault that meets a swap entry whose folio is still in the swap cache (being written,
or kept because the fault's own lookup held it) must take that folio back
(swap_cache_get_folio, waiting for the write to end) rather than read the slot: the
slot is claimed by the cache, and a swap-in that only knew the direct path would wait
for a claim nobody drops. No byte is lost:

    kmm explore workloads/race_shmem_swapout_fault.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "swap": "16MiB"}
PAGES = 16


async def main(k):
    p = await k.process("main")
    a = await p.mmap(PAGES * 4096, backing="memfd")
    for i in range(PAGES):
        await p.store(a + i * 4096, bytes([0x10 + i]))

    async def pager(cpu):
        return await p.on(cpu).madvise(a, PAGES * 4096, "pageout")

    async def writer(cpu):
        q = p.on(cpu)
        for i in range(PAGES):
            await q.store(a + i * 4096 + 8, bytes([0x60 + i]))
            await q.load(a + ((i * 5) % PAGES) * 4096)

    paged, _ = await k.parallel(pager, writer)
    assert paged == 0, paged
    for i in range(PAGES):
        got = (await p.load(a + i * 4096), await p.load(a + i * 4096 + 8))
        assert got == (bytes([0x10 + i]), bytes([0x60 + i])), f"page {i} reads {got}"
    return {"pswpout": k.vmstat()["pswpout"], "lost_bytes": len(await p.verify())}
