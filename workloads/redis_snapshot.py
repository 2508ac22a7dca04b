"""A Redis-like BGSAVE: fork a snapshot child while the parent keeps writing.

The parent holds a 16 MiB dataset in THPs. It forks; the child walks the whole dataset
(serialising the snapshot) on CPU 1 while the parent, on CPU 0, updates one 64-byte
value in every 512 KiB. Each update hits a THP now shared with the child: the PMD is
read-only, so do_huge_pmd_wp_page cannot reuse the folio and splits the PMD
(thp_split_pmd) to copy 4 KiB (the 5.8+ COW), so the dataset that was 8 THPs in the
parent comes out PTE-mapped where it was written. The child exits; the parent's memory
stays PTE-mapped until khugepaged collapses it. The result shows the cost of the
snapshot in the counters and in Rss/AnonHugePages before, during and after:

    kmm run workloads/redis_snapshot.py --cpus 2
"""

MiB = 1 << 20
DATASET = 16 * MiB
UPDATE_EVERY = 512 << 10


async def main(k):
    redis = await k.process("redis")
    a = await redis.mmap(DATASET)
    await redis.madvise(a, DATASET, "hugepage")
    await redis.touch(a, DATASET, value=0x11)
    before = k.vmstat()

    child = await redis.fork("bgsave")

    async def serialise(cpu):
        return await child.on(cpu).touch(a, DATASET, write=False, value=0x11)

    async def updates(cpu):
        p = redis.on(cpu)
        for off in range(0, DATASET, UPDATE_EVERY):
            await p.store(a + off, bytes([0x22]) * 64)

    def moved(since):
        now = k.vmstat()
        return {e: now[e] - since[e] for e in since if e.startswith("thp_") and now[e] != since[e]}

    mismatches, _ = await k.parallel(serialise, updates)
    during = {name: k.smaps(t, a, DATASET) for name, t in (("redis", redis), ("bgsave", child))}
    during_events = moved(before)
    at_exit = k.vmstat()
    await child.exit()
    after = k.smaps(redis, a, DATASET)
    return {
        "snapshot_mismatches": mismatches,   # the child must see the pre-fork dataset
        "thp_events_during_snapshot": during_events,
        # the child's PMDs go: each folio is left partially mapped by the parent's PTEs
        "thp_events_at_child_exit": moved(at_exit),
        "rss_anon_huge_kb_during": during,
        "rss_anon_huge_kb_after": after,
        "lost_bytes": len(await redis.verify()),
    }
