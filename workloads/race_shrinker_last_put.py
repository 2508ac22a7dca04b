"""The deferred-split shrinker vs the last reference of a queued large folio.

Each round faults a 64 KiB mTHP and unmaps all of it but one 4 KiB page: the folio is
partially mapped and deferred_split_folio queues it (split_deferred; an mTHP rather
than a PMD THP only because its split is 32 times cheaper to emulate). Then CPU 1 runs
reclaim (memory.force_empty: its first round asks the deferred-split shrinker, which
takes each queued folio with folio_try_get under split_queue_lock and splits it),
after 0 to 8 loads of another page so its scan lands before, inside and after CPU 0's
munmap of that last page. The munmap's last folio_put frees the
folio: from the refcount reaching 0 until __folio_put takes it off the queue
(folio_unqueue_deferred_split, under split_queue_lock) the folio is still queued, and
only folio_try_get keeps the shrinker from taking a reference on memory being freed
(and splitting it, then freeing it a second time).

munmap returns 0 and nothing of the THP stays mapped; the free lists, the LRU and
the queue stay consistent (the invariant checker); memory faulted after every round
reads back.

    kmm run workloads/race_shrinker_last_put.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_shrinker_last_put.py --schedules 10000 --mode random
"""

MACHINE = {"memory": "128MiB"}
KiB = 1 << 10
PAGE = 4096
MTHP = 64 * KiB
DELAYS = (0, 1, 2, 3, 4, 5, 6, 8)


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    spare = await p.mmap(64 * KiB)
    assert await p.madvise(spare, 64 * KiB, "nohugepage") == 0
    await p.touch(spare, 64 * KiB, value=7)
    later = []
    for delay in DELAYS:
        r = await p.mmap(2 * MTHP)
        assert await p.madvise(r, 2 * MTHP, "hugepage") == 0
        a = (r + MTHP - 1) & ~(MTHP - 1)  # a 64 KiB-aligned block inside: one mTHP
        await p.touch(a, MTHP, value=3)
        # all of it but its first page goes: partially mapped, queued for deferred split
        assert await p.munmap(a + PAGE, MTHP - PAGE) == 0

        async def unmapper(cpu, a=a):
            return await p.on(cpu).munmap(a, PAGE)

        async def shrinker(cpu, delay=delay):
            q = p.on(cpu)
            for _ in range(delay):
                await q.load(spare)
            await k.force_empty()

        unmapped, _ = await k.parallel(unmapper, shrinker)
        assert unmapped == 0, f"munmap returned {unmapped}"
        assert k.smaps(p, a, MTHP) == (0, 0), "the mTHP is still mapped"
        b = await p.mmap(64 * KiB)  # reuses what was freed: it must read back
        await p.touch(b, 64 * KiB, value=0x40 + len(later))
        later.append(b)
    for i, b in enumerate(later):
        got = await p.load(b + 5 * PAGE)
        assert got == bytes([0x40 + i]), f"round {i}: memory faulted later reads {got!r}"
    return {"lost_bytes": len(await p.verify())}
