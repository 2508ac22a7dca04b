"""mTHP COW vs split: a parent maps 64 KiB folios and forks; the child writes into them
(do_wp_page copies 4 KiB pages out of a folio the parent still maps) while another CPU
splits the parent's folios to order 0 (debugfs split_huge_pages: freeze into migration
entries, split, remap). The child's faults meet migration entries and wait; the split
fails with -EAGAIN when a COW holds a reference. No byte may be lost on either side.

    kmm run workloads/race_mthp_cow_split.py --cpus 2 --mode random --seed 3
    kmm explore workloads/race_mthp_cow_split.py --schedules 1000
"""

KiB = 1 << 10


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    a = await p.mmap(128 * KiB)
    await p.madvise(a, 128 * KiB, "hugepage")
    await p.touch(a, 128 * KiB, value=1)
    c = await p.fork("child")

    async def cow(cpu):
        q = c.on(cpu)
        for off in (0, 4 * KiB, 68 * KiB):
            await q.store(a + off, bytes([0xC0 + cpu]))

    async def split(cpu):
        await p.on(cpu).split_huge_page(a, 128 * KiB)

    await k.parallel(cow, split)
    lost = len(await p.verify()) + len(await c.verify())
    return {"lost_bytes": lost}
