"""Punch hole vs fault on the same shmem THP: fallocate(PUNCH_HOLE) of 64 KiB inside a
PMD-mapped memfd THP on one CPU while another CPU writes across the same 2 MiB.

The punch unmaps the range from every mapper (the PMD is zapped whole), then splits
the page-cache folio under its lock and drops the pages of the hole; the writer's
faults either map the folio before the truncation takes its lock (and are unmapped by
it) or wait and map the small folios after; its reads of the hole either see the old
page (zeroed) or fault in a new zero page once the old one left the page cache. Bytes outside the hole keep their value;
bytes in the hole read zero unless rewritten after the punch. (The injected bug
``shmem_fault_no_truncate_recheck`` is exposed by race_shmem_punch_read.py.)

    kmm explore workloads/race_shmem_punch_fault.py --schedules 200 --jobs 1
"""

MiB = 1 << 20
SIZE = 2 * MiB
HOLE = 64 << 10


async def main(k):
    k.set_knob("shmem_enabled", "always")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="memfd")
    await p.touch(a, SIZE, value=1, stride=128 << 10)

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, 0, HOLE)

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(HOLE, SIZE, 256 << 10):
            await q.store(a + off + 4096, bytes([2]))
        for rnd in range(3):  # and reads of the hole: they race its truncation
            for off in range(0, HOLE, 16 << 10):
                await q.load(a + off)

    punched, _ = await k.parallel(puncher, writer)
    hole = await p.load(a, 1)
    return {"punch": punched, "hole": hole[0], "lost_bytes": len(await p.verify())}
