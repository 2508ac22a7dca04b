"""Automatic NUMA balancing: the scanner and the placement filter. kernel/sched/fair.c.

With ``kernel.numa_balancing`` = 1, a task whose scan time has come
(``task_tick_numa``: emulated time past mm->numa_next_scan) runs ``task_numa_work`` on
its way back to user space: it makes the next window of its address space
(``numa_balancing_scan_size_mb``, from mm->numa_scan_offset, whole PMDs) PROT_NONE
(``change_prot_numa``: mprotect.change_protection with MM_CP_PROT_NUMA), so the next
access from any CPU takes a NUMA hinting fault (kmm.memory_numa.do_numa_page,
kmm.huge_memory_migrate.do_huge_pmd_numa_page). The fault asks ``mpol_misplaced``
(the default local policy, MPOL_F_MORON) where the folio should be: on the faulting
CPU's node if ``should_numa_migrate_memory`` agrees; its two-stage filter wants the
folio's last cpupid to name a CPU of the same node before it moves (a private fault,
or any fault early in the task's life, passes at once).

Knobs (``k.set_sysctl``): ``kernel.numa_balancing`` (0/1, /proc/sys/kernel) and the
debugfs ones under /sys/kernel/debug/sched/numa_balancing, ``scan_delay_ms``,
``scan_period_min_ms``, ``scan_period_max_ms``, ``scan_size_mb``, named here
``numa_balancing_scan_*`` as in the sysctls they were before 5.13. Time is emulated.

Simplified (the kernel's is a control loop over per-task fault statistics): the scan
period starts at scan_period_min_ms and doubles, up to scan_period_max_ms, after a
period whose hinting faults were all local, and halves (not below the minimum) after
one with remote faults; no numa groups, no task placement (a program moves its thread
with ``Proc.on_node``), no per-VMA access-pid filter or scan delay, no memory tiering.
Every thread of a process counts as one task; an mm is taken as single-threaded
(change_prot_numa skips folios already on the scanning CPU's node). The folio's last
cpupid is kept beside the folio (``last_cpupid``), reset when the folio is new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmm import mmzone
from kmm.pgtable import HPAGE_PMD_MASK, HPAGE_PMD_SIZE, PAGE_SHIFT

MS = 1_000_000  # emulated ns per ms

# sysctl name -> (default, lo, hi)
KNOBS: dict[str, tuple[int, int, int]] = {
    "kernel.numa_balancing": (0, 0, 1),
    "numa_balancing_scan_delay_ms": (1000, 0, 1 << 31),
    "numa_balancing_scan_period_min_ms": (1000, 0, 1 << 31),
    "numa_balancing_scan_period_max_ms": (60000, 0, 1 << 31),
    "numa_balancing_scan_size_mb": (256, 1, 1 << 31),
}

# task_numa_fault's flags
TNF_MIGRATED, TNF_NO_GROUP, TNF_SHARED, TNF_FAULT_LOCAL, TNF_MIGRATE_FAIL = 1, 2, 4, 8, 16


@dataclass
class MmNuma:
    """The NUMA fields of an mm_struct and of its task (there is one task per mm)."""
    next_scan: int = 0            # mm->numa_next_scan (ns)
    scan_offset: int = 0          # mm->numa_scan_offset
    scan_seq: int = 0             # mm->numa_scan_seq
    scan_period: int = 0          # p->numa_scan_period (ms; 0: not started)
    faults_local: int = 0         # hinting-fault pages this period, by locality
    faults_remote: int = 0
    history: list = field(default_factory=list)  # (ns, offset, end) of each window


class NumaBalancing:
    """The machine's NUMA balancing state: the sysctls, per-mm state, last cpupids."""

    def __init__(self) -> None:
        self.knobs = {k: v[0] for k, v in KNOBS.items()}
        self.mms: dict[int, MmNuma] = {}
        self.cpupid: dict[int, tuple] = {}  # head pfn -> ((cpu, pid), the folio object)


def state(m) -> NumaBalancing:
    nb = m.__dict__.get("numab")
    if nb is None:
        nb = m.numab = NumaBalancing()
    return nb


def set_sysctl(m, name: str, value) -> None:
    """Write a NUMA balancing knob, validated (ValueError names the knob and range)."""
    if name not in KNOBS:
        raise ValueError(f"unknown sysctl {name!r} (one of {', '.join(KNOBS)})")
    _, lo, hi = KNOBS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}: must be an integer {lo}..{hi}, not {value!r}")
    state(m).knobs[name] = value


def enabled(m) -> bool:
    nb = m.__dict__.get("numab")
    return nb is not None and bool(nb.knobs["kernel.numa_balancing"])


def mm_numa(m, mm) -> MmNuma:
    nb = state(m)
    st = nb.mms.get(mm.id)
    if st is None:
        # init_numa_balancing / mm_init: the first scan waits scan_delay_ms
        st = nb.mms[mm.id] = MmNuma(
            next_scan=m.sched.now + nb.knobs["numa_balancing_scan_delay_ms"] * MS)
    return st


# ------------------------------------------------------------------ cpupids
def this_cpu(m) -> int:
    """smp_processor_id() of the running actor: the CPU its user access runs on."""
    actor = m.sched.current
    cpu = m.running_cpu.get(actor)
    return cpu if cpu is not None else (actor.cpu or 0)


def folio_last_cpupid(m, folio):
    """folio_last_cpupid: (cpu, pid) of the last hinting fault, or None (unset: a new
    folio, page_cpupid_reset_last)."""
    got = m.__dict__.get("numab") and state(m).cpupid.get(folio.pfn)
    return got[0] if got and got[1] is folio else None


def folio_xchg_last_cpupid(m, folio, cpupid):
    """folio_xchg_last_cpupid: set it, return the old one."""
    old = folio_last_cpupid(m, folio)
    state(m).cpupid[folio.pfn] = (cpupid, folio)
    return old


def folio_migrate_cpupid(m, new, old) -> None:
    """folio_migrate_flags: the new folio keeps the old one's last cpupid."""
    c = folio_last_cpupid(m, old)
    if c is not None:
        state(m).cpupid[new.pfn] = (c, new)


# ------------------------------------------------------------- the filter
def should_numa_migrate_memory(m, task, folio, src_nid: int, dst_cpu: int) -> bool:
    """should_numa_migrate_memory: record this fault's cpupid in the folio, then the
    two-stage filter: early in the task's life (numa_scan_seq <= 4) a first or private
    fault migrates at once; otherwise the previous fault must have come from the same
    node as this one (the folio is used from there twice in a row) before it moves."""
    dst_nid = mmzone.cpu_to_node(m, dst_cpu)
    this = (dst_cpu, task.pid)
    last = folio_xchg_last_cpupid(m, folio, this)
    st = mm_numa(m, task.mm)
    private = last is not None and last[1] == task.pid
    if st.scan_seq <= 4 and (last is None or private):
        return True
    if last is not None and mmzone.cpu_to_node(m, last[0]) != dst_nid:
        return False  # the two-stage filter
    return True  # a private fault, or a shared one without a numa group


def mpol_misplaced(m, task, folio, vma, addr: int) -> int:
    """mpol_misplaced with the default policy (MPOL_LOCAL | MPOL_F_MOF | MPOL_F_MORON):
    the faulting CPU's node if the folio is elsewhere and should_numa_migrate_memory
    agrees, else NUMA_NO_NODE. The filter runs (and records the cpupid) on local
    faults too."""
    cpu = this_cpu(m)
    thisnid = mmzone.cpu_to_node(m, cpu)
    curnid = mmzone.folio_nid(m, folio)
    if not should_numa_migrate_memory(m, task, folio, curnid, cpu):
        return mmzone.NUMA_NO_NODE
    return thisnid if curnid != thisnid else mmzone.NUMA_NO_NODE


def numa_migrate_check(m, task, folio, vma, addr: int) -> tuple[int, int, object]:
    """numa_migrate_check: count the hinting fault (numa_hint_faults; _local when the
    folio is on this CPU's node), read the last cpupid, and ask mpol_misplaced.
    Returns (target nid or NUMA_NO_NODE, TNF flags, last cpupid)."""
    flags = 0
    m.vmstat.count_vm_event("numa_hint_faults")
    if mmzone.folio_nid(m, folio) == mmzone.numa_node_id(m):
        m.vmstat.count_vm_event("numa_hint_faults_local")
        flags |= TNF_FAULT_LOCAL
    last = folio_last_cpupid(m, folio)
    return mpol_misplaced(m, task, folio, vma, addr), flags, last


def task_numa_fault(m, task, last_cpupid, nid: int, pages: int, flags: int) -> None:
    """task_numa_fault: account the hinting fault's pages as local or remote for the
    scan-period adaptation (the kernel's numa_faults arrays, reduced to two counts)."""
    st = mm_numa(m, task.mm)
    if nid == mmzone.numa_node_id(m) or flags & TNF_MIGRATED:
        st.faults_local += pages
    else:
        st.faults_remote += pages


def task_of(m, mm):
    for t in m.tasks.values():
        if t.mm is mm and t.alive:
            return t
    return None


# ------------------------------------------------------------- the scanner
def update_task_scan_period(m, st: MmNuma) -> None:
    """update_task_scan_period, simplified: only local faults (or none) -> scan half as
    often, up to scan_period_max_ms; remote faults -> twice as often, down to min."""
    k = state(m).knobs
    lo, hi = k["numa_balancing_scan_period_min_ms"], k["numa_balancing_scan_period_max_ms"]
    if st.faults_remote:
        st.scan_period = max(lo, st.scan_period // 2)
    else:
        st.scan_period = min(hi, st.scan_period * 2)
    st.faults_local = st.faults_remote = 0


async def task_tick_numa(m, task) -> None:
    """task_tick_numa + the task_work it queues: when the task's scan time has come,
    run task_numa_work before returning to user space. Context: no locks held."""
    if task.mm is None or len(m.node_data) < 2:
        return  # numa_balancing is off on a machine of one node
    st = mm_numa(m, task.mm)
    if m.sched.now >= st.next_scan:
        await task_numa_work(m, task)


async def task_numa_work(m, task, force: bool = False) -> None:
    """task_numa_work: make the next scan_size_mb of the address space PROT_NONE
    (change_prot_numa), VMA by VMA from mm->numa_scan_offset, each window ending on a
    PMD boundary; at the end of the address space start again (numa_scan_seq + 1).
    Context: takes mmap_lock for read (a trylock: a busy mm waits for the next tick)."""
    from kmm import mprotect
    from kmm.mm_types import VM_HUGETLB, VM_READ, VM_WRITE
    mm = task.mm
    st = mm_numa(m, mm)
    k = state(m).knobs
    now = m.sched.now
    if now < st.next_scan and not force:  # force: the program asked (Proc.numa_scan)
        return
    if not st.scan_period:  # task_scan_start
        st.scan_period = k["numa_balancing_scan_period_min_ms"]
    else:
        update_task_scan_period(m, st)
    st.next_scan = now + st.scan_period * MS
    pages = k["numa_balancing_scan_size_mb"] << (20 - PAGE_SHIFT)
    virtpages = pages * 8  # scan up to this much virtual space
    if not await mm.mmap_lock.down_read_trylock("task_numa_work"):
        return
    start = st.scan_offset
    reached_end = True
    for vma in list(mm.vmas):
        if vma.end <= start:
            continue
        # vma_migratable, accessible (VM_READ|VM_WRITE), not hugetlb, anonymous
        if (vma.vm_file is not None or vma.flags & VM_HUGETLB
                or not vma.flags & (VM_READ | VM_WRITE)):
            continue
        start = max(start, vma.start)
        while start < vma.end:
            end = (start + (pages << PAGE_SHIFT) + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
            end = min(end, vma.end)
            nr = await mprotect.change_prot_numa(m, vma, start, end)
            st.history.append((now, start, end))
            if nr:
                pages -= (end - start) >> PAGE_SHIFT
            virtpages -= (end - start) >> PAGE_SHIFT
            start = end
            if pages <= 0 or virtpages <= 0:
                break
        if pages <= 0 or virtpages <= 0:
            reached_end = start >= mm.vmas[-1].end
            break
    if reached_end:  # reset_ptenuma_scan
        st.scan_offset = 0
        st.scan_seq += 1
    else:
        st.scan_offset = start
    await mm.mmap_lock.up_read()
