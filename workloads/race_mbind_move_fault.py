"""mbind(MPOL_BIND, MPOL_MF_MOVE) racing THP faults on a two-node machine.

CPU 0 (node 0) write-faults a 4 MiB MADV_HUGEPAGE range that is interleaved over both
nodes while CPU 1 (node 1) rebinds it to node 1 with MPOL_MF_MOVE (do_mbind takes
mmap_lock for write: the faults wait for it or run before) and writes its first pages.
Whatever the order, every byte reads back as written and the invariants hold.

    kmm explore workloads/race_mbind_move_fault.py --mode pct --check op
"""
MACHINE = {"memory": "64MiB", "nodes": 2}


async def main(k):
    p = await k.process()
    a = await p.mmap(4 << 20)
    await p.madvise(a, 4 << 20, "hugepage")
    await p.mbind(a, 4 << 20, "interleave", [0, 1])

    async def t0(cpu):
        await p.on(cpu).touch(a, 4 << 20, value=1)

    async def t1(cpu):
        await p.on(cpu).mbind(a, 4 << 20, "bind", [1], ["move"])
        await p.on(cpu).touch(a, 4096 * 8, value=1)
    await k.parallel(t0, t1)
    assert await p.touch(a, 4 << 20, write=False, value=1) == 0
