"""Swap-in of a whole 64 KiB folio vs MADV_DONTNEED of one of its pages: a 64 KiB mTHP
is paged out whole (sixteen swap PTEs, one slot each); then CPU 0 reads its first page
while CPU 1 MADV_DONTNEEDs its eighth.

The read's fault finds the slot's only reference in its PTE and, the block being all
swap entries, reads the whole 64 KiB folio in directly (skipping the swap cache). The
zap may clear the eighth PTE meanwhile. Under the PTE lock the fault must check again
that all sixteen PTEs are still the folio's swap entries (swap_pte_batch), and refault
if not (then only its own page comes back): the zapped page reads zero afterwards and
the other fifteen keep their bytes:

    kmm explore workloads/race_mthp_swapin_dontneed.py --schedules 1000 --mode pct
"""

KiB = 1 << 10
MACHINE = {"memory": "64MiB", "swap": "16MiB"}


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    a = await p.mmap(64 * KiB)
    await p.madvise(a, 64 * KiB, "hugepage")
    for i in range(16):
        await p.store(a + i * 4 * KiB, bytes([0x30 + i]))
    await p.madvise(a, 64 * KiB, "pageout")
    assert k.vmstat()["pswpout"] == 16, k.vmstat()["pswpout"]

    async def reader(cpu):
        return await p.on(cpu).load(a)

    async def zapper(cpu):
        return await p.on(cpu).madvise(a + 28 * KiB, 4 * KiB, "dontneed")

    got, zapped = await k.parallel(reader, zapper)
    assert (got, zapped) == (b"\x30", 0), (got, zapped)
    after = [await p.load(a + i * 4 * KiB) for i in range(16)]
    assert after == [bytes([0x30 + i]) if i != 7 else b"\x00" for i in range(16)], after
    return {"pswpin": k.vmstat()["pswpin"], "lost_bytes": len(await p.verify())}
