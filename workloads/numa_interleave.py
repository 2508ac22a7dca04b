"""MPOL_INTERLEAVE spreading THPs over the nodes of a two-node machine.

A process on CPU 0 (node 0) maps 16 MiB under enabled=always three ways:

- ``local``: no policy: every THP on node 0 (the local node; numa_hit, numa_local).
- ``interleave_vma``: mbind(MPOL_INTERLEAVE, {0, 1}): get_vma_policy gives each 2 MiB
  folio the interleave index (vm_pgoff >> 9) + (offset >> 21), interleave_nid picks
  node index mod 2, so the THPs alternate N0, N1, N0, ... (4 on each node); each lands
  on its interleave node: numa_interleave counts all 8; those on node 1 are numa_other
  (remote to the CPU) but numa_hit (the preferred node was node 1).
- ``interleave_task_4k``: set_mempolicy(MPOL_INTERLEAVE, {0, 1}) and a MADV_NOHUGEPAGE
  mapping: the task policy interleaves order-0 pages by their page index, so the 4 KiB
  pages alternate too, and so do the page tables (allocated outside a VMA: the task's
  il_prev round robin).

The result: numa_maps per mapping and the numa_* counters each phase moved.

    kmm run workloads/numa_interleave.py
"""

MACHINE = {"memory": "256MiB", "nodes": 2}

MiB = 1 << 20
SIZE = 16 * MiB


def delta(before: dict, after: dict) -> dict:
    return {e: after[e] - before[e] for e in after if after[e] != before[e]}


async def main(k):
    k.set_knob("enabled", "always")
    p = await k.process("interleave")
    out = {}
    for name in ("local", "interleave_vma", "interleave_task_4k"):
        a = await p.mmap(SIZE)
        if name == "interleave_vma":
            await p.mbind(a, SIZE, "interleave", [0, 1])
        elif name == "interleave_task_4k":
            await p.madvise(a, SIZE, "nohugepage")
            await p.set_mempolicy("interleave", [0, 1])
        before = k.numastat()
        await p.touch(a, SIZE)
        out[name] = {"numa_maps": p.numa_maps(a, SIZE), "numastat": delta(before, k.numastat())}
    await p.set_mempolicy("default")
    out["table"] = [line for name, r in out.items()
                    for line in (f"{name:19} numa_maps {r['numa_maps']}",
                                 f"{'':19} numa_* {r['numastat']}")]
    return out
