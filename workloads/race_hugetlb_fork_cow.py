"""Fork vs fault, then COW vs COW, on private hugetlb pages.

Phase 1: one CPU of the parent forks while another CPU of the parent faults in a second
huge page (the mmap lock orders them: the fault lands before the fork, and the child
shares the page, or after it, and only the parent has it). Phase 2: parent and child
write the first page at once: both COWs (hugetlb_wp) run under the same fault mutex
(same file, same index), each copies into its own page, and the original page is freed
when the second one leaves it. Pool: one page per mapping page plus two for the copies.

    kmm explore workloads/race_hugetlb_fork_cow.py --schedules 1000
"""

MiB = 1 << 20


async def main(k):
    await k.set_hugetlb_pool(4)
    p = await k.process("main")
    a = await p.mmap(4 * MiB, backing="hugetlb")
    await p.store(a, b"\x01")
    box = {}

    async def forker(cpu):
        box["child"] = await p.on(cpu).fork("child")

    async def faulter(cpu):
        await p.on(cpu).store(a + 2 * MiB, b"\x02")

    res = await k.parallel(forker, faulter)
    assert not [r for r in res if isinstance(r, BaseException)], res
    c = box["child"]

    async def parent_cow(cpu):
        await p.on(cpu).store(a + 4096, b"\x03")

    async def child_cow(cpu):
        await c.on(cpu).store(a + 8192, b"\x04")

    res = await k.parallel(parent_cow, child_cow)
    assert not [r for r in res if isinstance(r, BaseException)], res
    assert await p.load(a + 8192) == b"\x00" and await c.load(a + 4096) == b"\x00"
    lost = len(await p.verify()) + len(await c.verify())
    mi = k.meminfo()
    return {"lost_bytes": lost, "free": mi["HugePages_Free"], "rsvd": mi["HugePages_Rsvd"]}
