"""collapse_file vs faults: MADV_COLLAPSE of a shmem block on one CPU while another CPU
reads and writes it through the same mapping.

The shared block is filled with 4 KiB pages first (shmem_enabled=advise, not
madvised). CPU 0 collapses it (MADV_COLLAPSE -> collapse_file -> retract_page_tables ->
collapse_pte_mapped_thp); CPU 1 touches pages across the block meanwhile, faulting
where collapse_file has unmapped them. collapse_file keeps the new folio locked until
the PTE tables are retracted, so a fault waits for it and maps the new THP only after
the table it would have used is gone. No byte may be lost.

    kmm explore workloads/race_shmem_collapse_fault.py --schedules 200 --jobs 1
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN) as a result

MiB = 1 << 20
SIZE = 2 * MiB


async def main(k):
    k.set_knob("shmem_enabled", "advise")
    p = await k.process("main")
    a = await p.mmap(SIZE, backing="shmem")
    await p.touch(a, SIZE, value=1, stride=64 << 10)

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, SIZE, "collapse"))

    async def toucher(cpu):
        q = p.on(cpu)
        for rnd in range(4):  # keep faulting across the block while it collapses
            for off in range(0, SIZE, 128 << 10):
                await q.store(a + off + (64 << 10), bytes([2 + rnd]))
                await q.load(a + off)

    collapsed, _ = await k.parallel(collapser, toucher)
    # a racing fault may hold a small folio's lock or a reference (SCAN_PAGE_LOCK,
    # SCAN_PAGE_COUNT): MADV_COLLAPSE then fails with EAGAIN, as on the kernel
    k.expect(collapsed, "EAGAIN", what="MADV_COLLAPSE")
    rss, huge = k.smaps(p, a, SIZE)
    return {"madvise": collapsed, "rss_kb": rss, "lost_bytes": len(await p.verify())}
