"""collapse_file vs punch hole vs a fault filling a hole, on one shmem block: CPU 0
collapses a memfd block of 4 KiB pages (MADV_COLLAPSE -> collapse_file), CPU 1 punches
a 64 KiB hole in it (fallocate PUNCH_HOLE), CPU 2 writes into pages the block has never
had (holes in the page cache).

collapse_file locks the small folios one by one and keeps them locked until the new
THP has replaced them in the page cache, copying with the i_pages lock dropped. The
punch locks each folio of the hole in turn (shmem_undo_range): whichever waits for the
other's folio lock must look again once it has it (a collapse that finds a folio gone
gives up, SCAN_TRUNCATED; a punch that finds the folio no longer in the file looks up
what is there now: the THP, which it zeroes and splits). The writer's fault puts a new
small folio into a hole the collapse counted as empty: before the new THP goes in, the
collapse must find the hole filled (SCAN_PAGE_FILLED) and give up. The hole reads zero
and every other byte keeps its value, the writer's included:

    kmm explore workloads/race_shmem_punch_collapse.py --schedules 1000 --mode pct
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal as a result

MACHINE = {"cpus": 3}
MiB = 1 << 20
SIZE = 2 * MiB
STRIDE = 32 << 10  # the pages touched first; the ones between are holes
HOLE = 64 << 10
AT = 512 << 10  # the hole punched: [AT, AT + HOLE)
FILL = (4096, MiB + 4096, SIZE - 4096)  # holes the writer fills


async def main(k):
    k.set_knob("shmem_enabled", "advise")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="memfd")
    await p.touch(a, SIZE, value=1, stride=STRIDE)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, AT, HOLE)

    async def writer(cpu):
        q = p.on(cpu)
        for off in FILL:
            await q.store(a + off, b"\x07")

    collapsed, punched, _ = await k.parallel(collapser, puncher, writer)
    assert punched == 0, punched
    # a folio the punch holds locked or removed, or a hole filled, fails the collapse
    k.expect(collapsed, "EAGAIN", "EINVAL", what="MADV_COLLAPSE vs punch hole and fill")
    got = [await p.load(a + off) for off in (AT - STRIDE, AT, AT + STRIDE, AT + HOLE)]
    assert got == [b"\x01", b"\x00", b"\x00", b"\x01"], f"reads {got}"
    filled = [await p.load(a + off) for off in FILL]
    assert filled == [b"\x07"] * len(FILL), f"the filled holes read {filled}"
    return {"madvise": collapsed, "lost_bytes": len(await p.verify())}
