"""mremap vs migration of the same pages: sixteen 4 KiB pages and one THP on node 0;
CPU 1 moves them all to node 1 (move_pages), CPU 0 mremaps the whole range elsewhere
at the same time.

move_pages isolates the folios under the mmap lock for read, then drops it to migrate
them: their PTEs (the THP's PMD) become migration entries, the contents are copied,
and remove_migration_ptes walks the rmap to put the new pages in. mremap, under the
mmap lock for write, may move those entries meanwhile: it holds the anon_vma lock while
it moves page tables (take_rmap_locks), so an rmap walk sees each entry either in the
old place or the new one, never in neither. Every byte reads back at the new address,
and no migration entry is left behind:

    kmm explore workloads/race_mremap_migrate.py --schedules 1000 --mode pct
"""

MACHINE = {"memory": "64MiB", "nodes": 2}
MiB = 1 << 20
SMALL = 16 * 4096


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)  # sixteen small pages
    await p.madvise(a, 2 * MiB, "nohugepage")
    b = await p.mmap(2 * MiB)  # one THP
    await p.madvise(b, 2 * MiB, "hugepage")
    n0 = p.on_node(0)
    await n0.touch(a, SMALL, value=3)
    await n0.touch(b, 2 * MiB, value=4, stride=256 << 10)
    pages = [a + i * 4096 for i in range(16)] + [b]
    new_a, new_b = a + 64 * MiB, b + 64 * MiB

    async def mover(cpu):
        return await p.on(cpu).move_pages(pages, [1] * len(pages))

    async def remapper(cpu):
        q = p.on(cpu)
        return (await q.mremap(a, 2 * MiB, 2 * MiB, new_a),
                await q.mremap(b, 2 * MiB, 2 * MiB, new_b))

    (left, status), moved_to = await k.parallel(mover, remapper)
    assert moved_to == (new_a, new_b), moved_to
    # a page not there any more when move_pages looked is -EFAULT (-14)
    assert all(s in (1, -14) for s in status), status
    got = [await p.load(new_a + i * 4096) for i in range(16)]
    got += [await p.load(new_b + off) for off in range(0, 2 * MiB, 256 << 10)]
    assert got == [b"\x03"] * 16 + [b"\x04"] * 8, got
    return {"not_migrated": left, "gone": status.count(-14),
            "lost_bytes": len(await p.verify())}
