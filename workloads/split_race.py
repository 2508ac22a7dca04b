"""A THP split on one CPU while another CPU writes through the same huge pages.

CPU 1 splits two THPs (split_huge_page, as /sys/kernel/debug/split_huge_pages does):
try_to_migrate freezes each PMD into 512 migration entries, the folio becomes 512
order-0 folios, remap_page maps them again. CPU 0 meanwhile stores one byte every
64 KiB; a store that meets a migration entry faults, sleeps in migration_entry_wait
until the split unlocks the folio, and retries. No byte may be lost:

    kmm run workloads/split_race.py --cpus 2 --mode random --seed 3 --trace out.jsonl
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    await p.touch(a, 4 * MiB, value=1)

    async def writer(cpu):
        q = p.on(cpu)
        for off in range(0, 4 * MiB, 64 << 10):
            await q.store(a + off, bytes([2 + (off >> 16) % 200]))

    async def splitter(cpu):
        return await p.on(cpu).split_huge_page(a, 4 * MiB)

    _, split = await k.parallel(writer, splitter)
    return {"split": split, "lost_bytes": len(await p.verify())}
