"""Punch hole vs read faults on 4 KiB shmem pages: fallocate(PUNCH_HOLE) of 128 KiB of a
memfd on one CPU while another CPU keeps reading the same pages.

Truncation locks each page, unmaps it from every mapper and takes it out of the page
cache. A read fault either maps the page before (fault-around or ->fault; the
truncation then unmaps it) or finds it locked, waits, and must notice after locking it
that the page left the page cache, look again and fault in a new zero page. Exposes the
injected bug ``shmem_fault_no_truncate_recheck`` (kmm/bugs.py):

    kmm explore workloads/race_shmem_punch_read.py --mode pct --schedules 300 \
        --inject shmem_fault_no_truncate_recheck      # found at schedule 73 (seed 74)
"""

KiB = 1 << 10
SIZE = 256 * KiB
HOLE = 128 * KiB


async def main(k):
    k.set_knob("shmem_enabled", "never")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="memfd")
    await p.touch(a, SIZE, value=1)

    async def puncher(cpu):
        return await p.on(cpu).fallocate_punch_hole(a, 0, HOLE)

    async def reader(cpu):
        q = p.on(cpu)
        seen = 0
        for rnd in range(4):
            for off in range(0, HOLE, 4 * KiB):
                seen += (await q.load(a + off))[0]
        return seen

    punched, _ = await k.parallel(puncher, reader)
    zero = (await p.load(a))[0]
    return {"punch": punched, "hole": zero, "lost_bytes": len(await p.verify())}
