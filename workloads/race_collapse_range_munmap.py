"""MADV_COLLAPSE of a 4 MiB range (two blocks) vs munmap of part of the second block.

madvise_collapse drops the mmap lock while it collapses the first block (to allocate
the THP, then collapse_huge_page takes it for write); before the second block it takes
the lock again and revalidates the VMA (hugepage_vma_revalidate): the range may have
been unmapped or split meanwhile. CPU 1 unmaps the last 1 MiB of the range after
reading a little (0, 6 or 20 loads), so the munmap lands before, during or after the
first block's collapse. Then a 2 MiB block alone in its 1 GiB is unmapped and mapped
again while it collapses (its page tables freed and reallocated). madvise returns 0
(both collapsed, or the second block was split by the munmap afterwards), or
EINVAL/ENOMEM/EAGAIN for a block no longer wholly mapped or busy; no mapping may lie
outside a VMA, and every byte still mapped reads back.

    kmm run workloads/race_collapse_range_munmap.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_collapse_range_munmap.py --schedules 10000 --mode pct
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
SIZE = 4 * MiB
LOADS = (0, 6, 20)
COLLAPSE_OK = (0, "EINVAL", "ENOMEM", "EAGAIN")
REMAP_AT = 0x3000_0000_0000  # a 1 GiB region of its own per round


async def main(k):
    p = await k.process("main")
    results = []
    for loads in LOADS:
        a = await p.mmap(SIZE)
        await p.touch(a, SIZE, value=4, stride=128 << 10)

        async def collapser(cpu, a=a):
            return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

        async def unmapper(cpu, a=a, loads=loads):
            q = p.on(cpu)
            for _ in range(loads):
                await q.load(a + MiB)
            return await q.munmap(a + 3 * MiB, MiB)

        collapsed, unmapped = await k.parallel(collapser, unmapper)
        assert unmapped == 0, f"munmap returned {unmapped}"
        k.expect(collapsed, *COLLAPSE_OK[1:], what="MADV_COLLAPSE vs munmap")
        assert k.smaps(p, a + 3 * MiB, MiB) == (0, 0), "the unmapped 1 MiB is mapped"
        results.append(collapsed)

    # the block unmapped and mapped again while it collapses: alone in its 1 GiB, its
    # PMD table is freed (free_pgtables) and a new one allocated; the collapse's
    # revalidation finds an anonymous VMA again, check_pmd_still_valid another table
    for i, loads in enumerate(LOADS):
        a = await p.mmap(2 * MiB, addr=REMAP_AT + (i << 30))
        assert a == REMAP_AT + (i << 30), f"mmap returned {a!r}"
        await p.touch(a, 2 * MiB, value=6, stride=128 << 10)

        async def collapser2(cpu, a=a):
            return await errno_name(p.on(cpu).madvise(a, 2 * MiB, "collapse"))

        async def remapper(cpu, a=a, loads=loads):
            q = p.on(cpu)
            for _ in range(loads):
                await q.load(a + MiB)
            assert await q.munmap(a, 2 * MiB) == 0
            assert await q.mmap(2 * MiB, addr=a) == a
            await q.store(a + 8192, b"\x09")

        collapsed, _ = await k.parallel(collapser2, remapper)
        k.expect(collapsed, *COLLAPSE_OK[1:], what="MADV_COLLAPSE vs munmap+mmap")
        assert await p.load(a + 8192) == b"\x09" and await p.load(a) == b"\x00"
        results.append(collapsed)
    return {"madvise": results, "lost_bytes": len(await p.verify())}
