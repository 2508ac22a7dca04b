"""MADV_COLLAPSE vs MADV_DONTNEED and a refault of the same 2 MiB block.

One page in sixteen of the block is faulted (4 KiB pages: the VMA is marked
MADV_HUGEPAGE only afterwards, so a later fault of an empty PMD gets a THP). CPU 0
collapses the block; CPU 1 zaps the whole block with MADV_DONTNEED, which frees the
emptied PTE table (pt_reclaim: the PMD becomes none): at once (round 0), or once the
collapse has allocated its THP with the mmap lock dropped (round 1; round 2 then
writes one byte into the block: a huge fault, if the PMD is still none). The collapse
holds only the mmap read lock between its allocation and the write lock, as
MADV_DONTNEED and the fault do: under the write lock it must find the PMD again
(check_pmd_still_valid) and give up (the PMD is none: EINVAL) or count the block done
(a THP mapped it: 0), never clear and refill a PMD that no longer points to the table
it scanned. Each round ends with every PMD pointing to a page table (the checker),
the byte written after the zap read back and every other byte zero.

    kmm run workloads/race_collapse_dontneed.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_collapse_dontneed.py --schedules 10000 --mode pct
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EINVAL, EAGAIN) as a result

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
SIZE = 2 * MiB
STRIDE = 64 << 10
ROUNDS = 3  # the zap: as soon as it can; after the allocation; then a refault


async def main(k):
    p = await k.process("main")
    results = []
    for rnd in range(ROUNDS):
        a = await p.mmap(SIZE)
        await p.touch(a, SIZE, value=5, stride=STRIDE)
        assert await p.madvise(a, SIZE, "hugepage") == 0
        done = []

        async def collapser(cpu, a=a, done=done):
            try:
                return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))
            finally:
                done.append(True)

        async def zapper(cpu, a=a, rnd=rnd, done=done):
            q = p.on(cpu)
            if rnd >= 1:
                # a busy-wait (cpu_relax: the scheduler lets the collapse run); it ends
                # also if the collapse returned first (a strict-priority schedule)
                allocated = k.vmstat()["thp_collapse_alloc"] + 1
                while k.vmstat()["thp_collapse_alloc"] < allocated and not done:
                    k.cpu_relax()
                    await q.load(a + STRIDE)
            assert await q.madvise(a, SIZE, "dontneed") == 0
            if rnd == 2:
                await q.store(a + 3 * 4096 + 5, b"\x0b")

        collapsed, _ = await k.parallel(collapser, zapper)
        # EINVAL: the PMD was none when the collapse looked again (SCAN_PMD_NULL/NONE)
        k.expect(collapsed, "EINVAL", "EAGAIN", what=f"round {rnd}: MADV_COLLAPSE")
        want = b"\x0b" if rnd == 2 else b"\x00"
        got = await p.load(a + 3 * 4096 + 5)
        assert got == want, f"round {rnd}: the byte at +0x3005 reads {got!r} after the zap"
        assert await p.load(a) == b"\x00", f"round {rnd}: a zapped byte is not zero"
        results.append(collapsed)
    return {"madvise": results, "lost_bytes": len(await p.verify())}
