"""Who pays for a collapse: MADV_COLLAPSE in the application vs khugepaged behind it.

Two processes fault the same 8 MiB of small pages. The first calls MADV_COLLAPSE: the
four collapses run in its own context (allocate, copy 512 pages each, under its mmap
write lock), so the call itself is the cost, and the THPs are there when it returns.
The second calls MADV_HUGEPAGE and leaves the work to khugepaged (scan_sleep_millisecs
10000, pages_to_scan 1024: two PMDs per pass): the application pays nothing, khugepaged
pays about the same emulated time in its own actor, and the last THP arrives one
scan_sleep_millisecs later, on the second pass. Emulated milliseconds:

    kmm run workloads/khugepaged_collapse_cost.py --cpus 1
"""

MiB = 1 << 20
SIZE = 8 * MiB
MS = 1_000_000


async def faulted(k, name):
    p = await k.process(name)
    a = await p.mmap(SIZE)
    await p.touch(a, SIZE, value=0x5a)
    return p, a


async def main(k):
    k.set_knob("khugepaged/pages_to_scan", 1024)
    k.start_daemon("khugepaged")
    out = {}

    p, a = await faulted(k, "madvise")
    t0 = k.now
    assert await p.madvise(a, SIZE, "collapse") == 0
    stall = k.now - t0
    out["MADV_COLLAPSE"] = {"app_stall_ms": stall / MS, "thps_after_ms": stall / MS,
                            "anon_huge_kb": k.smaps(p, a, SIZE)[1]}

    q, b = await faulted(k, "khugepaged")
    busy0 = k.khugepaged_busy_ns()
    t0 = k.now
    await q.madvise(b, SIZE, "hugepage")
    stall = k.now - t0
    timeline = []
    while k.smaps(q, b, SIZE)[1] < SIZE // 1024 and k.now - t0 < 60_000 * MS:
        await k.sleep(100 * MS)
        timeline.append(k.smaps(q, b, SIZE)[1])
    out["khugepaged"] = {
        "app_stall_ms": stall / MS,
        "thps_after_ms": (k.now - t0) / MS,   # within 100 ms
        "khugepaged_busy_ms": (k.khugepaged_busy_ns() - busy0) / MS,
        "anon_huge_kb": k.smaps(q, b, SIZE)[1],
        "anon_huge_kb_after_first_pass": timeline[0],
    }
    out["lost_bytes"] = len(await p.verify()) + len(await q.verify())
    return out
