"""THP faults on a two-node machine whose node 0 is fragmented: they fall back to node 1.

Node 0 is cut into 1 MiB kernel allocations (unmovable: compaction cannot move them)
and every other one is freed again, so node 0 keeps half its memory free but no free
2 MiB block, and compaction cannot make one. Node 1 is untouched. A process on CPU 0
(node 0) then faults two mappings of 8 MiB under enabled=always, defrag=madvise:

- ``madvised`` (MADV_HUGEPAGE): vma_thp_gfp_mask gives GFP_TRANSHUGE (direct reclaim
  allowed), so alloc_pages_mpol first tries node 0 alone (__GFP_THISNODE |
  __GFP_NORETRY: compaction fails), then the ordinary way along node 0's zonelist:
  node 1 has the blocks. Each THP is a numa_miss on node 1 and a numa_foreign on node
  0, and numa_other (the allocating CPU is on node 0).
- ``plain`` (no advice): GFP_TRANSHUGE_LIGHT has no __GFP_DIRECT_RECLAIM, so after the
  node-0-only attempt fails alloc_pages_mpol gives up: thp_fault_fallback, and the
  4 KiB pages come from node 0 (numa_hit, numa_local).

The result: numa_maps of each mapping (pages and PMD-mapped THPs per node) and the
numa_* counters each phase moved, per node.

    kmm run workloads/numa_fragmented_fallback.py
"""

MACHINE = {"memory": "256MiB", "nodes": 2}

MiB = 1 << 20
SIZE = 8 * MiB
HOLD_ORDER = 8  # 1 MiB kernel allocations: a free one's buddy stays held


async def fragment_node(k, node: int) -> int:
    """Take node's memory in 1 MiB blocks, give back every other one: no free 2 MiB
    block is left, half the memory is free. Returns the blocks kept."""
    held = []
    while True:
        pfn = await k.alloc_kernel_pages(HOLD_ORDER, reserves=True, node=node)
        if pfn < 0:
            break
        held.append(pfn)
    kept = []
    for pfn in held:
        if (pfn >> HOLD_ORDER) & 1:
            await k.free_kernel_pages(pfn)
        else:
            kept.append(pfn)
    return len(kept)


def delta(before: dict, after: dict) -> dict:
    return {n: {e: after[n][e] - before[n][e] for e in after[n] if after[n][e] != before[n][e]}
            for n in after}


async def main(k):
    k.set_knob("enabled", "always")
    k.set_knob("defrag", "madvise")
    kept = await fragment_node(k, 0)
    p = await k.process("thp")
    out = {"node0_blocks_kept": kept, "node0_buddyinfo": k.buddyinfo(0)}
    for name, advise in (("madvised", True), ("plain", False)):
        a = await p.mmap(SIZE)
        if advise:
            await p.madvise(a, SIZE, "hugepage")
        before = {n: k.numastat(n) for n in range(k.nodes)}
        ev0 = k.vmstat()
        await p.touch(a, SIZE)
        after = {n: k.numastat(n) for n in range(k.nodes)}
        ev1 = k.vmstat()
        out[name] = {
            "numa_maps": p.numa_maps(a, SIZE),
            "numastat": delta(before, after),
            "thp_fault_alloc": ev1["thp_fault_alloc"] - ev0["thp_fault_alloc"],
            "thp_fault_fallback": ev1["thp_fault_fallback"] - ev0["thp_fault_fallback"],
        }
    table = [f"node 0 fragmented: {kept} MiB held in 1 MiB blocks, buddyinfo "
             f"{out['node0_buddyinfo']}"]
    for name in ("madvised", "plain"):
        r = out[name]
        table.append(f"{name:9} thp_fault_alloc {r['thp_fault_alloc']} fallback "
                     f"{r['thp_fault_fallback']}  numa_maps {r['numa_maps']}")
        for n, d in r["numastat"].items():
            table.append(f"          node {n}: {d}")
    out["table"] = table
    return out
