"""The emulated machine: memory, allocator, locks, CPUs and processes, wired together.

Emulator-only assembly, at the top of kmm: no mechanism module imports it. It owns the
shared state every actor reaches; the operations on that state are kmm.atomic's (one
preemption point each). The kernel paths live in the modules named after mm/ files and
take the machine as their first argument. ``strict`` (default: the KMM_STRICT
environment variable) guards the shared state so that only kmm.atomic may change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from kmm import (
    atomic, huge_memory_split, hugetlb, khugepaged, mmzone, page_alloc, rcupdate, swap, swapfile,
    vmscan,
)
from kmm.cost import COST_CLEAR_PAGE, COST_COPY_PAGE, COST_ENTRY  # noqa: F401 (re-export)
from kmm.lockdep import LockdepSplat
from kmm.locking import FolioLock, Locks
from kmm.mm_types import PGTY_table, PGTY_zero, MmStruct, Page
from kmm.mmdebug import KernelBug, StrictError  # noqa: F401 (re-export)
from kmm.physmem import PhysMem
from kmm.pgtable import PAGE_SHIFT, PAGE_SIZE
from kmm.runtime.sched import Scheduler
from kmm.sysfs import Sysfs
from kmm.vmstat import VmStat


def _contexts(e: BaseException | None):
    """e, then the exceptions it was raised while handling (__context__), 16 at most."""
    for _ in range(16):
        if e is None:
            return
        yield e
        e = e.__context__


def _raised_in_cancel(e: BaseException) -> bool:
    """The exception is trio's Cancelled, or came while one was being handled."""
    return any(isinstance(c, trio.Cancelled) for c in _contexts(e))


def _cause_behind_cleanup(e: BaseException) -> BaseException:
    """A kernel bug or lockdep splat that an error of a clean-up path replaced (a
    ``finally`` releasing a lock the failed path no longer held): the first is the
    report, the second only its consequence."""
    return next((c for c in _contexts(e) if isinstance(c, (KernelBug, LockdepSplat))), e)


@dataclass(frozen=True)
class MachineConfig:
    memory: int = 1 << 30
    swap: int = 0
    cpus: int = 2
    seed: int = 1
    nodes: int = 1                 # NUMA nodes (kmm.mmzone)
    node_memory: tuple = ()        # bytes per node; empty: memory split evenly
    node_cpus: tuple = ()          # CPUs per node; empty: CPUs split evenly


class Task:
    """A process (task_struct, reduced to what mm needs): a name, a pid and an mm."""

    __slots__ = ("name", "pid", "mm", "alive", "signal", "regions", "files", "mempolicy",
                 "il_prev")

    def __init__(self, name: str, pid: int, mm: MmStruct) -> None:
        self.name = name
        self.pid = pid
        self.mm = mm
        self.alive = True
        self.signal: str | None = None
        self.regions: dict[str, tuple[int, int]] = {}  # scenario name -> (addr, size)
        self.files: dict[int, object] = {}  # fd table: region address -> open memfd file
        self.mempolicy = None  # set_mempolicy: kmm.mempolicy.Mempolicy (None: local)
        self.il_prev = 0       # the last node an interleave policy used (MPOL_INTERLEAVE)


class Cpu:
    """One emulated CPU: its TLB (4K and 2M entries, tagged by mm as with PCID)."""

    __slots__ = ("id", "tlb4k", "tlb2m")

    def __init__(self, id: int) -> None:
        self.id = id
        # (mm id, vpn) -> (pfn, writable, dirty)
        self.tlb4k: dict[tuple[int, int], tuple[int, bool, bool]] = {}
        # (mm id, addr >> 21) -> (head pfn, writable, dirty)
        self.tlb2m: dict[tuple[int, int], tuple[int, bool, bool]] = {}


class Machine:
    def __init__(self, config: MachineConfig = MachineConfig(), *, mode: str = "free",
                 seed: int | None = None, replay=None, trace=None,
                 strict: bool | None = None) -> None:
        if config.memory < 16 << 20 or config.memory % PAGE_SIZE:
            raise ValueError("memory must be a multiple of 4 KiB and at least 16 MiB")
        self.config = config
        self.sched = Scheduler(mode, config.seed if seed is None else seed, replay, trace)
        self.locks = Locks(self.sched)
        self.vmstat = VmStat()
        self.sysfs = Sysfs()
        self.physmem = PhysMem(config.memory >> PAGE_SHIFT)
        self.tables = self.physmem.tables  # the page-table frames (hot: kmm.atomic)
        layout = mmzone.node_layout(self.physmem.nr_pages, config.nodes, config.node_memory)
        self.cpu_node = mmzone.cpu_layout(config.cpus, config.nodes, config.node_cpus)
        self.node_starts = [start for start, _ in layout]
        # NODE_DATA(nid): each node's pglist_data with its one zone
        self.node_data = [vmscan.PgData(nid) for nid in range(config.nodes)]
        for pg, (start, nr) in zip(self.node_data, layout):
            pg.zone = page_alloc.Zone(self, nr, start, pg.node_id)
            pg.zonelist = mmzone.build_zonelists(config.nodes, pg.node_id)
        if config.nodes > 1:
            total = sum(pg.zone.managed for pg in self.node_data)
            for pg in self.node_data:
                pg.zone.set_watermarks(True, total, config.nodes)
        self.zone = self.node_data[0].zone  # node 0's zone (the one zone of one node)
        self.running_cpu: dict = {}  # actor -> the CPU its user access runs on (numa)
        self.actor_node: dict[str, int] = {}  # per-node kernel thread -> its node
        self.cpus = [Cpu(i) for i in range(config.cpus)]
        self.tlb_stats = [0] * config.cpus  # dTLB misses (page walks) per CPU
        # empty_zero_page: a reserved frame, never freed
        self.zero_pfn = self.zone.boot_alloc(0)
        self.strict = atomic.strict_default() if strict is None else strict
        atomic.init_page(self.physmem.page(self.zero_pfn), page_type=PGTY_zero, refcount=1)
        self.huge_zero_pfn = -1           # the huge zero folio, allocated on first use
        self.huge_zero_refcount = 0       # huge_zero_refcount: the mms holding it (+1 global)
        self.deferred_split_queue: dict[int, None] = {}  # ds_queue, in queue order
        self.split_queue_lock = self.locks.spinlock("split_queue_lock", "split_queue")
        self.tasks: dict[str, Task] = {}
        self._next_pid = 1
        self._next_mm = 1
        self._next_anon_vma = 1
        khugepaged.khugepaged_init(self)  # m.khugepaged_scan: the mm_slot list and cursor
        self.lruvec = swap.Lruvec(self.locks)
        self.swap_info = swapfile.swapon(self, config.swap)
        self.pgdat = self.node_data[0]  # NODE_DATA(0): kswapd and reclaim state
        # registered shrinkers (shrinker_register): objects with count_objects(m) and
        # async scan_objects(m, nr_to_scan) -> freed, run by shrink_slab in reclaim
        self.shrinkers: list = []
        huge_memory_split.thp_shrinker_init(self)
        hugetlb.hugetlb_init(self)  # m.hugetlb: hstates, pools, hugetlb_lock
        self.waitqueues: dict[str, tuple] = {}  # wait_queue_head_t by name (kmm.wait)
        # behaviours that differ between 6.18 point releases, chosen per run
        self.quirks: set[str] = set()
        # safeguards removed on purpose for the race laboratory (kmm.bugs): empty unless
        # a run injects a bug
        self.bugs: frozenset[str] = frozenset()
        # references deferred_split_scan holds on its batch (head pfn -> count), so the
        # invariant checker can tell them from a leaked reference
        self.split_scan_pins: dict[int, int] = {}
        # isolation references folio_putback_lru is about to drop (head pfn -> count):
        # the folio is back on its LRU list, its reference goes at the folio_put after
        self.putback_pins: dict[int, int] = {}
        # read-side nesting per actor and callbacks waiting for a grace period
        self.rcu = rcupdate.RcuState()
        # actors inside __folio_put (refcount 0, not yet back in the buddy): swap.__folio_put
        self.freeing: dict[object, int] = {}
        # actors waiting for a folio's unlock without a reference, as the kernel lets
        # migration_entry_wait_on_locked do (the migration holds one; the waiter never
        # touches the folio once woken): page_alloc's free check excuses them
        self.unref_waiters: set = set()
        if self.strict:
            atomic.make_strict(self)

    def run(self, driver) -> None:
        """Run ``driver`` as the first actor until every workload actor is done; an
        actor's exception comes out as itself, not wrapped in an exception group."""
        trio.run(self.run_async, driver)

    async def run_async(self, driver) -> None:
        """``run`` inside a trio run already going: the explorer runs many machines, one
        after the other, in one trio run (starting one costs more than a short run)."""
        try:
            await self.sched.run(driver)
        except BaseExceptionGroup as eg:
            e: BaseException = eg
            while isinstance(e, BaseExceptionGroup):
                # an actor cancelled by another's failure may fail again in its own
                # clean-up (releasing a lock it was still waiting for): report the first
                first = [x for x in e.exceptions if not _raised_in_cancel(x)]
                if len(e.exceptions) == 1:
                    e = e.exceptions[0]
                elif len(first) == 1:
                    e = first[0]
                else:
                    break
            raise _cause_behind_cleanup(e) from None

    # ------------------------------------------------------------------ bugs
    def bug(self, message: str) -> None:
        raise KernelBug(message)

    # ------------------------------------------------------------- processes
    async def mm_alloc(self, owner: str) -> MmStruct | None:
        """mm_alloc + pgd_alloc: a new mm with an empty PGD (None when out of memory)."""
        mm = MmStruct(self._next_mm, owner, -1,
                      self.locks.rwsem("mmap_lock", f"mmap_lock:{owner}"),
                      self.locks.spinlock("page_table_lock", f"page_table_lock:{owner}"))
        self._next_mm += 1
        pgd = await self.pte_alloc_one(mm, "pgd")
        if pgd < 0:
            return None
        mm.pgd = pgd
        return mm

    def new_task(self, name: str, mm: MmStruct) -> Task:
        if name in self.tasks and self.tasks[name].alive:
            raise ValueError(f"process {name!r} exists")
        t = Task(name, self._next_pid, mm)
        self._next_pid += 1
        self.tasks[name] = t
        return t

    def tasks_with_tables(self):
        """The tasks whose mm still has page tables: the live ones and those exiting.
        do_exit marks a task dead before exit_mmap zaps its mappings, and until then
        every page it maps still counts them (mapcount, refcount, swap count), as in the
        kernel, where an exiting mm's tables are an mm like any other until
        exit_mmap: the invariant checks walk these, not only the live tasks."""
        return [t for t in self.tasks.values() if t.mm.pgd >= 0]

    def new_anon_vma_id(self) -> int:
        i = self._next_anon_vma
        self._next_anon_vma += 1
        return i

    def folio_lock_of(self, folio: Page) -> FolioLock:
        lk = folio.lock
        if lk is None:
            lk = FolioLock(self.locks, "folio_lock", f"folio:{folio.pfn:#x}")
            lk.on_acquire = lambda lk, folio=folio: self._folio_lock_acquired(folio)
            atomic.init_page(folio, lock=lk)  # created on first use, as a field init
        return lk

    def _folio_lock_acquired(self, folio: Page) -> None:
        """folio_lock / folio_trylock of a folio the caller holds no reference to: it
        was freed (its struct page now belongs to the buddy or to a new folio) while
        the caller slept on its lock or before it got there. A migration-entry waiter
        takes no reference by design (Machine.unref_waiters) and is excused."""
        if self.physmem.pages.get(folio.pfn) is folio and folio.refcount > 0:
            return
        if self.sched.current in self.unref_waiters:
            return
        self.bug(f"folio_lock of a freed folio pfn={folio.pfn:#x} by "
                 f"{self.sched.current.name}: {folio!r}")

    # -------------------------------------------------------- page tables
    async def pte_alloc_one(self, mm: MmStruct, level: str) -> int:
        """pte_alloc_one / pmd_alloc_one / pud_alloc_one: a zeroed table page for mm.

        PMD and PTE tables carry their split ptlock. Returns the pfn, or -1 when memory
        is exhausted.
        """
        if len(self.node_data) > 1:  # alloc_pages: the current (owning) task's policy
            from kmm import mempolicy
            task = self.tasks.get(mm.owner)
            pfn = await mempolicy.alloc_pages_mpol(
                self, page_alloc.GFP["GFP_PGTABLE_USER"], 0, mempolicy.get_task_policy(task),
                mempolicy.NO_INTERLEAVE_INDEX, mmzone.numa_node_id(self), "pgtable", task)
        else:
            pfn = await page_alloc.alloc_pages(self, 0, "GFP_PGTABLE_USER", "pgtable")
        if pfn < 0:
            return -1
        self.physmem.new_table(pfn)
        ptl = None
        if level in ("pmd", "pte"):
            ptl = self.locks.spinlock("ptlock_" + level, f"ptl_{level}:{pfn:#x}")
        atomic.init_page(self.physmem.page(pfn), page_type=PGTY_table, mm=mm,
                         pt_level=level, ptl=ptl)  # pagetable_pte_ctor
        mm.pgtables_bytes += PAGE_SIZE
        self.vmstat.mod_node_page_state("nr_page_table_pages", 1)
        return pfn

    async def pte_free(self, mm: MmStruct | None, pfn: int) -> None:
        """pte_free / pmd_free: the table page goes back to the buddy allocator. ``mm``
        None: the table was already taken off its mm's pgtables_bytes (an RCU-deferred
        free, kmm.pgtable_generic.pte_free_defer, runs after the mm may be gone)."""
        pg = self.physmem.page(pfn)
        if pg.pt_deposit:
            self.bug(f"freeing PMD table {pfn:#x} with deposited tables")
        if pg.pt_share_count:  # huge_pmd_unshare must have dropped every other sharer
            self.bug(f"freeing PMD table {pfn:#x} still shared by {pg.pt_share_count} "
                     "more mm(s)")
        if any(self.physmem.tables[pfn]):
            self.bug(f"freeing non-empty page table {pfn:#x}")
        self.physmem.drop_table(pfn)
        atomic.init_page(pg, page_type="", ptl=None, mm=None, pt_deposit=None)  # _dtor
        if mm is not None:
            mm.pgtables_bytes -= PAGE_SIZE
        self.vmstat.mod_node_page_state("nr_page_table_pages", -1)
        await swap.folio_put(self, pg)

    def table_lock(self, table_pfn: int):
        """pmd_lockptr / pte_lockptr: the split ptlock in the table page's struct page."""
        return self.physmem.pages[table_pfn].ptl

    # ----------------------------------------------------------- huge zero
    def is_huge_zero_pfn(self, pfn: int) -> bool:
        return pfn == self.huge_zero_pfn and pfn >= 0

    def is_zero_pfn(self, pfn: int) -> bool:
        return pfn == self.zero_pfn
