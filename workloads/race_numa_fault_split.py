"""NUMA hinting fault vs a PMD split, on a two-node machine.

A THP faulted on node 0 is made PROT_NONE by a NUMA scan run from node 1
(change_prot_numa). Then CPU 1 (node 1) reads it: a NUMA hinting fault on the huge PMD
(do_huge_pmd_numa_page) that migrates the THP whole to node 1; meanwhile CPU 0 (node 0)
MADV_DONTNEEDs one 4 KiB page inside it, which splits the PMD (__split_huge_pmd) under
the same mmap read lock. The hinting fault read the PMD without its lock: it must
recheck it under the lock (pmd_same) and back out if the split came first, else it
would "restore" a PMD that is a page-table pointer now. No byte may be lost. Exposes
the injected bug ``numa_huge_no_pmd_same`` (kmm/bugs.py):

    kmm explore workloads/race_numa_fault_split.py --schedules 1000
    kmm explore workloads/race_numa_fault_split.py --inject numa_huge_no_pmd_same
"""

MACHINE = {"memory": "64MiB", "cpus": 2, "nodes": 2}
MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.madvise(a, SIZE, "hugepage")
    await p.on_node(0).touch(a, SIZE, value=1, stride=64 << 10)  # one THP on node 0
    assert await p.on_node(1).numa_scan() == 512  # its PMD is PROT_NONE now

    async def splitter(cpu):
        return await p.on(cpu).madvise(a + 192 * 1024, 4096, "dontneed")

    async def faulter(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in (0, 64 << 10, MiB)]

    _, got = await k.parallel(splitter, faulter)
    assert got == [b"\x01"] * 3, f"hinting-fault reads {got}"
    _, status = await p.move_pages([a, a + MiB])
    return {"nodes": status, "lost_bytes": len(await p.verify())}
