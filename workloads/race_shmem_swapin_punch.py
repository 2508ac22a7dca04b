"""Swap-in of shmem pages vs punch hole over them: a memfd of sixteen 4 KiB pages,
written and swapped out (its page cache holds swap entries), then at once CPU 0 reads
every page back (each read a fault that swaps the page in: shmem_swapin_folio) while
CPU 1 punches a hole over the middle eight (shmem_undo_range frees their swap
entries).

A swap-in claims the slot (swapcache_prepare), reads the page and puts it into the page
cache in place of the swap entry; the punch may free that entry meanwhile. The swap-in
must then find, before the page goes in, that the page cache no longer holds the entry
it read (shmem_confirm_swap), drop the page and look again: the hole reads zero, the
other pages their values:

    kmm explore workloads/race_shmem_swapin_punch.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "swap": "16MiB"}
PAGES = 16
HOLE = (4 * 4096, 8 * 4096)  # offset, length: pages 4 .. 11


async def main(k):
    p = await k.process("main")
    a = await p.mmap(PAGES * 4096, backing="memfd")
    for i in range(PAGES):
        await p.store(a + i * 4096, bytes([0x10 + i]))
    await k.memory_reclaim(4 * PAGES, swappiness=200)
    assert k.vmstat()["pswpout"] >= PAGES, k.vmstat()["pswpout"]

    async def reader(cpu):
        q = p.on(cpu)
        return [await q.load(a + i * 4096) for i in range(PAGES)]

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, *HOLE)

    got, punched = await k.parallel(reader, puncher)
    assert punched == 0, punched
    lo, hi = HOLE[0] // 4096, (HOLE[0] + HOLE[1]) // 4096
    for i in range(PAGES):
        # a page of the hole reads its value if read before the punch, else zero
        ok = (bytes([0x10 + i]), b"\x00") if lo <= i < hi else (bytes([0x10 + i]),)
        assert got[i] in ok, f"page {i} read {got[i]}"
        after = await p.load(a + i * 4096)
        assert after == (b"\x00" if lo <= i < hi else bytes([0x10 + i])), \
            f"page {i} reads {after} after the punch"
    return {"lost_bytes": len(await p.verify())}
