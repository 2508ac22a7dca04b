"""MADV_COLLAPSE on one CPU while another CPU writes into the same 2 MiB blocks.

CPU 0 collapses a 2 MiB block of small pages (its first half faulted) with
MADV_COLLAPSE; CPU 1 meanwhile writes one byte every 12 KiB, over present pages and
holes alike. The
collapse drops the mmap lock to allocate, takes it back for write, clears the PMD and
flushes the TLBs (pmdp_collapse_flush) before copying: a write lands either in the old
page before the copy (and is copied) or faults, waits for the mmap lock and lands in
the new THP. No byte may be lost:

    kmm run workloads/khugepaged_collapse_race_fault.py --cpus 2 --mode random --seed 3
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    for block in range(0, SIZE, 2 * MiB):
        await p.touch(a + block, MiB, value=1)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 12 << 10):
            await q.store(a + off, bytes([2 + (off >> 12) % 200]))

    collapsed, _ = await k.parallel(collapser, writer)
    rss, huge = k.smaps(p, a, SIZE)
    return {"madvise": collapsed, "anon_huge_kb": huge, "lost_bytes": len(await p.verify())}
