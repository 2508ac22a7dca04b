"""mTHP fault vs a 4 KiB fault inside its block: CPU 0 write-faults a 64 KiB folio
while CPU 1 read-faults (the zero page) and then writes (COW to a new 4 KiB page) one
page inside the same 64 KiB block.

CPU 0's alloc_anon_folio checks the block's 16 PTEs without the PTE lock
(pte_range_none) and allocates; if CPU 1 mapped its page meanwhile, do_anonymous_page's
recheck of the whole range under the PTE lock makes CPU 0 free its folio and refault,
now onto a block that is no longer empty (4 KiB pages). No byte may be lost. Exposes
the injected bug ``mthp_no_pte_range_recheck`` (kmm/bugs.py): without the recheck,
set_ptes overwrites CPU 1's PTE, its page stays counted as mapped and its byte is lost.

    kmm run workloads/race_mthp_fault.py --cpus 2 --mode random --seed 7
    kmm explore workloads/race_mthp_fault.py --schedules 1000
"""

KiB = 1 << 10


async def main(k):
    k.set_knob("hugepages-64kB/enabled", "madvise")
    p = await k.process("main")
    a = await p.mmap(256 * KiB)
    await p.madvise(a, 256 * KiB, "hugepage")
    await p.store(a + 192 * KiB, bytes([0x55]))  # the page tables exist before the race

    async def big(cpu):
        q = p.on(cpu)
        await q.store(a, bytes([0xA0]))            # a 64 KiB folio for [0, 64 KiB)
        await q.store(a + 40 * KiB, bytes([0xA1]))

    async def small(cpu):
        q = p.on(cpu)
        await q.load(a + 20 * KiB)                 # the zero page at 20 KiB
        await q.store(a + 20 * KiB, bytes([0xB0]))  # COW: a 4 KiB page there

    await k.parallel(big, small)
    return {"lost_bytes": len(await p.verify())}
