"""Two CPUs write the same MADV_HUGEPAGE range at once.

Both take the THP fault path for the same PMD; one installs the huge page under the PMD
lock, the other finds the PMD no longer none (the pmd_none recheck in
__do_huge_pmd_anonymous_page), frees the THP it allocated and refaults onto the winner's.
Run it under the random scheduler to see different interleavings:

    kmm run workloads/two_cpu_fault.py --cpus 2 --mode random --seed 7 --trace out.jsonl
"""

MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    # CPU 0 writes the even pages of the first 2 MiB, CPU 1 the odd ones, concurrently
    await k.parallel(
        lambda cpu: p.on(cpu).touch(a, 2 * MiB, value=0xA0, stride=8192),
        lambda cpu: p.on(cpu).touch(a + 4096, 2 * MiB - 4096, value=0xB1, stride=8192),
    )
    return {"lost_bytes": len(await p.verify())}
