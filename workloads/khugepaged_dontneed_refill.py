"""An allocator frees memory with MADV_DONTNEED in 4 KiB pieces; khugepaged fills the
holes back in, across max_ptes_none 0, 64, 409 and 511.

For each setting a process faults a 8 MiB heap as four THPs (MADV_HUGEPAGE), then
frees 4 KiB objects scattered over it: 1, 64, 65 and 409 of them in the four 2 MiB
blocks (every first free splits that block's PMD; the THP stays, partially mapped).
Rss drops by what was freed. khugepaged (scan_sleep_millisecs 1000) then collapses each
block with at most max_ptes_none holes into a new THP whose holes read zero: Rss comes
back, and AnonHugePages with it; blocks with more holes stay as they are
(thp_scan_exceed_none_pte). The host-recorded scenarios
workloads/khugepaged_dontneed_refill_<N>.toml pin the same outcome on the kernel:

    kmm run workloads/khugepaged_dontneed_refill.py --cpus 1
"""

MiB = 1 << 20
PAGE = 4096
HEAP = 8 * MiB
HOLES = (1, 64, 65, 409)   # 4 KiB pieces freed in each 2 MiB block
MS = 1_000_000


def scattered(block: int, n: int) -> list[int]:
    """n distinct page offsets in a block, spread by a fixed stride (an allocator's
    freed objects); 2 MiB / 4 KiB = 512 pages, 7 is prime to it."""
    return [block + ((i * 7) % 512) * PAGE for i in range(n)]


async def main(k):
    k.set_knob("khugepaged/scan_sleep_millisecs", 1000)
    k.start_daemon("khugepaged")
    out = {}
    for max_none in (0, 64, 409, 511):
        k.set_knob("khugepaged/max_ptes_none", max_none)
        p = await k.process(f"alloc{max_none}")
        a = await p.mmap(HEAP)
        await p.madvise(a, HEAP, "hugepage")
        await p.touch(a, HEAP, value=1)
        full = k.smaps(p, a, HEAP)
        for i, n in enumerate(HOLES):
            for off in scattered(a + i * 2 * MiB, n):
                await p.madvise(off, PAGE, "dontneed")
        freed = k.smaps(p, a, HEAP)
        await k.sleep(2500 * MS)  # two passes of khugepaged
        back = k.smaps(p, a, HEAP)
        out[f"max_ptes_none={max_none}"] = {
            "rss_kb": [full[0], freed[0], back[0]],
            "anon_huge_kb": [full[1], freed[1], back[1]],
            "blocks_refilled": back[1] // 2048,
            "lost_bytes": len(await p.verify()),
        }
        await p.exit()
    return out
