"""Fault vs fault on one THP: two CPUs write-fault the same MADV_HUGEPAGE 2 MiB at once.

Both read the PMD as none without a lock, allocate a THP and a table to deposit, and
take the PMD lock to install: __do_huge_pmd_anonymous_page's pmd_none recheck under the
lock lets exactly one in; the other frees its folio and table and refaults onto the
winner's THP. Each CPU then writes a few more bytes; none may be lost. Exposes the
injected bug ``huge_fault_no_pmd_none_recheck`` (kmm/bugs.py):

    kmm run workloads/race_fault_fault.py --cpus 2 --mode random --seed 7
    kmm explore workloads/race_fault_fault.py --schedules 10000
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(cpu * 4096, 2 * MiB, 512 << 10):  # 4 stores, one page apart
            await q.store(a + off, bytes([0xA0 + cpu]))

    await k.parallel(writer, writer)
    rss, huge = k.smaps(p, a, 2 * MiB)
    assert huge == 2048, f"the range is not one THP: AnonHugePages {huge} kB"
    return {"anon_huge_kb": huge, "lost_bytes": len(await p.verify())}
