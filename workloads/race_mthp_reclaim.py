"""Reclaim of mTHPs vs access: one CPU pages a range of 64 KiB folios out
(MADV_PAGEOUT: try_to_unmap of the whole folio, swap slots for all 16 pages, write)
while another CPU keeps storing into it and reading back (faults that meet swap
entries read the folio back, whole when its block is still all swap entries). No
byte may be lost.

    kmm run workloads/race_mthp_reclaim.py --cpus 2 --mode random --seed 5
    kmm explore workloads/race_mthp_reclaim.py --schedules 1000
"""

KiB = 1 << 10
MACHINE = {"memory": "64MiB", "swap": "16MiB"}


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    a = await p.mmap(128 * KiB)
    await p.madvise(a, 128 * KiB, "hugepage")
    await p.touch(a, 128 * KiB, value=1)

    async def reclaim(cpu):
        await p.on(cpu).madvise(a, 128 * KiB, "pageout")

    async def access(cpu):
        q = p.on(cpu)
        for off in (4 * KiB, 72 * KiB, 8 * KiB):
            await q.store(a + off, bytes([0xD0 + cpu]))
            await q.load(a + 64 * KiB + off % (64 * KiB))

    await k.parallel(reclaim, access)
    return {"lost_bytes": len(await p.verify())}
