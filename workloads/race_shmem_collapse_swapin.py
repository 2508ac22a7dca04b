"""collapse_file's swap-in vs a fault's swap-in vs punch hole, on one shmem block: a memfd
block of 4 KiB pages, eight of them swapped out, then at once CPU 0 collapses it
(MADV_COLLAPSE: collapse_file reads each swapped page back with shmem_get_folio and
keeps it locked with the others), CPU 1 punches a hole over two swapped pages
(shmem_undo_range frees their swap entries, or truncates the folios read back), CPU 2
reads swapped pages, one inside the hole (each read a fault that swaps the page in).

Two swap-ins of one entry race for its slot (swapcache_prepare): the loser looks
again and finds the winner's folio in the page cache. The collapse and the punch meet
on the folio lock of a page read back: a collapse whose entry was freed by the punch
finds a hole where it looked for a page (SCAN_FAIL); a punch that finds the folio
locked waits, and then finds either the small folio or the new THP, which it zeroes
and splits. The hole reads zero, every other page its value:

    kmm explore workloads/race_shmem_collapse_swapin.py --schedules 1000 --mode pct
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal as a result

MACHINE = {"cpus": 3, "memory": "64MiB", "swap": "16MiB"}
KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB
STRIDE = 32 * KiB  # the pages touched; the ones between are holes
OUT = (256 * KiB, 256 * KiB)  # paged out: the eight touched pages of [256K, 512K)
HOLE = (320 * KiB, 64 * KiB)  # punched: the swapped pages at 320K and 352K
READ = (256 * KiB, 320 * KiB, 416 * KiB)  # swapped pages the reader faults in


async def main(k):
    k.set_knob("shmem_enabled", "advise")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="memfd")
    await p.touch(a, SIZE, value=1, stride=STRIDE)
    await p.madvise(a + OUT[0], OUT[1], "pageout")
    assert k.vmstat()["pswpout"] == OUT[1] // STRIDE, k.vmstat()["pswpout"]

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, *HOLE)

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + off) for off in READ]

    collapsed, punched, read = await k.parallel(collapser, puncher, reader)
    assert punched == 0, punched
    # a swap entry freed under the collapse, or a folio the punch holds, fails it
    k.expect(collapsed, 0, "EAGAIN", "EINVAL", what="MADV_COLLAPSE vs swap-in and punch")
    lo, hi = HOLE[0], HOLE[0] + HOLE[1]
    for off, got in zip(READ, read):
        # a page of the hole reads its value if read before the punch, else zero
        ok = (b"\x01", b"\x00") if lo <= off < hi else (b"\x01",)
        assert got in ok, f"the read at {off // KiB}K got {got}"
    for off in range(0, SIZE, STRIDE):
        after = await p.load(a + off)
        want = b"\x00" if lo <= off < hi else b"\x01"
        assert after == want, f"{off // KiB}K reads {after} after the race"
    return {"madvise": collapsed, "lost_bytes": len(await p.verify())}
