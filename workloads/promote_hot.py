"""Which 2 MiB blocks become THPs first, and which should not at all: stock khugepaged
against a research promotion daemon (daemons/hawkeye.py).

One process maps 64 MiB with MADV_HUGEPAGE after populating it with 4 KiB pages: 28
sparse blocks (8 pages each, touched now and then) at the low addresses, then 4 dense
hot blocks (all 512 pages, swept every epoch). The hot sweep needs 2048 4 KiB
translations, more than the 1536 the emulated second-level TLB holds, so every access
misses until the hot blocks are THPs (4 2 MiB entries).

    kmm run workloads/promote_hot.py                                         # stock khugepaged
    kmm run workloads/promote_hot.py --daemon kmm.daemons.hawkeye:HawkEye    # the research daemon

With no promotion daemon given, the program starts khugepaged. Both get the same budget
(pages_to_scan 4096: 8 blocks a pass) and period (scan_sleep_millisecs 1000).
khugepaged, in address order with max_ptes_none 511, collapses the sparse blocks first
(8 pages become 512: RSS bloat) and reaches the hot ones in its fourth pass; HawkEye
promotes the hot blocks in its first pass and leaves the sparse ones alone (utilization
under 90%). The result has the TLB misses of the measured epochs and the region's Rss
and AnonHugePages.
"""

MACHINE = {"memory": "256MiB", "cpus": 1}

MiB = 1 << 20
BLOCK = 2 * MiB
BLOCKS = 32
HOT = 4                 # the last HOT blocks, so an address-order scan reaches them last
SPARSE_PAGES = 8        # pages touched in each sparse block
EPOCHS = 8
EPOCH_NS = 1_000_000_000
BASE_DAEMONS = ("kswapd", "kcompactd")


def promotion_daemons(k) -> list[str]:
    """The promotion daemons running besides the reclaim ones (a --daemon plug-in)."""
    return [n for n in k.daemons() if n.rstrip("0123456789") not in BASE_DAEMONS]


async def main(k):
    k.set_knob("khugepaged/scan_sleep_millisecs", EPOCH_NS // 1_000_000)
    k.set_knob("khugepaged/pages_to_scan", 4096)
    policy = promotion_daemons(k)
    if not policy:
        k.start_daemon("khugepaged")
        policy = ["khugepaged"]
    p = await k.process("app")
    size = BLOCKS * BLOCK
    a = await p.mmap(size)
    sparse = [a + i * BLOCK for i in range(BLOCKS - HOT)]
    hot = [a + i * BLOCK for i in range(BLOCKS - HOT, BLOCKS)]
    stride = BLOCK // SPARSE_PAGES
    # populate with 4 KiB pages (enabled=madvise: no THP at fault before the madvise)
    for b in sparse:
        await p.touch(b, BLOCK, stride=stride)
    for b in hot:
        await p.touch(b, BLOCK)
    await p.madvise(a, size, "hugepage")  # khugepaged_enter_vma: the mm is registered
    tlb0 = k.tlb_misses()
    per_epoch = []
    for _ in range(EPOCHS):
        before = sum(k.tlb_misses())
        for b in hot:
            await p.touch(b, BLOCK, write=False)
        for b in sparse:
            await p.touch(b, BLOCK, write=False, stride=stride)
        per_epoch.append(sum(k.tlb_misses()) - before)
        await k.sleep(EPOCH_NS)
    rss_kb, huge_kb = k.smaps(p, a, size)
    huge_blocks = {b for b in sparse + hot if k.smaps(p, b, BLOCK)[1]}
    return {
        "policy": ",".join(policy),
        "tlb_misses": sum(k.tlb_misses()) - sum(tlb0),
        "tlb_misses_per_epoch": per_epoch,
        "rss_kb": rss_kb,
        "anon_huge_kb": huge_kb,
        "hot_thps": len(huge_blocks & set(hot)),
        "sparse_thps": len(huge_blocks & set(sparse)),
    }
