"""move_pages(2) of a partially mapped mTHP vs the deferred-split shrinker.

Each round faults four 64 KiB mTHPs on node 0 and unmaps the second half of each: they
are partially mapped and deferred_split_folio queues them, in order. CPU 1 then runs
reclaim (memory.force_empty: the deferred-split shrinker takes the queued folios off the
queue with folio_try_get under split_queue_lock, then splits them one by one under
their folio locks: the last one waits in the shrinker's batch while the first three are
split) while CPU 0, after 0 to 24 loads, moves the last one to node 1 (move_pages: the
folio is isolated and migrated whole).

While the shrinker holds its reference the folio is off the queue, and only the
migration's refcount freeze (folio_ref_freeze to the expected count, in
__folio_migrate_mapping) refuses to move it: a move would leave the shrinker splitting
the old, unmapped copy while the new folio, partially mapped, is on no queue (the
migration requeues the destination only when the source was queued), so its unmapped
half is never freed (the leak fixed by a2e0c0668a34, "requeue destination folio on
deferred split queue", reached here through the shrinker).

move_pages returns 0 with the folio on node 1 (or only the addressed page, when the
shrinker split the folio first), or leaves it on node 0 (one page not migrated: locked
or referenced; or -ENOENT while the shrinker's split has the PTEs as migration
entries); every byte reads back; and once reclaim has run again with nothing racing,
no 64 KiB folio is left: every partially mapped one was on the queue and split
(hugepages-64kB/stats/nr_anon and nr_anon_partially_mapped back to 0).

    kmm run workloads/race_migrate_shrinker.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_migrate_shrinker.py --schedules 1000 --mode pct
    kmm mutate migrate_no_ref_freeze     # killed within a few random or pct schedules
"""

MACHINE = {"memory": "64MiB", "nodes": 2}
KiB = 1 << 10
PAGE = 4096
MTHP = 64 * KiB
HALF = MTHP // 2
DELAYS = (0, 8, 24)
DECOYS = 3  # queued ahead of the moved folio: the shrinker splits them first
ENOENT = -2


async def partially_mapped_mthp(k, p, value):
    """A 64 KiB mTHP on node 0 whose second half is unmapped: queued for deferred split
    (at the tail of the queue)."""
    r = await p.mmap(2 * MTHP)
    assert await p.madvise(r, 2 * MTHP, "hugepage") == 0
    a = (r + MTHP - 1) & ~(MTHP - 1)  # a 64 KiB-aligned block inside: one mTHP
    await p.touch(a, MTHP, value=value)
    assert p.numa_maps(a, MTHP)["pages"] == {"0": 16}, "the mTHP is not on node 0"
    partial = k.mthp_stats("64kB")["nr_anon_partially_mapped"]
    assert await p.munmap(a + HALF, HALF) == 0
    assert k.mthp_stats("64kB")["nr_anon_partially_mapped"] == partial + 1
    return a


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    spare = await p.mmap(64 * KiB)
    assert await p.madvise(spare, 64 * KiB, "nohugepage") == 0
    await p.touch(spare, 64 * KiB, value=7)
    for rnd, delay in enumerate(DELAYS):
        for _ in range(DECOYS + 1):  # the last one is the folio moved
            a = await partially_mapped_mthp(k, p, 0x20 + rnd)

        async def mover(cpu, a=a, delay=delay):
            q = p.on(cpu)
            for _ in range(delay):
                await q.load(spare)
            return await q.move_pages([a], nodes=[1])

        async def shrinker(cpu):
            await k.force_empty()

        (left, status), _ = await k.parallel(mover, shrinker)
        where = p.numa_maps(a, HALF)["pages"]
        if (left, status) == (0, [1]):
            # the whole folio moved, or (split by the shrinker first) only its first page
            assert where in ({"1": 8}, {"0": 7, "1": 1}), \
                f"round {rnd}: moved, but its pages are on {where}"
        else:
            assert (left, status) in ((1, [0]), (0, [ENOENT])), \
                f"round {rnd}: move_pages returned {left}, status {status}"
            assert where == {"0": 8}, f"round {rnd}: not moved, but its pages are on {where}"
    lost = await p.verify()
    assert not lost, f"{len(lost)} bytes do not read back"
    # nothing races now: the shrinker finds every partially mapped folio on its queue
    await k.force_empty()
    stats = k.mthp_stats("64kB")
    assert stats["nr_anon_partially_mapped"] == 0 and stats["nr_anon"] == 0, \
        f"partially mapped 64 KiB folios escaped the deferred split queue: {stats}"
    return {"lost_bytes": 0}
