"""Fault vs fault on one hugetlb page: two CPUs write the same private MAP_HUGETLB
2 MiB at once, with exactly one huge page in the pool (reserved by the mmap).

hugetlb_fault takes the fault mutex hashed from (mapping, index) before it looks at the
entry, so the second fault waits and then finds the page mapped: one allocation, no
spurious SIGBUS. Without the mutex (the injected bug ``hugetlb_fault_no_mutex``,
kmm/bugs.py) the second fault finds the reservation already consumed by the first and
the pool empty: alloc_hugetlb_folio fails and, the entry still being none, the fault is
SIGBUS ("false unable to allocate errors", hugetlb_no_page's comment):

    kmm run workloads/race_hugetlb_fault.py --cpus 2 --mode random --seed 7
    kmm explore workloads/race_hugetlb_fault.py --schedules 1000
"""

MiB = 1 << 20


async def main(k):
    await k.set_hugetlb_pool(1)
    p = await k.process("main")
    a = await p.mmap(2 * MiB, backing="hugetlb")

    async def writer(cpu):
        q = p.on(cpu)
        try:
            for off in range(cpu * 4096, 2 * MiB, 512 << 10):  # 4 stores, a page apart
                await q.store(a + off, bytes([0xB0 + cpu]))
        except ProcessLookupError as e:  # the other CPU's fault killed the process
            return e

    res = await k.parallel(writer, writer)
    bad = sorted(type(r).__name__ for r in res if isinstance(r, BaseException))
    assert not bad, f"a writer died: {', '.join(bad)}"
    mi = k.meminfo()
    assert (mi["HugePages_Total"], mi["HugePages_Free"], mi["HugePages_Rsvd"]) == (1, 0, 0), mi
    return {"lost_bytes": len(await p.verify()), "free": mi["HugePages_Free"]}
