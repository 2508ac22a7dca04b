"""khugepaged collapsing in the background while two CPUs fault and write.

khugepaged runs as a daemon actor with scan_sleep_millisecs 0 and pages_to_scan 512, so
it scans about one PMD per pass without pause, while CPU 0 faults THPs into a
MADV_HUGEPAGE region and CPU 1 writes over them and zaps 4 KiB pieces (MADV_DONTNEED:
each first zap splits a PMD, and khugepaged collapses the block back, its hole
zero-filled). Its scan takes the mmap read lock with trylock, the collapse the write
lock; no write is lost, and at the end (a few passes more, 10 ms apart) every block is
PMD-mapped again:

    kmm run workloads/khugepaged_daemon_race.py --cpus 2 --mode random --seed 4
"""

MiB = 1 << 20
SIZE = 4 * MiB


async def main(k):
    k.set_knob("khugepaged/scan_sleep_millisecs", 0)
    k.set_knob("khugepaged/pages_to_scan", 512)
    k.start_daemon("khugepaged")
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.madvise(a, SIZE, "hugepage")  # the first THP fault registers the mm

    async def faulter(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 2 * MiB):
            await q.touch(a + off + 4096, 2 * MiB - 4096, value=1, stride=8192)

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 32 << 10):
            await q.store(a + off, bytes([2 + (off >> 15) % 100]))
            if off % (256 << 10) == 0:
                await q.madvise(a + off + 8192, 4096, "dontneed")

    await k.parallel(faulter, writer)
    k.set_knob("khugepaged/scan_sleep_millisecs", 10)
    await k.sleep(50_000_000)
    rss, huge = k.smaps(p, a, SIZE)
    return {"full_scans": k.knob("khugepaged/full_scans"), "anon_huge_kb": huge,
            "lost_bytes": len(await p.verify())}
