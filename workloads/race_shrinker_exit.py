"""The deferred-split shrinker vs munmap and vs exit.

A THP whose second half is unmapped is partially mapped: deferred_split_folio queues it
(thp_deferred_split_page). CPU 1 then runs reclaim (memory.force_empty, as the
scenarios' reclaim step): the deferred-split shrinker takes each queued folio with
folio_try_get under the queue lock, and splits it (thp_split_page) with its folio
lock. CPU 0 meanwhile:

- round 0: unmaps the first half too (munmap returns 0): the last mapping goes, the
  folio is freed and leaves the queue (folio_unqueue_deferred_split) unless the
  shrinker holds its reference, in which case the shrinker's folio_put frees it;
- round 1: a second process holding such a folio exits (exit_mmap zaps and frees it)
  while the shrinker scans.

No folio is left on the queue or the LRU once freed, none is freed twice, nothing
stays mapped, and memory faulted afterwards reads back (the invariant checker's queue,
LRU and free-list checks).

    kmm run workloads/race_shrinker_exit.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_shrinker_exit.py --schedules 10000 --mode pct
"""


MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
SIZE = 2 * MiB


async def half_mapped_thp(k, p):
    """A THP with its second half unmapped (queued for deferred split)."""
    a = await p.mmap(SIZE)
    assert await p.madvise(a, SIZE, "hugepage") == 0
    await p.touch(a, SIZE, value=3, stride=128 << 10)
    assert k.smaps(p, a, SIZE)[1] == 2048, "no THP faulted"
    assert await p.munmap(a + MiB, MiB) == 0
    return a


async def main(k):
    p = await k.process("main")
    queued = k.vmstat().get("thp_deferred_split_page", 0)
    a = await half_mapped_thp(k, p)
    victim = await k.process("victim")
    await half_mapped_thp(k, victim)
    assert k.vmstat().get("thp_deferred_split_page", 0) - queued == 2

    async def unmapper(cpu):
        q = p.on(cpu)
        await q.load(a)
        return await q.munmap(a, MiB)

    async def shrinker(cpu):
        await k.force_empty()

    unmapped, _ = await k.parallel(unmapper, shrinker)
    assert unmapped == 0, f"munmap returned {unmapped}"
    assert k.smaps(p, a, SIZE) == (0, 0)
    b = await p.mmap(MiB)  # bytes written after the race read back
    await p.touch(b, MiB, value=5, stride=64 << 10)

    async def exiter(cpu):
        await victim.on(cpu).exit()

    await k.parallel(exiter, shrinker)
    return {"lost_bytes": len(await p.verify())}
