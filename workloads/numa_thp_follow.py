"""NUMA balancing: a thread moves from node 0 to node 1 and its THPs follow it.

A two-node machine. The thread faults 16 MiB of THPs on node 0 (8 PMD-mapped THPs,
local allocation), then moves to node 1 (``p.on_node(1)``: sched_setaffinity to node
1's CPUs) and keeps reading its memory, one byte per 256 KiB, every 2 ms of emulated
time. With ``kernel.numa_balancing`` = 1 task_numa_work makes a 4 MiB window PROT_NONE
every scan period (change_prot_numa: numa_huge_pte_updates, numa_pte_updates 512 per
PMD); the next read of each window takes a NUMA hinting fault on the huge PMD
(do_huge_pmd_numa_page), mpol_misplaced sends the THP to the faulting CPU's node, and
migrate_misplaced_folio moves it whole through a PMD migration entry
(thp_migration_success, numa_pages_migrated 512 each). The timeline lists, at each
point of emulated time, how many 4 KiB pages of the region are on each node (the
move_pages(2) status array), and the report's counters show the THPs stayed huge:

    kmm run workloads/numa_thp_follow.py
"""

MACHINE = {"memory": "256MiB", "cpus": 2, "nodes": 2}
MiB = 1 << 20
SIZE = 16 * MiB
MS = 1_000_000


async def pages_per_node(p, a):
    """How many 4 KiB pages of [a, a + SIZE) are on each node (move_pages, nodes NULL)."""
    _, status = await p.move_pages(range(a, a + SIZE, 4096))
    return [sum(1 for s in status if s == n) for n in (0, 1)]


async def main(k):
    k.set_sysctl("numa_balancing_scan_delay_ms", 10)
    k.set_sysctl("numa_balancing_scan_period_min_ms", 10)
    k.set_sysctl("numa_balancing_scan_period_max_ms", 40)
    k.set_sysctl("numa_balancing_scan_size_mb", 4)
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.madvise(a, SIZE, "hugepage")
    await p.on_node(0).touch(a, SIZE, value=1)  # 8 THPs, allocated on node 0
    k.set_sysctl("kernel.numa_balancing", 1)
    t0 = k.now
    timeline = [(0, *await pages_per_node(p, a))]
    q = p.on_node(1)  # the thread moves to node 1
    while True:
        await q.touch(a, SIZE, write=False, value=1, stride=256 << 10)
        await k.sleep(2 * MS)
        ms = (k.now - t0) // MS
        row = (ms, *await pages_per_node(p, a))
        if row[1:] != timeline[-1][1:]:
            timeline.append(row)
        if row[2] == SIZE // 4096 or ms >= 400:
            break
    vm = k.vmstat()
    print(f"{'ms':>6} {'node0':>6} {'node1':>6}   (4 KiB pages of the 16 MiB region)")
    for ms, n0, n1 in timeline:
        print(f"{ms:>6} {n0:>6} {n1:>6}")
    rss, huge = k.smaps(p, a, SIZE)
    return {"timeline": timeline, "anon_huge_kb": huge,
            "numa_hint_faults": vm["numa_hint_faults"],
            "numa_hint_faults_local": vm["numa_hint_faults_local"],
            "numa_pages_migrated": vm["numa_pages_migrated"],
            "numa_pte_updates": vm["numa_pte_updates"],
            "numa_huge_pte_updates": vm["numa_huge_pte_updates"],
            "thp_migration_success": vm["thp_migration_success"],
            "lost_bytes": len(await p.verify())}
