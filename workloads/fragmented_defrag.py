"""THP faults on a fragmented machine, under each ``defrag`` mode.

For each mode the program fragments memory the way a long-running machine is: every
pageblock of an arena holds a few scattered movable pages (4K anonymous pages of a
"frag" process, one per 256 KiB), every other pageblock also holds one unmovable kernel
page, and there is plenty of free memory but no free 2 MiB block. Memory outside the
arena is held by the program as order-9 kernel allocations. Then a "thp" process faults
eight 2 MiB ranges of a MADV_HUGEPAGE mapping and eight of a plain one (enabled=always),
alternately, with 1 ms of think time between faults. The result, per mode and kind of
mapping: thp_fault_alloc, thp_fault_fallback, compact_stall / compact_success /
compact_fail, and the emulated fault latency (min, median, p90, max, in ns); per mode,
kcompactd's work (compact_daemon_*) and the pages migrated.

What the kernel does (vma_thp_gfp_mask): ``never`` never stalls; ``madvise`` stalls in
direct compaction for the madvised mapping only and does nothing for the other;
``defer+madvise`` stalls for the madvised mapping and wakes kswapd for the other;
``defer`` never stalls and only wakes kswapd; ``always`` stalls for both (the plain
mapping with __GFP_NORETRY: async compaction only, given up early). Pageblocks with an
unmovable page cannot be freed, so about half the faults can succeed at best, each
compacting one pageblock: a success costs the migration of a few pages and the 2 MiB
clear (~100 us), a failed stall a few scans of the zone. kswapd has nothing to reclaim
here (anonymous memory, no swap): each wake-up is a failed run, and only after 16 of
them (a hopeless node) does wakeup_kswapd hand the requests to kcompactd, so the modes
run from the one that never stalls to the one that always does, and under ``defer``
the first faults fall back before kcompactd starts freeing blocks for the later ones.

    kmm run workloads/fragmented_defrag.py
"""

MACHINE = {"memory": "128MiB"}  # a small machine: fragmenting it all is quick

MiB = 1 << 20
PAGE = 4096
PAGEBLOCK_ORDER = 9
PAGEBLOCK = 1 << PAGEBLOCK_ORDER
MODES = ("never", "madvise", "defer+madvise", "defer", "always")
FAULTS = 8              # 2 MiB ranges faulted per mapping and mode
SPACING = 64            # one movable page per SPACING pages (256 KiB)
THINK_NS = 1_000_000    # between two faults
EVENTS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_success",
          "compact_fail")


def arena_blocks_needed(k, faults: int) -> int:
    """Pageblocks the arena needs so that, fragmented, its free memory stays above
    what compaction_suitable asks for (min + compact_gap + low - min) after the THPs
    that can succeed are allocated."""
    z = k.zoneinfo()
    need = z["low"] + 2 * PAGEBLOCK + 2 * faults * PAGEBLOCK + 4 * PAGEBLOCK
    return min(-(-need // PAGEBLOCK) + 1, z["present"] // PAGEBLOCK - 2)


async def fragment(k, proc, arena_blocks: int,
                   unmovable=lambda i: i % 2 == 0, spacing: int = SPACING) -> dict:
    """Fragment memory: ``arena_blocks`` pageblocks each end up with one movable page
    (of ``proc``) every ``spacing`` pages, and one unmovable page in the blocks
    ``unmovable(i)`` selects; all other memory is pinned by order-9 allocations. The
    free memory is all in blocks below order 9. Returns what to undo later."""
    # The movable pages' mapping, with its page tables made now (in low memory).
    nslots = arena_blocks * (PAGEBLOCK // spacing)
    length = nslots
    while length - -(-length // PAGEBLOCK) < nslots:  # pages present after pre-touch
        length += 1
    size = -(-length // PAGEBLOCK) * 2 * MiB
    a = await proc.mmap(size)
    await proc.madvise(a, size, "nohugepage")
    await proc.touch(a, size, stride=2 * MiB, value=0x11)
    # Drain the small free blocks, then pin every pageblock: lowest ones become the arena.
    drained = []
    while True:
        small = [o for o, n in enumerate(k.buddyinfo()[:PAGEBLOCK_ORDER]) if n]
        if not small:
            break
        drained.append(await k.alloc_kernel_pages(small[0], reserves=True))
    blocks = []
    while (pfn := await k.alloc_kernel_pages(PAGEBLOCK_ORDER, reserves=True)) >= 0:
        blocks.append(pfn)
    blocks.sort()
    arena, held = blocks[:arena_blocks], blocks[arena_blocks:]
    # A cushion of free pageblocks above the high watermark keeps the carving below on
    # the allocator's fast path; it is pinned again afterwards.
    cushion = min(-(-(k.zoneinfo()["high"] + 2 * PAGEBLOCK) // PAGEBLOCK), len(held))
    for b in held[len(held) - cushion:]:
        await k.free_kernel_pages(b)
    # Carve each arena block: freed, it is the only free block of its size, so the
    # buddy allocator splits it from its start: per group of ``spacing`` pages a guard,
    # its buddy (the future movable page), then blocks of order 1, 2, ...
    slots, guards, pieces = [], [], []
    for b in arena:
        await k.free_kernel_pages(b)
        for q in range(b, b + PAGEBLOCK, spacing):
            got = [await k.alloc_kernel_pages(0, reserves=True), await k.alloc_kernel_pages(0, reserves=True)]
            order = 1
            while 1 << order < spacing:
                got.append(await k.alloc_kernel_pages(order, reserves=True))
                order += 1
            want = [q, q + 1] + [q + (1 << o) for o in range(1, order)]
            if got != want:
                raise RuntimeError(f"carving pageblock {b:#x}: got {got}, expected {want}")
            guards.append(q)   # buddies: q and q + 1; the movable page goes second
            slots.append(q + 1)
            pieces += got[2:]
    for i in range(len(held) - cushion, len(held)):  # the only free pageblocks left
        held[i] = await k.alloc_kernel_pages(PAGEBLOCK_ORDER, reserves=True)
    for p in pieces:       # no merging: each buddy holds a slot or a guard
        await k.free_kernel_pages(p)
    for q in sorted(slots, reverse=True):  # LIFO: the faults take them lowest first
        await k.free_kernel_pages(q)
    await proc.touch(a, length * PAGE, value=0x22)
    unmov = [b for i, b in enumerate(arena) if unmovable(i)]  # a guard stays
    for g in guards:
        if g not in unmov:
            await k.free_kernel_pages(g)
    for p in drained:
        await k.free_kernel_pages(p)
    return {"pinned": held + unmov, "arena": arena, "unmovable": unmov, "addr": a,
            "size": size, "pages": length, "slots": slots}


def _stats(ns: list[int]) -> dict:
    s = sorted(ns)
    rank = lambda q: s[max(0, -(-len(s) * q // 100) - 1)]  # noqa: E731 (nearest rank)
    return {"min": s[0], "median": rank(50), "p90": rank(90), "max": s[-1]}


async def run_mode(k, mode: str) -> dict:
    frag = await k.process(f"frag-{mode}")
    state = await fragment(k, frag, arena_blocks_needed(k, FAULTS))
    k.set_knob("defrag", mode)
    thp = await k.process(f"thp-{mode}")
    regions = {}
    for kind in ("madvised", "not_madvised"):
        r = await thp.mmap(FAULTS * 2 * MiB)
        if kind == "madvised":
            await thp.madvise(r, FAULTS * 2 * MiB, "hugepage")
        regions[kind] = r
    out = {kind: {"events": dict.fromkeys(EVENTS, 0), "latency_ns": []} for kind in regions}
    start = k.vmstat()
    for i in range(FAULTS):
        for kind, r in regions.items():
            before = k.vmstat()
            t0 = k.now
            await thp.touch(r + i * 2 * MiB, 1, value=0x33)
            out[kind]["latency_ns"].append(k.now - t0)
            after = k.vmstat()
            for e in EVENTS:
                out[kind]["events"][e] += after[e] - before[e]
            await k.sleep(THINK_NS)  # kcompactd, if woken, runs meanwhile
    ev = k.vmstat()
    out["kcompactd"] = {e: ev[e] - start[e] for e in (
        "compact_daemon_wake", "compact_daemon_migrate_scanned", "compact_daemon_free_scanned")}
    out["pgmigrate_success"] = ev["pgmigrate_success"] - start["pgmigrate_success"]
    bad = await thp.verify() + await frag.verify()
    await thp.exit()
    await frag.exit()
    for p in state["pinned"]:
        await k.free_kernel_pages(p)
    for kind in regions:
        out[kind]["latency_ns"] = _stats(out[kind]["latency_ns"])
    out["lost_bytes"] = len(bad)
    return out


async def main(k):
    k.set_knob("enabled", "always")
    return {mode: await run_mode(k, mode) for mode in MODES}
