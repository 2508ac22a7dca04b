"""Memory bloat vs faults vs TLB reach, for 4 KiB pages, 16 KiB and 64 KiB mTHPs and
2 MiB THPs, on the same access pattern.

The pattern: a 256 MiB MADV_HUGEPAGE region holding 1,000 objects at seeded random
64 KiB-aligned slots; each object is written at 4 random offsets within its first
24 KiB (write pass), then read at the same offsets twice. Each size runs in its own process with only that size enabled
(hugepages-<size>kB/enabled = madvise, every other size never).

Columns: page faults of the write pass (pgfault) and its emulated time (fewer faults,
but each zeroes its whole folio, bloat included); Rss against the 4 KiB pages actually
touched (bloat: memory the process holds for bytes it never wrote); dTLB misses of the
last read pass (page walks after the TLB was warmed, on one CPU); and what one TLB
entry maps. On x86-64 an mTHP is still mapped by 4 KiB PTEs and cached as 4 KiB TLB
entries (no contiguous-PTE bit as arm64 has), so 16K/64K buy fewer faults at the price
of bloat but no TLB reach; only the PMD mapping does.

    kmm run workloads/mthp_tradeoff.py
"""

import random

KiB = 1 << 10
MiB = 1 << 20
REGION = 256 * MiB
OBJECTS = 1000
SIZES = ("4kB", "16kB", "64kB", "2048kB")
ANON_SIZES = ("16kB", "32kB", "64kB", "128kB", "256kB", "512kB", "1024kB", "2048kB")
MACHINE = {"memory": "1GiB"}


async def run_one(k, size, offsets):
    for s in ANON_SIZES:
        k.set_knob(f"hugepages-{s}/enabled", "madvise" if s == size else "never")
    p = await k.process(f"p{size}")
    a = await p.mmap(REGION)
    await p.madvise(a, REGION, "hugepage")
    f0, t0 = k.vmstat()["pgfault"], k.now
    for off in offsets:
        await p.store(a + off, b"\x01")
    faults, write_ns = k.vmstat()["pgfault"] - f0, k.now - t0
    for off in offsets:  # warm the TLB
        await p.load(a + off)
    w0 = k.tlb_misses()[0]
    for off in offsets:
        await p.load(a + off)
    misses = k.tlb_misses()[0] - w0
    rss, huge = k.smaps(p, a, REGION)
    touched = len({off // (4 * KiB) for off in offsets}) * 4
    await p.exit()
    return {"faults": faults, "write_pass_us": write_ns // 1000, "rss_kb": rss, "touched_kb": touched,
            "bloat": round(rss / touched, 2), "tlb_misses": misses,
            "tlb_entry_kb": 2048 if huge else 4}


async def main(k):
    rng = random.Random(1)
    slots = rng.sample(range(REGION // (64 * KiB)), OBJECTS)
    offsets = [s * 64 * KiB + rng.randrange(24 * KiB) for s in slots for _ in range(4)]
    rows = {size: await run_one(k, size, offsets) for size in SIZES}
    table = [f"{'size':>7} {'faults':>7} {'write us':>9} {'Rss kB':>8} {'touched kB':>10} "
             f"{'bloat':>6} {'TLB misses':>10} {'kB/TLB entry':>12}"]
    for size, r in rows.items():
        table.append(f"{size:>7} {r['faults']:>7} {r['write_pass_us']:>9} {r['rss_kb']:>8} "
                     f"{r['touched_kb']:>10} {r['bloat']:>6} {r['tlb_misses']:>10} "
                     f"{r['tlb_entry_kb']:>12}")
    return {"rows": rows, "table": table}
