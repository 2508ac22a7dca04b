"""NUMA hinting faults on small pages vs a collapse of the same 2 MiB.

512 KiB of 4 KiB pages on node 0 (THP off for the faults), made PROT_NONE by a NUMA
scan from node 1. CPU 1 (node 1) reads them: each read is a hinting fault
(do_numa_page) that migrates the page to node 1 (PTE migration entries meanwhile).
CPU 0 collapses the block into a THP (MADV_COLLAPSE: the collapse_huge_page that
khugepaged runs: the scan under the mmap read lock, the copy under the write lock).
A page isolated by the migration makes the collapse give up (EAGAIN) or the copy
takes the migrated page; either way no byte may be lost:

    kmm explore workloads/race_numa_fault_collapse.py --schedules 1000
"""

from kmm import errno_name

MACHINE = {"memory": "64MiB", "cpus": 2, "nodes": 2}
KiB = 1 << 10
SIZE = 2 << 20


async def main(k):
    k.set_knob("enabled", "madvise")
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.on_node(0).touch(a, 512 * KiB, value=1, stride=16 * KiB)  # 32 small pages
    assert await p.on_node(1).numa_scan() == 32

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in range(0, 512 * KiB, 128 * KiB)]

    collapsed, got = await k.parallel(collapser, reader)
    assert got == [b"\x01"] * 4, f"hinting-fault reads {got}"
    k.expect(collapsed, "EAGAIN", what="MADV_COLLAPSE")
    _, huge = k.smaps(p, a, SIZE)
    return {"madvise": collapsed, "anon_huge_kb": huge, "lost_bytes": len(await p.verify())}
