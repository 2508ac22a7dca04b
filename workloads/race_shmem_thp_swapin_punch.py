"""Swap-in of a shmem THP vs punch hole inside it: a memfd THP (shmem_enabled=always)
is paged out whole (one 2 MiB swap entry in the page cache, 512 slots); then at once
CPU 0 reads pages across it (the first read's fault swaps the whole THP back in) while
CPU 1 punches a 64 KiB hole in its middle.

The punch cannot free part of a large swap entry: it leaves the entry to its
partial-folio step (shmem_get_partial_folio), which reads the THP back itself, then
zeroes the hole and splits the folio. Both swap-ins claim the same 512 slots
(swapcache_prepare): one reads, the other waits and finds the folio in the page cache.
The hole reads zero, every other byte its value, and no slot is left behind:

    kmm explore workloads/race_shmem_thp_swapin_punch.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "swap": "16MiB"}
MiB = 1 << 20
KiB = 1 << 10
HOLE = (1 * MiB, 64 * KiB)
OFFS = [i * 128 * KiB for i in range(16)]  # one byte every 128 KiB, the hole's first too


async def main(k):
    k.set_knob("shmem_enabled", "always")
    p = await k.process("main")
    a = await p.mmap(2 * MiB, backing="memfd")
    for j, off in enumerate(OFFS):
        await p.store(a + off, bytes([0x50 + j]))
    await p.madvise(a, 2 * MiB, "pageout")
    assert k.vmstat()["thp_swpout"] == 1, k.vmstat()["thp_swpout"]

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in OFFS]

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, *HOLE)

    got, punched = await k.parallel(reader, puncher)
    assert punched == 0, punched
    hole = OFFS.index(HOLE[0])
    for j, off in enumerate(OFFS):
        # the hole's byte reads its value if read before the punch, else zero
        ok = (bytes([0x50 + j]), b"\x00") if j == hole else (bytes([0x50 + j]),)
        assert got[j] in ok, f"{off:#x} read {got[j]}"
    after = [await p.load(a + off) for off in OFFS]
    assert after == [b"\x00" if j == hole else bytes([0x50 + j]) for j in range(16)], after
    return {"pswpin": k.vmstat()["pswpin"], "lost_bytes": len(await p.verify())}
