"""Faults (writes) vs split: one CPU writes through a THP while another CPU splits it.

A THP is faulted in (with its page table deposited behind the PMD). CPU 1 splits it
(split_huge_page, as /sys/kernel/debug/split_huge_pages does): try_to_migrate freezes
the PMD into 512 migration entries using the deposited table, the folio becomes 512
order-0 folios, remap_page maps them again (zero-filled ones as the shared zero page).
CPU 0 meanwhile stores one byte every 256 KiB, each into a page the first fault left
zero-filled; a store that meets a migration entry waits in migration_entry_wait until
the split unlocks the folio, and retries. No byte may be lost. Exposes the injected bug
``huge_fault_no_deposit`` (kmm/bugs.py): the invariant checker sees the huge PMD
without its table; without the checker, the split allocates one under the PMD lock
(BUG: sleeping function called from invalid context):

    kmm run workloads/race_fault_split.py --cpus 2 --mode random --seed 3
    kmm explore workloads/race_fault_split.py --schedules 10000
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.on(0).store(a, b"\x01")

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, 2 * MiB, 256 << 10):
            await q.store(a + off + 8192, bytes([2 + (off >> 18)]))

    async def splitter(cpu):
        return await p.on(cpu).split_huge_page(a, 2 * MiB)

    _, split = await k.parallel(writer, splitter)
    assert split == 1, f"split_huge_page split {split} THPs, not 1"
    return {"split": split, "lost_bytes": len(await p.verify())}
