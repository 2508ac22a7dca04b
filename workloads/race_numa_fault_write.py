"""NUMA hinting fault vs a write fault on the same PROT_NONE huge PMD.

A THP on node 0, made PROT_NONE by a NUMA scan from node 1. CPU 1 (node 1) reads it:
its hinting fault migrates the THP whole to node 1 (a PMD migration entry while the
contents are copied). CPU 0 (node 0) writes into it at the same time: its fault is a
hinting fault too (do_huge_pmd_numa_page; the folio is local to it, so it only
restores the PMD's protection), or waits on the PMD migration entry
(pmd_migration_entry_wait), or finds the PMD fixed and faults again to write. The two
serialize on the PMD lock with the pmd_same recheck. No byte may be lost:

    kmm explore workloads/race_numa_fault_write.py --schedules 1000
"""

MACHINE = {"memory": "64MiB", "cpus": 2, "nodes": 2}
MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.madvise(a, SIZE, "hugepage")
    await p.on_node(0).touch(a, SIZE, value=1, stride=64 << 10)
    assert await p.on_node(1).numa_scan() == 512

    async def writer(cpu):
        q = p.on(cpu)
        for off in (0, 128 << 10, MiB + 4096):
            await q.store(a + off, b"\x02")

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in (64 << 10, MiB)]

    _, got = await k.parallel(writer, reader)
    assert got == [b"\x01"] * 2, f"hinting-fault reads {got}"
    _, huge = k.smaps(p, a, SIZE)
    return {"anon_huge_kb": huge, "lost_bytes": len(await p.verify())}
