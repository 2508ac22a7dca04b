"""COW after fork vs collapse: MADV_COLLAPSE in the parent while the parent writes to
pages it shares with a child.

The parent faults one page in sixteen of a 2 MiB block and forks; every page is now
shared and write-protected in both. CPU 0 collapses the parent's block into a THP
(shared sources are copied, the child keeps the old pages); CPU 1 writes a new byte into
each of the parent's pages, each a COW fault (do_wp_page copies 4 KiB) or a store into
the new THP. The collapse holds the mmap lock for write and flushes the TLBs, so each
write lands in the parent's final page; the child still reads the bytes of before the
fork. Exposes ``collapse_mmap_read_lock`` (kmm/bugs.py):

    kmm run workloads/race_cow_collapse.py --cpus 2 --mode random --seed 2
    kmm explore workloads/race_cow_collapse.py --schedules 10000
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.on(1).touch(a, SIZE, value=1, stride=64 << 10)
    child = await p.fork("child")

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 256 << 10):
            await q.store(a + off, bytes([2 + (off >> 18)]))

    collapsed, _ = await k.parallel(collapser, writer)
    # a COW fault holding a reference on a page makes the collapse give up: EAGAIN
    k.expect(collapsed, "EAGAIN", what="MADV_COLLAPSE")
    return {"madvise": collapsed, "lost_bytes": len(await p.verify()),
            "child_lost": len(await child.verify())}
