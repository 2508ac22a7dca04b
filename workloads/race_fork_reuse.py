"""Reuse after fork: what each process reads after the other writes or exits.

The parent faults a THP and a VM_NOHUGEPAGE 4 KiB region, writes a pattern, forks.

- round 0, both write: parent (CPU 0) and child (CPU 1) write their own byte at the
  same addresses, in the THP (the first write splits the writer's PMD and copies
  4 KiB: do_huge_pmd_wp_page, do_wp_page) and in a 4 KiB page; each then reads back
  its own byte, and the pre-fork pattern everywhere else. A COW that reused a page
  still mapped by the other process, or copied from the wrong side, shows here. Then
  the parent's CPU 1 reads a shared page, CPU 0 writes it (a COW copy): CPU 1 must read
  the new byte (its cached translation of the old page was flushed).
- round 1, exit vs write: a second child exits (CPU 1) while the parent writes into
  pages they shared (CPU 0): the parent's fault copies while the child still maps the
  page, or reuses it once the child's exit dropped its mapping (wp_can_reuse_anon_folio,
  the exclusive THP reused in place); the parent reads its byte either way, the first
  child's view does not change.

    kmm run workloads/race_fork_reuse.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_fork_reuse.py --schedules 10000 --mode pct
"""

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
OFFS = (4096, MiB + 8192)  # in the THP: two pages in different halves


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    assert await p.madvise(a, 2 * MiB, "hugepage") == 0
    await p.touch(a, 2 * MiB, value=0x41, stride=256 << 10)
    small = await p.mmap(64 << 10)
    assert await p.madvise(small, 64 << 10, "nohugepage") == 0
    await p.touch(small, 64 << 10, value=0x42)
    addrs = [a + o for o in OFFS] + [small + 4096 + 7]
    child = await p.fork("child")

    async def write_own(q, value):
        for x in addrs:
            await q.store(x, bytes([value]))
        return [(await q.load(x))[0] for x in addrs]

    async def parent(cpu):
        return await write_own(p.on(cpu), 0x50)

    async def kid(cpu):
        return await write_own(child.on(cpu), 0x60)

    mine, theirs = await k.parallel(parent, kid)
    assert mine == [0x50] * len(addrs), f"parent reads {mine}"
    assert theirs == [0x60] * len(addrs), f"child reads {theirs}"

    # the parent's other CPU: a translation it cached before the parent's COW write
    # must be gone once that write returned (ptep_clear_flush / the PMD split's flush)
    for x in (small + 3 * 4096, a + 5 * 4096):
        await p.on(1).load(x)  # CPU 1 caches the translation of the shared page
        await p.on(0).store(x, b"\x77")
        got = await p.on(1).load(x)
        assert got == b"\x77", f"CPU 1 reads {got!r} at {x:#x} after CPU 0's COW write"

    second = await p.fork("second")

    async def exiter(cpu):
        await second.on(cpu).exit()

    async def rewriter(cpu):
        q = p.on(cpu)
        for x in (a + 3 * 4096, a + (MiB >> 1), small + 8192):
            await q.store(x, b"\x70")
            assert await q.load(x) == b"\x70"

    await k.parallel(rewriter, exiter)
    got = [(await child.load(x))[0] for x in addrs]
    assert got == [0x60] * len(addrs), f"child reads {got} after the parent wrote"
    return {"lost_bytes": len(await p.verify()), "child_lost": len(await child.verify())}
