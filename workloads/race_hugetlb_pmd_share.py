"""Fault on a shared hugetlb PMD table vs unsharing and munmap: a parent and its child
map one PUD-aligned 1 GiB MAP_SHARED|MAP_HUGETLB range (MAP_NORESERVE: a pool of four
pages is enough); the parent has touched its first page, so it has a PMD table there.

At once, on three CPUs: the child faults on the second page (its PUD entry is empty, so
huge_pte_alloc goes to huge_pmd_share and may point it at the parent's PMD table); the
child, on another CPU, MADV_DONTNEEDs a third page of the same PUD (which unshares the
table again if the child shares it: it takes the child's hugetlb VMA lock for write,
and waits for the fault, which holds it for read across its walk and entry update);
and the parent munmaps the whole range (its final zap unshares, or zaps and frees the
table if nobody shares it).

huge_pmd_share holds the file's i_mmap_rwsem for read from the lookup of the parent's
table to the populate of the child's PUD entry, and the parent's zap holds it for
write: so either the child shares the table first (the parent then unshares and the
child keeps it) or the parent's VMA is gone first (its VMA lock freed at the final zap:
page_table_shareable refuses it, the child allocates its own table). Without the lock
(the injected bug ``hugetlb_pmd_share_no_i_mmap_lock``, kmm/bugs.py) the parent's
munmap can run whole between the child's lookup and its share-count increment: the
child takes a reference on a PMD table already freed (KernelBug), or the parent frees
one the child shares:

    kmm explore workloads/race_hugetlb_pmd_share.py --schedules 1000 --mode pct
    kmm explore workloads/race_hugetlb_pmd_share.py --schedules 300 --mode pct \\
        --inject hugetlb_pmd_share_no_i_mmap_lock
"""

MiB = 1 << 20
GiB = 1 << 30
BASE = 0x2000_0000_0000  # PUD-aligned: the range can share one PMD table

MACHINE = {"cpus": 3}


async def main(k):
    await k.set_hugetlb_pool(4)
    p = await k.process("main")
    a = await p.mmap(GiB, addr=BASE, backing="hugetlb_shared", noreserve=True)
    await p.store(a, b"\xa1")
    c = await p.fork("child")

    seen = {}

    async def child_fault(cpu):
        await c.on(cpu).store(a + 2 * MiB, b"\xc2")
        # the parent's page 0 shows in the child only through a shared PMD table
        seen["shared_kb"] = k.smaps_hugetlb(c, a, GiB)[1]

    async def child_unshare(cpu):
        await c.on(cpu).madvise(a + 4 * MiB, 2 * MiB, "dontneed")

    async def parent_munmap(cpu):
        await p.on(cpu).munmap(a, GiB)

    await k.parallel(child_fault, child_unshare, parent_munmap)
    got = (await c.load(a), await c.load(a + 2 * MiB))
    assert got == (b"\xa1", b"\xc2"), f"the child reads {got}"
    await c.munmap(a, GiB)
    mi = k.meminfo()
    # every page left the page cache with the file's last mapping: the pool is whole
    assert (mi["HugePages_Total"], mi["HugePages_Free"], mi["HugePages_Rsvd"]) == (4, 4, 0), mi
    # which order the schedule took: the child's fault shared the parent's table
    # (then unshared by its DONTNEED or not), or found the parent's VMA gone
    return {"free": mi["HugePages_Free"], "child_shared": seen["shared_kb"] > 2048}
