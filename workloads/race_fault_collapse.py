"""Fault vs collapse: MADV_COLLAPSE on one CPU while another CPU writes the same 2 MiB.

One page in sixteen of the block is faulted first by CPU 1, so CPU 1's TLB holds their
translations. Then CPU 0 collapses the block (MADV_COLLAPSE) while CPU 1 writes a new
byte into every other page: into present pages through its TLB, and into holes, which
fault. The collapse takes the mmap lock for write (no fault runs while the PMD is
cleared), clears the PMD and shoots down every TLB (pmdp_collapse_flush) before copying:
a store lands in the old page before the copy, or faults and waits for the mmap lock and
lands in the new THP. No byte may be lost. Exposes the injected bugs
``collapse_no_tlb_flush`` and ``collapse_mmap_read_lock`` (kmm/bugs.py):

    kmm run workloads/race_fault_collapse.py --cpus 2 --mode random --seed 3
    kmm explore workloads/race_fault_collapse.py --schedules 10000
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.on(1).touch(a, SIZE, value=1, stride=64 << 10)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 256 << 10):  # present pages and holes, alternately
            await q.store(a + off, bytes([2 + (off >> 16)]))
            await q.store(a + off + (16 << 10), bytes([3]))

    collapsed, _ = await k.parallel(collapser, writer)
    # a fault holding a reference or the page lock makes the collapse give up: EAGAIN
    k.expect(collapsed, "EAGAIN", what="MADV_COLLAPSE")
    rss, huge = k.smaps(p, a, SIZE)
    return {"madvise": collapsed, "anon_huge_kb": huge, "lost_bytes": len(await p.verify())}
