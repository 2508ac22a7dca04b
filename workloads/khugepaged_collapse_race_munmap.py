"""MADV_COLLAPSE on one CPU while another CPU unmaps part of the range.

CPU 0 collapses 4 MiB, every other page faulted; CPU 1 unmaps the middle 2 MiB (an unaligned
1 MiB .. 3 MiB, so the VMA splits inside both blocks). Whichever goes first, the
collapse revalidates the VMA under the mmap write lock (hugepage_vma_revalidate) and
gives up on a block no longer wholly inside one (SCAN_ADDRESS_RANGE, SCAN_VMA_NULL,
SCAN_PMD_NULL): no page is collapsed from or into an unmapped range, every table and
page is freed or still mapped, and the bytes left mapped are intact:

    kmm run workloads/khugepaged_collapse_race_munmap.py --cpus 2 --mode random --seed 1
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 4 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.touch(a, SIZE, value=7, stride=8192)
    b = await p.mmap(MiB)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def unmapper(cpu):
        q = p.on(cpu)
        await q.touch(b, 128 << 10, value=8)  # some work first: either may go first
        return await q.munmap(a + MiB, 2 * MiB)

    collapsed, unmapped = await k.parallel(collapser, unmapper)
    return {"madvise": collapsed, "munmap": unmapped, "lost_bytes": len(await p.verify())}
