"""Collapse vs rmap walkers that take no mmap lock: migration and reclaim with swap.

MADV_COLLAPSE of a 2 MiB block (one page in sixteen faulted) races, on the other CPU:

- round 0, migration (move_pages of one faulted page): under the mmap read lock the
  page is found and isolated from the LRU (its isolation reference), the lock is
  dropped, then migrate_pages freezes its mappings into migration entries through the
  rmap (try_to_migrate), copies it and remaps. The collapse holds the mmap write lock
  only around the PMD switch: it must see the isolated page (an extra reference, off
  the LRU: EAGAIN) or a migration entry (not present: it goes on without that block)
  or the moved page; never copy from the old frame after the move.
- round 1, reclaim with swap (a memory cgroup's reclaim at swappiness 100): the LRU
  folios are isolated and unmapped through the rmap (try_to_unmap) into swap entries,
  racing the collapse's scan, isolate and copy.

MADV_COLLAPSE returns 0 or one of the errnos the kernel gives for a transient state
(EAGAIN) or a block it will not collapse (EINVAL: a swap PTE it does not read in,
EBUSY, ENOMEM); every byte reads back as written (swapped pages are read in).
Round 2 races three faults (two reads, a write) on one swapped-out 4 KiB page; round 3
a migration against MADV_DONTNEED of the page it moves.

    kmm run workloads/race_collapse_rmap.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_collapse_rmap.py --schedules 10000 --mode pct
"""

from kmm import errno_name

MACHINE = {"memory": "256MiB", "swap": "64MiB"}
MiB = 1 << 20
SIZE = 2 * MiB
STRIDE = 64 << 10
COLLAPSE_OK = (0, "EAGAIN", "EINVAL", "EBUSY", "ENOMEM")


async def main(k):
    p = await k.process("main")
    blocks = []
    for _ in range(2):
        a = await p.mmap(SIZE)
        await p.touch(a, SIZE, value=9, stride=STRIDE)
        blocks.append(a)

    a = blocks[0]

    async def collapser(cpu, a=a):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def mover(cpu, a=a):
        q = p.on(cpu)
        out = []
        for i in (3, 17):
            await q.load(a + i * STRIDE)
            out.append(await q.move_page(a + i * STRIDE))
        return out

    collapsed, moved = await k.parallel(collapser, mover)
    k.expect(collapsed, *COLLAPSE_OK[1:], what="MADV_COLLAPSE vs migration")
    assert all(r in ("moved", "busy", "absent") for r in moved), moved
    _, huge = k.smaps(p, a, SIZE)
    assert huge == (2048 if collapsed == 0 else 0), (collapsed, huge)

    b = blocks[1]

    async def collapser2(cpu, b=b):
        return await errno_name(p.on(cpu).madvise(b, SIZE, "collapse"))

    async def reclaimer(cpu):
        return await k.memory_reclaim(64, swappiness=100)

    collapsed2, _ = await k.parallel(collapser2, reclaimer)
    k.expect(collapsed2, *COLLAPSE_OK[1:], what="MADV_COLLAPSE vs reclaim")

    # round 2: swap-in vs swap-in of one page (two reads and a write fault on a swap
    # PTE): do_swap_page's pte_same under the PTE lock lets one map it
    c = await p.mmap(64 << 10)
    assert await p.madvise(c, 64 << 10, "nohugepage") == 0
    await p.touch(c, 64 << 10, value=0x33)
    out = k.vmstat().get("pswpout", 0)
    assert await p.madvise(c, 64 << 10, "pageout") == 0
    assert k.vmstat().get("pswpout", 0) > out, "MADV_PAGEOUT wrote nothing to swap"

    async def reader(cpu):
        return await p.on(cpu).load(c + 4096)

    async def writer(cpu):
        await p.on(cpu).store(c + 4096 + 1, b"\x44")

    got1, _, got2 = await k.parallel(reader, writer, reader)
    assert got1 == got2 == b"\x33", f"swap-in read {got1!r}, {got2!r}"
    # round 3: migration vs MADV_DONTNEED of the page it moves: the zap drops the
    # mapping (its reference held until the TLB flush) while migrate_pages unmaps and
    # freezes; a page with references besides the isolation's is not moved
    d = await p.mmap(64 << 10)
    assert await p.madvise(d, 64 << 10, "nohugepage") == 0
    await p.touch(d, 64 << 10, value=0x55)

    async def mover2(cpu):
        return await p.on(cpu).move_page(d + 2 * 4096)

    async def dropper(cpu):
        q = p.on(cpu)
        await q.load(d + 4096)
        return await q.madvise(d + 2 * 4096, 4096, "dontneed")

    moved2, dropped = await k.parallel(mover2, dropper)
    assert dropped == 0, f"MADV_DONTNEED returned {dropped}"
    assert moved2 in ("moved", "busy", "absent"), moved2
    assert await p.load(d + 2 * 4096) == b"\x00", "a dropped page reads non-zero"
    return {"madvise": [collapsed, collapsed2], "moved": moved + [moved2],
            "lost_bytes": len(await p.verify())}
