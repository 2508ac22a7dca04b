"""MADV_COLLAPSE on one CPU while another CPU forks, then both processes write.

CPU 0 collapses 2 MiB of small pages; CPU 1 forks the process (dup_mmap takes the
parent's mmap lock for write, so it runs wholly before or after the collapse's write
phase). A child forked before sees small pages now shared (the collapse copies them
into a THP exclusive to the parent and drops the parent's mappings; the child keeps the
old pages); a child forked after shares the new THP. Then the parent and the child each
write their own value: neither may see the other's writes, and no byte is lost:

    kmm run workloads/khugepaged_collapse_race_fork.py --cpus 2 --mode random --seed 5
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.touch(a, SIZE, value=3)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def forker(cpu):
        return await p.on(cpu).fork("child")

    collapsed, child = await k.parallel(collapser, forker)
    await k.parallel(lambda cpu: p.on(cpu).touch(a, SIZE, value=4, stride=64 << 10),
                     lambda cpu: child.on(cpu).touch(a + 4096, SIZE - 4096, value=5,
                                                     stride=64 << 10))
    return {"madvise": collapsed, "parent_lost": len(await p.verify()),
            "child_lost": len(await child.verify())}
