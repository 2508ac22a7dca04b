"""Swap-ins of 64 KiB shmem folios vs a punch inside one: a 2 MiB memfd filled with
64 KiB folios (hugepages-64kB/shmem_enabled=always, the global knob never) is paged
out, each folio whole (a 64 KiB swap entry of 16 slots); then at once CPU 0 reads a
byte of every other folio (each read's fault swaps a whole folio back in) while CPU 1
punches 16 KiB out of the middle of the folio at 1 MiB.

The punch cannot free part of a large swap entry: it leaves the entry to its
partial-folio step (shmem_get_partial_folio), which reads the folio back itself, then
zeroes the hole and splits the folio (non-uniformly: 32 + 16 + 16 KiB, the hole one of
the 16 KiB halves, which is then truncated).
The two swap-ins of that folio claim the same 16 slots (swapcache_prepare): one reads,
the other looks again and finds the folio in the page cache. The hole reads zero,
every other byte its value, and no slot is left behind:

    kmm explore workloads/race_shmem_mthp_swapin_punch.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "swap": "16MiB"}
MiB = 1 << 20
KiB = 1 << 10
HOLE = (1 * MiB + 16 * KiB, 16 * KiB)
OFFS = [i * 128 * KiB for i in range(16)] + [HOLE[0]]  # a byte every 128 KiB, the hole's


async def main(k):
    k.set_knob("shmem_enabled", "never")
    k.set_knob("hugepages-64kB/shmem_enabled", "always")
    p = await k.process("main")
    a = await p.mmap(2 * MiB, backing="memfd")
    for j, off in enumerate(OFFS):
        await p.store(a + off, bytes([0x50 + j]))
    await p.madvise(a, 2 * MiB, "pageout")
    assert k.vmstat()["pswpout"] == 16 * 16, k.vmstat()["pswpout"]  # 16 folios whole

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
    assert after == [b"\x00" if j == hole else bytes([0x50 + j]) for j in range(len(OFFS))], \
        after
    return {"pswpin": k.vmstat()["pswpin"], "lost_bytes": len(await p.verify())}
