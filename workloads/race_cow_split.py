"""Write fault (COW reuse) vs split: a THP left write-protected by a fork is written on
one CPU while another CPU splits it.

The process faults a THP and forks; the child exits, so the parent's PMD is
write-protected and its folio no longer marked exclusive, but it is the only mapping.
CPU 0 then writes across the THP: the first store takes do_huge_pmd_wp_page, which
reuses the folio in place (one mapping, refcount 1) after folio_trylock, or, when the
split holds the folio lock, takes a reference, sleeps on the lock and rechecks
pmd_same once it has it back. CPU 1 meanwhile splits the THP (split_huge_page, as
/sys/kernel/debug/split_huge_pages does): try_to_migrate freezes the PMD into migration
entries, the refcount is frozen (a fault's extra reference makes the split fail with
-EAGAIN), the folio becomes 512 pages, remap_page maps them again. Every store must land
and every page be accounted for. Exposes the injected bugs ``huge_wp_no_pmd_same_recheck``
and ``split_no_ref_freeze`` (kmm/bugs.py):

    kmm run workloads/race_cow_split.py --cpus 2 --mode random --seed 4
    kmm explore workloads/race_cow_split.py --schedules 10000
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.store(a, b"\x01")
    child = await p.fork("child")
    await child.exit()

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, 2 * MiB, 256 << 10):
            await q.store(a + off + 4096, bytes([2 + (off >> 18)]))

    async def splitter(cpu):
        return await p.on(cpu).split_huge_page(a, 2 * MiB)

    _, split = await k.parallel(writer, splitter)
    return {"split": split, "lost_bytes": len(await p.verify())}
