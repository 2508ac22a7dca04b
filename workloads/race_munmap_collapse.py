"""munmap vs collapse: MADV_COLLAPSE of a 2 MiB block while another CPU unmaps its
second half.

One page in sixteen of the block is faulted. CPU 0 collapses it; CPU 1 reads a little,
then unmaps [1 MiB, 2 MiB) of it (the VMA splits inside the block). munmap takes the
mmap lock for write; the collapse revalidates the VMA under its own write lock
(hugepage_vma_revalidate): a block no longer wholly inside one VMA is left alone
(SCAN_ADDRESS_RANGE: EINVAL), one collapsed first is split again by the munmap
(vma_adjust_trans_huge) and its second half unmapped. No table or page leaks, and the
bytes still mapped read back:

    kmm run workloads/race_munmap_collapse.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_munmap_collapse.py --schedules 10000
"""

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.touch(a, SIZE, value=7, stride=64 << 10)

    async def collapser(cpu):
        return await p.on(cpu).madvise(a, SIZE, "collapse")

    async def unmapper(cpu):
        q = p.on(cpu)
        for _ in range(24):  # the collapse scans and allocates meanwhile
            await q.touch(a, MiB, write=False, value=7, stride=64 << 10)
        return await q.munmap(a + MiB, MiB)

    collapsed, unmapped = await k.parallel(collapser, unmapper)
    assert unmapped == 0, f"munmap returned {unmapped}"
    return {"madvise": collapsed, "munmap": unmapped, "lost_bytes": len(await p.verify())}
