"""MADV_COLLAPSE of a PTE-mapped THP on one CPU while another CPU splits it.

A THP is faulted, then one page of it is zapped (MADV_DONTNEED): the PMD is split and
511 PTEs map into the large folio, which is queued for deferred split. CPU 0 collapses
that block into a new THP; CPU 1 splits the old folio (split_huge_page). They meet on
the folio lock and its references: a split in progress holds the lock, so the
collapse's isolate fails its trylock (SCAN_PAGE_LOCK: MADV_COLLAPSE returns EAGAIN); a
collapse that isolated the folio holds an extra reference, so the split fails
(-EAGAIN, thp_split_page_failed); or one completes before the other starts. Either
way the data survive and every folio is accounted for:

    kmm run workloads/khugepaged_collapse_race_split.py --cpus 2 --mode random --seed 2
"""

from kmm import errno_name  # MADV_COLLAPSE's refusal (EAGAIN, ...) as a result

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.touch(a, 2 * MiB, value=9)
    await p.madvise(a + MiB, 4096, "dontneed")

    async def collapser(cpu):
        return await errno_name(p.on(cpu).madvise(a, 2 * MiB, "collapse"))

    async def splitter(cpu):
        return await p.on(cpu).split_huge_page(a, 2 * MiB)

    collapsed, split = await k.parallel(collapser, splitter)
    return {"madvise": collapsed, "split": split, "lost_bytes": len(await p.verify())}
