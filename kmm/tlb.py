"""Per-CPU TLBs and their shootdown: arch/x86/mm/tlb.c.

Each CPU caches 4K and 2M translations tagged by mm (as PCID does), with the fixed
capacity of a real second-level TLB (oldest entry evicted first). Changing or removing a
mapping must flush it everywhere: ``flush_tlb_mm_range`` flushes the local CPU and sends
an IPI to every other CPU in the mm's cpumask; each flush is a preemption point, and a
remote one costs an IPI round trip in emulated time.
"""

from __future__ import annotations

from kmm import rcupdate
from kmm.cost import COST_IPI, COST_LOCAL_FLUSH
from kmm.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT

TLB_4K_ENTRIES = 1536
TLB_2M_ENTRIES = 1024


def tlb_fill(cpu, mm, addr: int, pfn: int, writable: bool, dirty: bool, huge: bool) -> None:
    """What the page walker leaves in the TLB after a successful walk."""
    mm.cpumask.add(cpu.id)
    if huge:
        t, key = cpu.tlb2m, (mm.id, addr >> PMD_SHIFT)
        cap = TLB_2M_ENTRIES
    else:
        t, key = cpu.tlb4k, (mm.id, addr >> PAGE_SHIFT)
        cap = TLB_4K_ENTRIES
    if key not in t and len(t) >= cap:
        del t[next(iter(t))]
    t[key] = (pfn, writable, dirty)


def _flush_cpu(cpu, mm_id: int, start: int, end: int) -> int:
    n = 0
    for table, shift in ((cpu.tlb4k, PAGE_SHIFT), (cpu.tlb2m, PMD_SHIFT)):
        lo, hi = start >> shift, (end - 1 >> shift) + 1
        if hi - lo < len(table):
            for v in range(lo, hi):
                if table.pop((mm_id, v), None) is not None:
                    n += 1
        else:
            for key in [k for k in table if k[0] == mm_id and lo <= k[1] < hi]:
                del table[key]
                n += 1
    return n


async def flush_tlb_mm_range(m, mm, start: int, end: int) -> None:
    """flush_tlb_mm_range: no CPU keeps a translation for [start, end) of mm."""
    sched = m.sched
    me = sched.current.cpu
    for cpu_id in sorted(mm.cpumask):
        cpu = m.cpus[cpu_id]
        if cpu_id == me:
            await sched.point("tlb_flush", COST_LOCAL_FLUSH, mm=mm.id, start=start, end=end)
        else:
            await sched.point("ipi", COST_IPI, target=cpu_id, mm=mm.id, start=start, end=end)
        _flush_cpu(cpu, mm.id, start, end)


async def flush_tlb_page(m, mm, addr: int) -> None:
    await flush_tlb_mm_range(m, mm, addr, addr + (1 << PAGE_SHIFT))


async def flush_tlb_mm(m, mm) -> None:
    """flush_tlb_mm: every translation of the mm, on every CPU."""
    await flush_tlb_mm_range(m, mm, 0, 1 << 47)


async def tlb_remove_table_sync_one(m) -> None:
    """tlb_remove_table_sync_one (mm/mmu_gather.c): an IPI to every other CPU, so a
    GUP-fast walker (it runs with interrupts off) still reading a page table just
    detached has finished before the table is reused. The emulated walker is already
    atomic against IPIs; this is the cost the kernel pays."""
    sched = m.sched
    me = sched.current.cpu
    for cpu in m.cpus:
        if cpu.id != me:
            await sched.point("ipi", COST_IPI, target=cpu.id, why="tlb_remove_table_sync_one")


async def tlb_remove_table(m, mm, table: int) -> None:
    """tlb_remove_table (mm/mmu_gather.c, x86 with MMU_GATHER_RCU_TABLE_FREE): a page
    table detached under an mmu_gather is freed by RCU (tlb_remove_table_rcu), so a
    lockless walker inside rcu_read_lock never reads a freed table. The batching is
    left out: each table gets its own callback. The table leaves the mm's page-table
    accounting now (the mm may be gone when the callback runs)."""
    mm.pgtables_bytes -= PAGE_SIZE

    async def tlb_remove_table_rcu() -> None:
        await m.pte_free(None, table)

    await rcupdate.call_rcu(m, tlb_remove_table_rcu)
