"""Two faults of one process that both go to share the same hugetlb PMD table: a
parent and its child map one PUD-aligned 1 GiB MAP_SHARED|MAP_HUGETLB range; the
parent has touched its first page, so it has a PMD table there, and the child has none
(fork copies no page table of a shared hugetlb mapping).

At once, two CPUs of the child write to two other pages of the range (different file
indices: different fault mutexes, so the faults run side by side). Both find the
child's PUD entry empty and go to huge_pmd_share, which finds the parent's table and
takes a share on it for each. Only one may install it: under the table's lock the
other sees the PUD entry populated and drops its share. Then the child's PUD entry
points at the parent's table once, counted once in the child's page-table bytes and
once in the table's share count, and every write is seen by both processes:

    kmm explore workloads/race_hugetlb_share_fault_fault.py --schedules 1000 --mode pct
"""

MiB = 1 << 20
GiB = 1 << 30
BASE = 0x2000_0000_0000  # PUD-aligned: the range can share one PMD table


async def main(k):
    await k.set_hugetlb_pool(4)
    p = await k.process("main")
    a = await p.mmap(GiB, addr=BASE, backing="hugetlb_shared", noreserve=True)
    await p.store(a, b"\xa1")
    c = await p.fork("child")

    async def child_fault(cpu):
        await c.on(cpu).store(a + (1 + cpu) * 2 * MiB, bytes([0xc0 + cpu]))

    await k.parallel(child_fault, child_fault)
    pages = (a, a + 2 * MiB, a + 4 * MiB)
    want = [b"\xa1", b"\xc0", b"\xc1"]
    for proc in (p, c):
        got = [await proc.load(x) for x in pages]
        assert got == want, f"{proc.name} reads {got}"
    # the child maps all three through the parent's table: all shared
    assert k.smaps_hugetlb(c, a, GiB) == (0, 3 * 2048), k.smaps_hugetlb(c, a, GiB)
    await c.munmap(a, GiB)
    await p.munmap(a, GiB)
    mi = k.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"], mi["HugePages_Rsvd"]) == (4, 4, 0), mi
    return {"free": mi["HugePages_Free"]}
