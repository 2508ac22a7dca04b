"""User memory accesses: the TLB, the hardware page walk, and the fault entry.

arch/x86/mm/fault.c (``do_user_addr_fault``). A load or store looks in the CPU's TLB;
on a miss (or a store through an entry not yet dirty) the hardware walker reads the
four levels, sets the accessed and dirty bits with a locked update and fills the TLB; if
the walk finds no usable entry, the fault handler runs with mmap_lock held for read and
the access is retried. An access outside any VMA, or not allowed by it, is SIGSEGV.
"""

from __future__ import annotations

from kmm import atomic, memory, tlb
from kmm.runtime.sched import FREE
from kmm.mm_types import VM_EXEC, VM_READ, VM_WRITE
from kmm.pgtable import (
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW, _PAGE_USER,
    PAGE_SHIFT, PMD_SHIFT, pgd_index, pmd_index, pmd_pfn, pte_index, pte_pfn,
    pud_index, table_pfn,
)
from kmm.cost import COST_ACCESS

# faults for one access before the soft-lockup watchdog fires: a fault that returns
# without progress is retried, as the hardware would, forever
FAULT_RETRY_LIMIT = 1000


class Segv(Exception):
    """The access killed the process with SIGSEGV."""

    signal = "SIGSEGV"

    def __init__(self, addr: int, code: str) -> None:
        super().__init__(f"SIGSEGV ({code}) at {addr:#x}")
        self.addr = addr
        self.code = code


class Sigbus(Exception):
    """The access killed the process with SIGBUS (VM_FAULT_SIGBUS: e.g. a shmem fault
    at or beyond the end of the file, a hugetlb fault with no huge page to be had)."""

    signal = "SIGBUS"

    def __init__(self, addr: int) -> None:
        super().__init__(f"SIGBUS at {addr:#x}")
        self.addr = addr


class OutOfMemory(Exception):
    """VM_FAULT_OOM: the fault could not get memory."""


def _usable(entry: int, write: bool) -> bool:
    if entry & (_PAGE_PRESENT | _PAGE_USER) != _PAGE_PRESENT | _PAGE_USER:
        return False
    return not write or bool(entry & _PAGE_RW)


async def _walk(m, cpu, mm, addr: int, write: bool) -> bool | None:
    """The hardware page walk: True once the TLB holds a usable translation, False
    when the access must fault, None when the entries changed under it (walk again)."""
    pgde = e = await atomic.entry_read(m, "pgd", mm.pgd, pgd_index(addr))
    if not _usable(e, write):
        return False
    try:
        pude = e = await atomic.entry_read(m, "pud", table_pfn(e), pud_index(addr))
        if not _usable(e, write):
            return False
        tbl, idx = table_pfn(e), pmd_index(addr)
        pmde = e = await atomic.entry_read(m, "pmd", tbl, idx)
        if not _usable(e, write):
            return False
        huge = bool(e & _PAGE_PSE)
        if not huge:
            tbl, idx = table_pfn(e), pte_index(addr)
            e = await atomic.entry_read(m, "pte", tbl, idx)
            if not _usable(e, write):
                return False
    except KeyError:
        # a table on the path was detached and freed during the walk (a PTE table by
        # retract_page_tables or PT_RECLAIM, a shared hugetlb PMD table unshared by
        # huge_pmd_unshare and freed by its last mm): the hardware walk is one
        # instruction, so the IPI of the flush or of tlb_remove_table_sync_one came
        # before it; walk again
        return None
    want = e | _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
    if want != e and not await atomic.entry_cmpxchg(m, "pmd" if huge else "pte", tbl, idx, e, want):
        return None  # changed under the walker: walk again
    if not _path_is(m, mm, addr, pgde, pude, pmde if not huge else want,
                    None if huge else want):
        return None  # a shootdown came during the walk: walk again
    pfn = pmd_pfn(want) if huge else pte_pfn(want)
    tlb.tlb_fill(cpu, mm, addr, pfn, bool(want & _PAGE_RW), bool(want & _PAGE_DIRTY), huge)
    return True


def _walk_quiet(m, cpu, mm, addr: int, write: bool) -> bool | None:
    """_walk when the scheduler is quiet (free mode, no hook): no other actor can run
    during the walk, so it is the same reads, points (as ticks) and fill, written
    without a coroutine per level. Keep the two in step: a trace with a sink walks
    through _walk and one without through this, and their digests must be equal
    (tests/runtime/test_sched.py)."""
    pgde = e = atomic.entry_read_quiet(m, "pgd", mm.pgd, pgd_index(addr))
    if not _usable(e, write):
        return False
    try:
        pude = e = atomic.entry_read_quiet(m, "pud", table_pfn(e), pud_index(addr))
        if not _usable(e, write):
            return False
        tbl, idx = table_pfn(e), pmd_index(addr)
        pmde = e = atomic.entry_read_quiet(m, "pmd", tbl, idx)
        if not _usable(e, write):
            return False
        huge = bool(e & _PAGE_PSE)
        if not huge:
            tbl, idx = table_pfn(e), pte_index(addr)
            e = atomic.entry_read_quiet(m, "pte", tbl, idx)
            if not _usable(e, write):
                return False
    except KeyError:
        return None  # a table on the path was freed during the walk (see _walk)
    want = e | _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
    if want != e and not atomic.entry_cmpxchg_quiet(m, "pmd" if huge else "pte", tbl, idx,
                                                    e, want):
        return None
    if not _path_is(m, mm, addr, pgde, pude, pmde if not huge else want,
                    None if huge else want):
        return None
    pfn = pmd_pfn(want) if huge else pte_pfn(want)
    tlb.tlb_fill(cpu, mm, addr, pfn, bool(want & _PAGE_RW), bool(want & _PAGE_DIRTY), huge)
    return True


def _path_is(m, mm, addr: int, pgde: int, pude: int, pmde: int, ptee: int | None) -> bool:
    """The walk's entries are still in the tables (read without points).

    A walk and the access it serves are one instruction: a TLB shootdown IPI is taken
    before or after it, never inside, so once flush_tlb_mm_range returns no CPU may
    still fill or use the translation it flushed. The emulated walk spans several
    points, so it re-checks its path at the moment it fills the TLB.
    """
    t = m.physmem.tables
    if t[mm.pgd][pgd_index(addr)] != pgde or t[table_pfn(pgde)][pud_index(addr)] != pude:
        return False
    if t[table_pfn(pude)][pmd_index(addr)] != pmde:
        return False
    return ptee is None or t[table_pfn(pmde)][pte_index(addr)] == ptee


def _tlb_lookup(cpu, mm_id: int, addr: int):
    e = cpu.tlb4k.get((mm_id, addr >> PAGE_SHIFT))
    if e is not None:
        return e
    e = cpu.tlb2m.get((mm_id, addr >> PMD_SHIFT))
    if e is not None:
        return (e[0] + ((addr >> PAGE_SHIFT) & 511), e[1], e[2])
    return None


async def user_access(m, task, cpu_id: int, addr: int, write: bool,
                      data: bytes = b"", n: int = 1) -> bytes:
    """One load (n bytes) or store (data) within a page, as the CPU performs it."""
    cpu = m.cpus[cpu_id]
    mm = task.mm
    sched = m.sched
    stats = m.tlb_stats
    faults = 0
    if m.__dict__.get("numab") is not None:  # task_tick_numa's task_work, back to user
        from kmm import numa_balancing
        if numa_balancing.enabled(m):
            if len(m.node_data) > 1:
                m.running_cpu[sched.current] = cpu_id
            await numa_balancing.task_tick_numa(m, task)
    while True:
        e = _tlb_lookup(cpu, mm.id, addr)
        if e is not None and (not write or (e[1] and e[2])):
            pfn = e[0]
            off = addr & 4095
            if sched.mode is FREE:
                # a TLB hit enters no kernel and, in free mode, no other actor can run
                # at it: time passes, no point (docs/points.md, class 5)
                sched.advance(COST_ACCESS)
            elif write:
                await sched.point("store", COST_ACCESS, addr=addr, pfn=pfn, nr=len(data))
                if _tlb_lookup(cpu, mm.id, addr) != e:
                    continue  # shot down before the store: translate again
            else:
                await sched.point("load", COST_ACCESS, addr=addr, pfn=pfn, nr=n)
                if _tlb_lookup(cpu, mm.id, addr) != e:
                    continue  # shot down before the load: translate again
            if write:
                m.physmem.write(pfn, off, data)
                return b""
            return m.physmem.read(pfn, off, n)
        stats[cpu_id] += 1
        if sched.quiet:
            if _walk_quiet(m, cpu, mm, addr, write) is not False:
                continue
        elif await _walk(m, cpu, mm, addr, write) is not False:
            continue
        faults += 1
        if faults > 1:  # the last fault did not make the access possible: a retry loop
            sched.yield_spin("user_access")
        if faults > FAULT_RETRY_LIMIT:
            # the soft-lockup watchdog: the fault keeps returning without making the
            # access possible (a page-table entry no fault handler can resolve)
            m.bug(f"watchdog: BUG: soft lockup - CPU#{cpu_id} stuck: {faults} faults "
                  f"at {addr:#x} ({'write' if write else 'read'}) without progress")
        if len(m.node_data) > 1:  # numa_node_id() in the fault: the CPU it runs on
            m.running_cpu[sched.current] = cpu_id
        await do_user_addr_fault(m, task, addr, write)


def store_run(m, task, cpu_id: int, addr: int, end: int, stride: int, data: bytes,
              shadow: dict, lazy: dict) -> int:
    """Stores of ``data`` at addr, addr + stride, ... below end for as long as the CPU's
    TLB holds a writable, dirty translation (what user_access does on a TLB hit in free
    mode: no kernel entry, no point, only emulated time); returns the address of the
    first store it did not make (a TLB miss: the caller takes user_access, which walks
    or faults). Only in free mode: no other actor can run between these stores, so
    none can shoot the TLB down. Each store is recorded in the workload's ``shadow``
    (and leaves ``lazy``)."""
    cpu = m.cpus[cpu_id]
    tlb4k, tlb2m = cpu.tlb4k, cpu.tlb2m
    mm_id = task.mm.id
    pm = m.physmem
    frames, new_frame = pm.data, pm.new_frame
    value = data[0]
    start = addr
    huge = None  # the 2 MiB translation last used: (its 2 MiB page number, pfn)
    while addr < end:
        vpn = addr >> PAGE_SHIFT
        e = tlb4k.get((mm_id, vpn))
        if e is None:
            if huge is not None and vpn >> 9 == huge[0]:
                pfn = huge[1] + (vpn & 511)
            else:
                e = tlb2m.get((mm_id, addr >> PMD_SHIFT))
                if e is None or not (e[1] and e[2]):
                    break
                huge = (vpn >> 9, e[0])  # the 2 MiB entry stays: nothing runs meanwhile
                pm.huge_backing(e[0])  # its frames share one host THP (kmm/physmem.py)
                pfn = e[0] + (vpn & 511)
        elif not (e[1] and e[2]):
            break
        else:
            pfn = e[0]
        # PhysMem.write of one byte, inline (a zero into a zero frame needs no frame)
        frame = frames.get(pfn)
        if frame is None and value:
            frame = new_frame(pfn)
        if frame is not None:
            frame[addr & 4095] = value
        shadow[addr] = value
        if lazy:
            lazy.pop(addr, None)
        addr += stride
    if addr != start:
        m.sched.advance(COST_ACCESS * ((addr - start) // stride))
    return addr


async def do_user_addr_fault(m, task, addr: int, write: bool) -> None:
    mm = task.mm
    await mm.mmap_lock.down_read("do_user_addr_fault")
    try:
        vma = mm.find_vma(addr)
        if vma is None or vma.start > addr:
            raise Segv(addr, "SEGV_MAPERR")
        if write and not vma.flags & VM_WRITE:
            raise Segv(addr, "SEGV_ACCERR")
        if not vma.flags & (VM_READ | VM_WRITE | VM_EXEC):
            raise Segv(addr, "SEGV_ACCERR")
        fault = await memory.handle_mm_fault(m, vma, addr, write)
    finally:
        await mm.mmap_lock.up_read()
    if fault & memory.VM_FAULT_OOM:
        raise OutOfMemory(f"out of memory faulting {addr:#x}")
    if fault & memory.VM_FAULT_SIGSEGV:
        raise Segv(addr, "SEGV_MAPERR")
    if fault & memory.VM_FAULT_SIGBUS:
        raise Sigbus(addr)
