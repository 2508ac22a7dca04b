"""MADV_COLLAPSE of a 6 MiB range (three blocks) vs munmap of its last two blocks.

madvise_collapse drops the mmap lock for each block it collapses (collapse_huge_page
allocates without it and takes it for write), and takes it again for the next block:
it must look the VMA up again (hugepage_vma_revalidate), since the rest of the range
may be unmapped meanwhile. CPU 0 collapses [a, a+6M); CPU 1 unmaps [a+2M, a+6M), once
the collapse has allocated its first THP (or at once, when it returned first). In
round 0 nothing is mapped above the range (the lookup finds no VMA at all), in round 1
a VMA lies above it, past a gap (the lookup finds one that does not hold the block).
madvise returns 0 (both blocks gone only after the whole range collapsed), EINVAL (the
VMA is gone or no longer holds the block) or ENOMEM (the munmap came first: a hole);
a 0 means the first block is PMD-mapped; the unmapped 4 MiB is no longer mapped and the
first block reads back.

    kmm run workloads/race_collapse_tail_munmap.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_collapse_tail_munmap.py --schedules 10000 --mode pct
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EINVAL, ENOMEM) as a result

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
SIZE = 6 * MiB
STRIDE = 128 << 10


async def main(k):
    p = await k.process("main")
    results = []
    for rnd in range(2):
        a = await p.mmap(SIZE)  # above every VMA so far
        await p.touch(a, SIZE, value=3 + rnd, stride=STRIDE)
        if rnd == 1:
            above = await p.mmap(2 * MiB)  # past a gap, above the range
            assert above >= a + SIZE + 2 * MiB, f"mmap placed the VMA above at {above:#x}"
        done = []

        async def collapser(cpu, a=a, done=done):
            try:
                return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))
            finally:
                done.append(True)

        async def unmapper(cpu, a=a, done=done):
            q = p.on(cpu)
            # a busy-wait (cpu_relax: the scheduler lets the collapse run); it ends also
            # if the collapse returned first (a strict-priority schedule)
            allocated = k.vmstat()["thp_collapse_alloc"] + 1
            while k.vmstat()["thp_collapse_alloc"] < allocated and not done:
                k.cpu_relax()
                await q.load(a + 3 * MiB)
            return await q.munmap(a + 2 * MiB, 4 * MiB)

        collapsed, unmapped = await k.parallel(collapser, unmapper)
        assert unmapped == 0, f"round {rnd}: munmap returned {unmapped}"
        k.expect(collapsed, "EINVAL", "ENOMEM", what=f"round {rnd}: MADV_COLLAPSE")
        _, huge = k.smaps(p, a, 2 * MiB)
        assert collapsed != 0 or huge == 2048, f"round {rnd}: 0 but the first block " \
            f"has {huge} KiB AnonHugePages"
        assert k.smaps(p, a + 2 * MiB, 4 * MiB) == (0, 0), f"round {rnd}: unmapped, mapped"
        assert await p.load(a + STRIDE) == bytes([3 + rnd])
        results.append(collapsed)
    return {"madvise": results, "lost_bytes": len(await p.verify())}
