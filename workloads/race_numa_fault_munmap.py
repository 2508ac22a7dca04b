"""NUMA hinting fault vs munmap of part of the same THP.

A THP on node 0, made PROT_NONE by a NUMA scan from node 1. CPU 1 (node 1) reads its
first half: a hinting fault that migrates the THP to node 1 under the mmap read lock.
CPU 0 unmaps its second half: munmap takes the mmap lock for write, so it runs before
the fault (the PMD is split, the first half stays PROT_NONE PTEs... or plain PTEs: a
split gives the VMA's protection, and the read needs no hinting fault) or after it (the
migrated THP's PMD is split and half of it freed by the deferred split). No byte of the
first half may be lost, nothing may leak:

    kmm explore workloads/race_numa_fault_munmap.py --schedules 1000
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

    async def unmapper(cpu):
        return await p.on(cpu).munmap(a + MiB, MiB)

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in (0, 256 << 10, 960 << 10)]

    unmapped, got = await k.parallel(unmapper, reader)
    assert unmapped == 0 and got == [b"\x01"] * 3, f"munmap {unmapped}, reads {got}"
    return {"lost_bytes": len(await p.verify())}
