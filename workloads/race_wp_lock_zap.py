"""COW reuse of a THP whose lock another CPU holds, vs a split and a zap.

The process faults a THP and forks; the child exits, so the parent's PMD is
write-protected and its folio no longer marked exclusive, but it is the only mapping.
CPU 0 writes into the THP: do_huge_pmd_wp_page takes the PMD lock, finds the folio not
exclusive and tries its lock. CPU 1 meanwhile splits the THP (split_huge_page, as
/sys/kernel/debug/split_huge_pages does: it holds the folio lock throughout), then zaps
the whole 2 MiB (MADV_DONTNEED, under the mmap read lock as the fault). When the split
holds the lock, the fault must take a reference before it drops the PMD lock to sleep
on the folio lock (the split then fails: -EAGAIN, the THP stays), and once it has the
lock back, recheck the PMD (pmd_same): the zap may have emptied it, and the fault's
reference may be the folio's last. No folio may be freed while locked or while a fault
sleeps on its lock; the byte written reads back, or zero when the zap came after it.

    kmm run workloads/race_wp_lock_zap.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_wp_lock_zap.py --schedules 10000 --mode pct
"""

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
OFF = 8192 + 7


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    assert await p.madvise(a, 2 * MiB, "hugepage") == 0
    await p.store(a, b"\x01")
    assert k.smaps(p, a, 2 * MiB)[1] == 2048, "no THP to race on"
    child = await p.fork("child")
    await child.exit()

    async def writer(cpu):
        await p.on(cpu).store(a + OFF, b"\x02")

    async def splitter(cpu):
        q = p.on(cpu)
        split = await q.split_huge_page(a, 4096)
        return split, await q.madvise(a, 2 * MiB, "dontneed")

    _, (split, zapped) = await k.parallel(writer, splitter)
    assert split in (0, 1), f"split_huge_page split {split} folios"
    assert zapped == 0, f"MADV_DONTNEED returned {zapped}"
    got = await p.load(a + OFF)
    assert got in (b"\x00", b"\x02"), f"the byte written reads {got!r}"
    assert await p.load(a) == b"\x00", "a byte the zap emptied is not zero"
    return {"split": split, "lost_bytes": len(await p.verify())}
