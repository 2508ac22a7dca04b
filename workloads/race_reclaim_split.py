"""Reclaim's split vs concurrent access: the deferred-split shrinker splits an underused
THP while another CPU writes into it.

A THP is faulted with one byte written, so 511 of its pages hold only zeros; with
khugepaged/max_ptes_none at 409 it is underused. CPU 1 runs memory-cgroup reclaim
(memory.force_empty, as the scenarios' reclaim step), whose deferred-split shrinker
splits it (thp_underused_split_page): try_to_migrate invalidates the PMD, flushes every
TLB and freezes it into migration entries; remap_page then maps each zero-filled page
as the shared zero page and frees it. CPU 0 meanwhile reads and writes eight of those pages
through its 2 MiB TLB entry; once the flush has taken the entry, a store faults, waits
for the split on the migration entry, and lands in a page of its own. No byte may be
lost. Exposes the injected bug ``split_pmd_no_tlb_flush`` (kmm/bugs.py):

    kmm run workloads/race_reclaim_split.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_reclaim_split.py --schedules 10000
"""


MiB = 1 << 20


async def main(k):
    k.set_knob("khugepaged/max_ptes_none", 409)
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.on(0).store(a, b"\x01")  # CPU 0's TLB now maps the THP with one 2 MiB entry

    async def writer(cpu):
        q = p.on(cpu)
        for i in range(1, 9):  # pages 2, 4, .. 16, while the split remaps them
            for _ in range(8):
                await q.load(a)
            await q.store(a + i * (8 << 10), bytes([1 + i]))

    async def reclaimer(cpu):
        await k.force_empty()

    await k.parallel(writer, reclaimer)
    split = k.vmstat().get("thp_underused_split_page", 0)
    assert split == 1, f"the shrinker split {split} underused THPs, not 1"
    return {"split": split, "lost_bytes": len(await p.verify())}
