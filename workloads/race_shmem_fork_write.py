"""Fork + writes from both sides of a shared huge mapping: a parent and its child write
different bytes of the same shmem THP concurrently.

The parent's PMD maps the page-cache THP; fork copies no file PMD, so the child's
first access faults and maps the same folio by PMD. Both then store into it; each sees
the other's writes (the checker reads the page cache against every write).

    kmm explore workloads/race_shmem_fork_write.py --schedules 200 --jobs 1
"""

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    k.set_knob("shmem_enabled", "always")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="shmem")
    await p.touch(a, SIZE, value=1, stride=256 << 10)
    c = await p.fork("child")

    async def parent(cpu):
        q = p.on(cpu)
        for off in range(0, SIZE, 256 << 10):
            await q.store(a + off, bytes([2]))

    async def child(cpu):
        q = c.on(cpu)
        for off in range(0, SIZE, 256 << 10):
            await q.store(a + off + 4096, bytes([3]))

    await k.parallel(parent, child)
    seen = await c.load(a, 1)  # the parent's write, through the child's mapping
    return {"child_sees_parent": seen[0], "lost_bytes": len(await p.verify())
            + len(await c.verify())}
