"""MADV_DONTNEED vs fault on the same THP, both under the mmap read lock.

The process faults a THP and forks; the child keeps it shared, so the parent's PMD is
write-protected. CPU 0 then writes into the THP: the write fault finds the folio shared,
splits the parent's PMD (__split_huge_pmd) and copies the one 4 KiB page it writes
(do_wp_page). CPU 1 meanwhile drops the whole 2 MiB (MADV_DONTNEED): zap_pmd_range sees
a huge PMD without a lock and zap_huge_pmd rechecks it under the PMD lock
(__pmd_trans_huge_lock), so a PMD the fault has just split is zapped PTE by PTE
instead. The parent's bytes read back as written or as zero (the DONTNEED came after),
the child's are untouched. Exposes the injected bug ``zap_huge_pmd_no_recheck``
(kmm/bugs.py):

    kmm run workloads/race_dontneed_fault.py --cpus 2 --mode random --seed 2
    kmm explore workloads/race_dontneed_fault.py --schedules 10000
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.store(a, b"\x05")
    child = await p.fork("child")

    async def writer(cpu):
        q = p.on(cpu)
        for off in (4096, MiB, 4096):
            await q.store(a + off, b"\x06")

    async def dropper(cpu):
        q = p.on(cpu)
        for _ in range(12):  # reads first: the write fault gets under way meanwhile
            await q.load(a + MiB + 8192)
        return await q.madvise(a, 2 * MiB, "dontneed")

    _, dropped = await k.parallel(writer, dropper)
    assert dropped == 0, f"MADV_DONTNEED returned {dropped}"
    got = await p.load(a)
    assert got == b"\x00", f"byte 0 reads {got!r} after MADV_DONTNEED"
    return {"madvise": dropped, "lost_bytes": len(await p.verify()),
            "child_lost": len(await child.verify())}
