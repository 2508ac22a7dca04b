"""NUMA hinting fault vs MADV_DONTNEED on the same 4 KiB pages.

Sixteen small pages on node 0 (MADV_NOHUGEPAGE), made PROT_NONE by a NUMA scan from
node 1. CPU 1 (node 1) reads them: each read is a hinting fault (do_numa_page), which
reads the PTE without the lock, takes the PTE lock, rechecks it (pte_same) and then
migrates the page to node 1 (the PTE a migration entry meanwhile) or restores its
protection. CPU 0 MADV_DONTNEEDs the first half at the same time, under the mmap lock
for read too: the zap may clear a PTE between the fault's lockless read and its lock,
and the fault must then see the change and return (the access faults again and maps
the zero page). A zapped page reads 0 afterwards, the others keep their 1:

    kmm explore workloads/race_numa_fault_dontneed.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "cpus": 2, "nodes": 2}
MiB = 1 << 20
SIZE = 64 << 10
HALF = SIZE // 2


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "nohugepage")
    await p.on_node(0).touch(a, SIZE, value=1)
    assert await p.on_node(1).numa_scan() == SIZE // 4096

    async def zapper(cpu):
        return await p.on(cpu).madvise(a, HALF, "dontneed")

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in (0, 4096, HALF, HALF + 4096)]

    zapped, got = await k.parallel(zapper, reader)
    # a page of the zapped half reads 1 if the read came first, else 0 (the zero page)
    assert zapped == 0 and got[0] in (b"\x00", b"\x01") and got[1] in (b"\x00", b"\x01")
    assert got[2:] == [b"\x01"] * 2, f"reads {got}"
    after = [await p.load(a + off) for off in (0, 4096, HALF, HALF + 4096)]
    assert after == [b"\x00"] * 2 + [b"\x01"] * 2, f"after the zap, reads {after}"
    return {"lost_bytes": len(await p.verify())}
