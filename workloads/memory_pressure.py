"""Memory pressure on a small machine: THPs swapped out and back, every byte kept.

A 32 MiB machine with 32 MiB of swap (zram-like: synchronous, as the oracle's). The
program writes 40 MiB of MADV_HUGEPAGE memory, more than the machine has, 2 MiB every
200 us (think time, during which kswapd gets the CPU). Faults take
free memory down to the low watermark, where the allocator wakes kswapd; kswapd
(daemons/kswapd.py) reclaims the coldest THPs until the high watermark: each is
isolated whole, its PMD split for the unmap (thp_split_pmd), written to a free 2 MiB
swap cluster in one piece (thp_swpout) or, when no cluster is free, split and written
4 KiB at a time (thp_swpout_fallback). Allocations that find memory below the min
watermark reclaim directly (allocstall). Then the program reads everything back:
each swapped page returns by a major fault as a 4 KiB page (pswpin), evicting others.

    kmm run workloads/memory_pressure.py
"""

MACHINE = {"memory": "32MiB", "swap": "32MiB", "cpus": 1}

MiB = 1 << 20
SIZE = 40 * MiB
THINK_NS = 200_000
EVENTS = ("thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd", "thp_split_page",
          "thp_swpout", "thp_swpout_fallback", "pswpout", "pswpin", "pgmajfault",
          "allocstall_normal", "pageoutrun", "pgsteal_kswapd", "pgsteal_direct")


async def main(k):
    p = await k.process("app")
    a = await p.mmap(SIZE)
    await p.madvise(a, SIZE, "hugepage")
    start = k.vmstat()
    for off in range(0, SIZE, 2 * MiB):  # one value per THP, written to every page
        await p.touch(a + off, 2 * MiB, value=1 + (off // (2 * MiB)) % 250)
        await k.sleep(THINK_NS)
    written = k.vmstat()
    rss_after_write = k.smaps(p, a, SIZE)
    bad = 0
    for off in range(0, SIZE, 2 * MiB):
        bad += await p.touch(a + off, 2 * MiB, write=False, value=1 + (off // (2 * MiB)) % 250)
        await k.sleep(THINK_NS)
    end = k.vmstat()
    return {
        "writing": {e: written.get(e, 0) - start.get(e, 0) for e in EVENTS},
        "reading_back": {e: end.get(e, 0) - written.get(e, 0) for e in EVENTS},
        "rss_anon_huge_kb_after_write": rss_after_write,
        "mismatches": bad,
        "lost_bytes": len(await p.verify()),
        "free_pages_vs_watermarks": k.zoneinfo(),
    }
