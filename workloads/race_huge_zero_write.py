"""Write vs write on the huge zero page: a MADV_HUGEPAGE 2 MiB range is read first (the
read fault maps the huge zero folio with one PMD, use_zero_page is on), then two CPUs
write into it at once.

Each write meets the read-only huge zero PMD (do_huge_pmd_wp_page ->
do_huge_zero_wp_pmd): it allocates a THP, takes the PMD lock and installs it only if
the PMD is still the zero PMD it faulted on (pmd_same); the other frees its THP and
refaults onto the winner's. Each CPU writes bytes of its own; none may be lost, and one
THP maps the range at the end:

    kmm explore workloads/race_huge_zero_write.py --schedules 1000 --mode pct
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    assert await p.load(a + 4096) == b"\x00"
    assert k.vmstat()["thp_zero_page_alloc"] == 1, k.vmstat()["thp_zero_page_alloc"]

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(cpu * 4096, 2 * MiB, 512 << 10):
            await q.store(a + off, bytes([0xB0 + cpu]))

    await k.parallel(writer, writer)
    rss, huge = k.smaps(p, a, 2 * MiB)
    assert (rss, huge) == (2048, 2048), (rss, huge)
    return {"thp_fault_alloc": k.vmstat()["thp_fault_alloc"],
            "lost_bytes": len(await p.verify())}
