"""selftests/mm/khugepaged.c collapse_compound_extreme, in both contexts.

512 rounds each fault a THP at BASE, then shrink the mapping with mremap so only its
first page stays (the PMD is split, 511 pages unmapped: the THP is partially mapped
and queued for deferred split) and move that page below the pages kept so far. The
result is one PTE table whose 512 entries map 512 *different* PTE-mapped THPs. The
table is rewritten and collapsed, by khugepaged (MADV_HUGEPAGE, then up to six 500 ms
ticks waiting for two full scans, as the selftest's wait_for_scan) and by MADV_COLLAPSE
(with enabled=never): each must give one new THP with every byte intact, the 512 old
folios freed.

The 512 partially mapped THPs hold 1 GiB: on a machine with less, the allocator's
reclaim splits them (the deferred split shrinker), as the kernel would, and the table
is built of small pages instead. Run it on 4 GiB to see the compound case:

    kmm run workloads/khugepaged_compound_extreme.py --cpus 1
"""

from kmm import errno_name

MiB = 1 << 20
PAGE = 4096
HPAGE = 2 * MiB
NR = HPAGE // PAGE
BASE = 1 << 30
TICK = 500_000_000  # ns: the selftest polls every 500 ms, six times


async def build(k, p, rounds: int = NR) -> int:
    """Construct the PTE table full of different PTE-mapped compound pages (its last
    ``rounds`` entries); returns its address (BASE - 2 MiB)."""
    await p.mmap(HPAGE, BASE)
    for i in range(rounds):
        await p.madvise(BASE, HPAGE, "hugepage")
        await p.touch(BASE, HPAGE, value=1 + i % 251)
        assert k.smaps(p, BASE, HPAGE)[1] == 2048, f"round {i}: no THP at BASE"
        await p.madvise(BASE, HPAGE, "nohugepage")
        r = await p.mremap(BASE - i * PAGE, i * PAGE + HPAGE, (i + 1) * PAGE, BASE + 2 * HPAGE)
        assert r == BASE + 2 * HPAGE, f"round {i}: mremap+unmap {r}"
        r = await p.mremap(BASE + 2 * HPAGE, (i + 1) * PAGE, (i + 1) * PAGE + HPAGE,
                           BASE - (i + 1) * PAGE)
        assert r == BASE - (i + 1) * PAGE, f"round {i}: mremap+alloc {r}"
    await p.munmap(BASE, HPAGE)
    addr = BASE - HPAGE
    if rounds < NR:  # a shorter test: the rest of the table are small pages
        await p.mmap(HPAGE - rounds * PAGE, addr)
    await p.touch(addr, HPAGE, value=0xaa)
    assert k.smaps(p, addr, HPAGE)[1] == 0
    return addr


async def khugepaged_collapse(k, p, addr: int) -> bool:
    """wait_for_scan: MADV_HUGEPAGE, then until huge or two more full scans."""
    await p.madvise(addr, HPAGE, "hugepage")
    target = k.knob("khugepaged/full_scans") + 2
    for _ in range(6):
        if k.smaps(p, addr, HPAGE)[1] == 2048 or k.knob("khugepaged/full_scans") >= target:
            break
        await k.sleep(TICK)
    await p.madvise(addr, HPAGE, "nohugepage")
    return k.smaps(p, addr, HPAGE)[1] == 2048


async def madvise_collapse(k, p, addr: int) -> bool:
    """__madvise_collapse: enabled=never, MADV_HUGEPAGE, MADV_COLLAPSE must return 0."""
    k.set_knob("enabled", "never")
    await p.madvise(addr, HPAGE, "hugepage")
    r = await errno_name(p.madvise(addr, HPAGE, "collapse"))
    k.set_knob("enabled", "madvise")
    return r == 0 and k.smaps(p, addr, HPAGE)[1] == 2048


async def main(k):
    # the selftest's settings
    for name, value in (("enabled", "madvise"), ("defrag", "always"), ("use_zero_page", 0),
                        ("khugepaged/scan_sleep_millisecs", 10),
                        ("khugepaged/alloc_sleep_millisecs", 10)):
        k.set_knob(name, value)
    k.start_daemon("khugepaged")
    out = {}
    for name, collapse in (("khugepaged", khugepaged_collapse), ("madvise", madvise_collapse)):
        p = await k.process(name)
        addr = await build(k, p)
        collapsed = await collapse(k, p, addr)
        out[name] = {"collapsed": collapsed, "lost_bytes": len(await p.verify())}
        await p.exit()
    return out
