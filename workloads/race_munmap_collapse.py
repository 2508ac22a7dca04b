"""munmap vs collapse: MADV_COLLAPSE of a 2 MiB block while another CPU unmaps its
second half, in three rounds that place the munmap early, mid-way and late.

One page in sixteen of each block is faulted. CPU 0 collapses it; CPU 1 unmaps
[1 MiB, 2 MiB) of it (the VMA splits inside the block): at once (round 0, the munmap
usually lands before or during the scan), after reading a little (round 1, usually
while the collapse has dropped the mmap lock to allocate), or once the collapse has
allocated its THP (round 2, usually after it installed the PMD). munmap takes the mmap
lock for write; the collapse revalidates the VMA under its own write lock
(hugepage_vma_revalidate): a block no longer wholly inside one VMA is left alone
(SCAN_ADDRESS_RANGE: EINVAL), one collapsed first is split again by the munmap
(vma_adjust_trans_huge) and its second half unmapped. No table or page leaks, and the
bytes still mapped read back:

    kmm run workloads/race_munmap_collapse.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_munmap_collapse.py --schedules 10000
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 2 * MiB
ROUNDS = 3


async def main(k):
    p = await k.process("main")
    blocks = []
    for _ in range(ROUNDS):
        a = await p.mmap(SIZE)
        await p.touch(a, SIZE, value=7, stride=64 << 10)
        blocks.append(a)

    results = []
    for rnd, a in enumerate(blocks):
        done = []

        async def collapser(cpu, a=a, done=done):
            try:
                return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))
            finally:
                done.append(True)

        async def unmapper(cpu, a=a, rnd=rnd):
            q = p.on(cpu)
            if rnd == 1:
                for _ in range(24):  # the collapse scans and allocates meanwhile
                    await q.touch(a, MiB, write=False, value=7, stride=64 << 10)
            elif rnd == 2:
                # a busy-wait (cpu_relax: the scheduler lets the collapse run); it ends
                # also if the collapse returned first (a strict-priority schedule)
                allocated = k.vmstat()["thp_collapse_alloc"] + 1
                while k.vmstat()["thp_collapse_alloc"] < allocated and not done:
                    k.cpu_relax()
                    await q.load(a)
            return await q.munmap(a + MiB, MiB)

        collapsed, unmapped = await k.parallel(collapser, unmapper)
        assert unmapped == 0, f"round {rnd}: munmap returned {unmapped}"
        # the collapse that finds the VMA cut short (revalidation) fails with EINVAL,
        # one that finds half the range unmapped with ENOMEM
        k.expect(collapsed, "EINVAL", "ENOMEM", what=f"round {rnd}: MADV_COLLAPSE")
        results.append(collapsed)
    return {"madvise": results, "lost_bytes": len(await p.verify())}
