"""The program API: what a workload does to the emulated machine.

A program is a Python module with ``async def main(k: Kernel)``. It creates processes,
maps memory and touches it; ``k.parallel`` runs functions concurrently, each on its own
emulated CPU (a separate actor), so two CPUs can fault the same range at once::

    async def main(k):
        p = await k.process("main")
        a = await p.mmap(4 << 20)
        await p.madvise(a, 4 << 20, "hugepage")
        await k.parallel(lambda cpu: p.on(cpu).touch(a, 2 << 20),
                         lambda cpu: p.on(cpu).touch(a, 2 << 20, value=2))

Every write is remembered in a shadow copy per process (forked with the process), so
``Proc.verify`` and the invariant checker can prove that no byte was lost, and that no
process reads a byte it did not write itself (another's write after a fork never
shows through). A byte the parent writes on another CPU while a fork is under way may
or may not reach the child (whether its page was copied before or after the write):
the child's value there is unknown until the child writes it.

Errors are raised as Python's own system calls raise them: a call the kernel refuses
raises ``KmmError``, an ``OSError`` whose ``errno`` is the kernel's number and whose
``errno_name`` is its name (``"EINVAL"``, ``"EAGAIN"``, ...), the call and its arguments
in the message; an argument of the wrong type is a ``TypeError`` and an unknown advice
or protection name a ``ValueError``, each naming the argument, before the kernel is
entered (integers are passed as the syscall ABI passes them, as unsigned longs). An
access the process may not make kills it with SIGSEGV (``kmm.Segv``); a fault that
finds no memory runs the OOM killer (kmm.oom_kill), which may kill this process
(``OomKilled``) or another. docs/program-api.md is the reference of every public call.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from kmm import (fault, fork, huge_memory_split, madvise, mmap, mprotect, mremap, oom_kill, swap,
                 task_mmu)
from kmm.mm_types import VM_SHARED
from kmm.uapi import KmmError, OomKilled, errno_name  # noqa: F401 - the API's errors
from kmm.pgtable import PAGE_SIZE
from kmm.runtime.sched import FREE

__all__ = ["Kernel", "Proc", "KmmError", "OomKilled", "errno_name"]

ULONG = (1 << 64) - 1


def _ulong(name: str, value, arg: str) -> int:
    """An integer argument as the syscall gets it (an unsigned long)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {arg} must be an int, not {type(value).__name__}")
    return value & ULONG


def _nodes(name: str, value) -> list[int]:
    """A nodemask argument: a list of node ids (ints)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise TypeError(f"{name}: nodes must be a list of node ids (int)")
    return list(value)


def _word(name: str, value, arg: str, table) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: {arg} must be a str (one of {', '.join(table)}), "
                        f"not {type(value).__name__}")
    if value not in table:
        raise ValueError(f"{name}: {arg} {value!r} is not one of {', '.join(table)}")
    return value


def _check(name: str, r, args: str, proc: "Proc | None" = None, label: str = ""):
    """A mechanism's result: an errno name raises KmmError, anything else is returned.
    The error remembers its process, so that a program turning it into a value
    (``errno_name``) has it examined (``Kernel.expect``) or reported (``unexamined``)."""
    if isinstance(r, str):
        e = KmmError(r, f"{name}({args})")
        if proc is not None:
            e._failed = (proc.k, proc.name, label or name, r)
        raise e
    return r


def _errname(r: int):
    """A negative errno as the name _check raises; anything else as it is."""
    import errno
    return errno.errorcode.get(-r, str(-r)) if r < 0 else r


class UnexpectedResult(AssertionError):
    """A call under test returned what the program does not accept (Kernel.expect):
    the program's own assertion, wherever it is raised."""


class Kernel:
    """A program's handle on the machine: processes, CPUs, concurrency."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.shadow: dict[str, dict[int, int]] = {}  # task name -> addr -> byte written
        # bytes under MADV_FREE: until rewritten they read back as written or as zero
        # (reclaim may have discarded the lazyfree page)
        self.lazy: dict[str, dict[int, int]] = {}
        # bytes whose value in this process is not known: written by the parent on
        # another CPU while the fork that made this process was under way
        self.unknown: dict[str, set[int]] = {}
        # process name -> one set per fork of it under way: the addresses its other
        # CPUs write meanwhile
        self.forking: dict[str, list[set[int]]] = {}
        self.after_op: Callable[[], None] | None = None  # the invariant hook in tests
        # bytes written through shared file mappings: (inode id, file byte offset) ->
        # byte; every mapper of the file sees them (kmm.testing checks the page cache)
        self.file_shadow: dict[tuple[int, int], int] = {}
        # syscalls that failed (returned an errno name) and that the program has not
        # examined with ``expect`` yet: the race laboratory reports any left at the end
        self.failed: list[tuple[str, str, str]] = []  # (process, call, errno)

    @property
    def cpus(self) -> int:
        """How many emulated CPUs the machine has."""
        return len(self.machine.cpus)

    @property
    def nodes(self) -> int:
        """How many NUMA nodes the machine has (``MACHINE["nodes"]``; 1 by default)."""
        return len(self.machine.node_data)

    def cpu_to_node(self, cpu: int) -> int:
        """cpu_to_node: the node CPU ``cpu`` belongs to."""
        return self.machine.cpu_node[cpu]

    def page_to_nid(self, pfn: int) -> int:
        """page_to_nid: the node whose memory holds frame ``pfn``."""
        from kmm import mmzone
        return mmzone.page_to_nid(self.machine, pfn)

    def numastat(self, node: int | None = None) -> dict[str, int]:
        """The numa_* lines of /proc/vmstat (numa_hit, numa_miss, numa_foreign,
        numa_interleave, numa_local, numa_other), or one node's numastat."""
        from kmm import mmzone
        if node is None:
            return mmzone.numa_vmstat(self.machine)
        return dict(self.machine.node_data[node].zone.numa_events)

    async def process(self, name: str = "main") -> "Proc":
        """A new process with an empty address space (exec)."""
        m = self.machine
        mm = await m.mm_alloc(name)
        if mm is None:
            raise fault.OutOfMemory("no memory for a new mm")
        task = m.new_task(name, mm)
        self.shadow[name] = {}
        self.lazy[name] = {}
        return Proc(self, task, m.sched.current.cpu or 0)

    def smaps(self, proc: "Proc", addr: int, length: int) -> tuple[int, int]:
        """(Rss kB, AnonHugePages kB) of the process over [addr, addr+length), as
        /proc/PID/smaps sums them."""
        return task_mmu.smaps_range(self.machine, proc.task.mm, addr, addr + length)

    def smaps_hugetlb(self, proc: "Proc", addr: int, length: int) -> tuple[int, int]:
        """(Private_Hugetlb kB, Shared_Hugetlb kB) of the process over the hugetlb VMAs
        inside [addr, addr+length), as /proc/PID/smaps sums them (a page of a shared
        PMD table counts as shared)."""
        return task_mmu.smaps_hugetlb_kb(self.machine, proc.task.mm, addr, addr + length)

    def proc(self, name: str) -> "Proc":
        """The process named ``name`` (one this program created or forked), on CPU 0."""
        task = self.machine.tasks.get(name) if isinstance(name, str) else None
        if task is None:
            raise KeyError(f"proc: no process named {name!r}")
        return Proc(self, task, 0)

    async def parallel(self, *fns: Callable[[int], Awaitable[object]]) -> list:
        """Run fns[i](cpu) on CPU i (mod the CPU count), each as its own actor; wait
        for all. Returns their results (an exception is returned, not raised)."""
        sched = self.machine.sched

        def thread(i, fn):
            async def run():
                try:
                    return await fn(i % self.cpus)
                except (fault.Segv, fault.Sigbus, fault.OutOfMemory, OomKilled,
                        KmmError) as e:
                    return e
            return run

        first = len(sched.actors)
        return await sched.spawn_and_join(
            [(f"cpu{i % self.cpus}.{first + i}", thread(i, fn), i % self.cpus)
             for i, fn in enumerate(fns)])

    def start_daemon(self, name: str) -> None:
        """Start an installed daemon (entry-point group kmm.daemons, e.g. "khugepaged")
        as an actor of this machine, unless it runs already; it runs in emulated time
        until the program ends."""
        from kmm import daemon
        if any(a.name == name for a in self.machine.sched.actors):
            return
        (cls,) = daemon.load_daemons([name])
        daemon.start_daemon(self.machine, cls())
        if name in daemon.PER_NODE_DAEMONS:  # kswapdN, kcompactdN of the other nodes
            for nid in range(1, len(self.machine.node_data)):
                daemon.start_daemon(self.machine, cls(), nid)

    def cpu_relax(self) -> None:
        """The pause of a busy-wait loop (the kernel's cpu_relax): call it once per
        iteration of a loop that waits for another CPU. The scheduler's systematic modes
        then let the awaited CPU run (pct drops this CPU's priority: kmm.runtime.sched
        yield_spin); a wait that never ends is reported as a livelock by explore."""
        self.machine.sched.yield_spin("cpu_relax")

    async def sleep(self, ns: int) -> None:
        """Let emulated time pass (the program's actor sleeps; daemons run meanwhile)."""
        await self.machine.sched.sleep(ns)

    @property
    def now(self) -> int:
        """Emulated time, in ns."""
        return self.machine.sched.now

    def set_knob(self, name: str, value) -> None:
        """Write a /sys/kernel/mm/transparent_hugepage knob ("defrag",
        "khugepaged/max_ptes_none", "hugepages-64kB/enabled", ...), validated as the
        kernel's store handler does."""
        self.machine.sysfs.write(name, value)

    def set_sysctl(self, name: str, value: int) -> None:
        """Write a NUMA balancing knob: "kernel.numa_balancing" (0/1) and
        "numa_balancing_scan_delay_ms", "_scan_period_min_ms", "_scan_period_max_ms",
        "_scan_size_mb" (kmm.numa_balancing); ValueError outside the kernel's range."""
        from kmm import numa_balancing
        numa_balancing.set_sysctl(self.machine, name, value)

    def knob(self, name: str):
        """Read a /sys/kernel/mm/transparent_hugepage knob (as ``set_knob`` names it)."""
        return self.machine.sysfs[name]

    def vmstat(self) -> dict[str, int]:
        """Every /proc/vmstat event the machine counts, by name."""
        return dict(self.machine.vmstat.events)

    def mthp_stats(self, size: str) -> dict[str, int]:
        """/sys/kernel/mm/transparent_hugepage/hugepages-<size>/stats/: every file of
        one folder by name (``size`` as the folder names it: "64kB", "2048kB"), e.g.
        ``nr_anon`` (anonymous folios of that size now), ``nr_anon_partially_mapped``,
        ``split_deferred``. KeyError for a size without a folder."""
        from kmm import huge_memory_mthp
        return dict(huge_memory_mthp.mthp_stats(self.machine)[f"hugepages-{size}"])

    def tlb_misses(self) -> list[int]:
        """dTLB misses (hardware page walks) so far, one count per CPU."""
        return list(self.machine.tlb_stats)

    def daemons(self) -> list[str]:
        """The daemon actors of this run (kswapd, kcompactd, khugepaged, plug-ins), by name."""
        return [a.name for a in self.machine.sched.actors if a.kind == "daemon"]

    def khugepaged_busy_ns(self) -> int:
        """Emulated time khugepaged has spent in its scans (khugepaged_do_scan), in ns."""
        return self.machine.khugepaged_scan.scan_ns

    def zoneinfo(self, node: int = 0) -> dict[str, int]:
        """/proc/zoneinfo's figures for a node's zone: free pages, watermarks, size."""
        z = self.machine.node_data[node].zone
        return {"nr_free": z.nr_free, "min": z.wmark["min"], "low": z.wmark["low"],
                "high": z.wmark["high"], "managed": z.managed, "present": z.nr_pages}

    async def set_hugetlb_pool(self, nr_hugepages: int | None = None,
                               nr_overcommit_hugepages: int | None = None) -> None:
        """Write /proc/sys/vm/nr_overcommit_hugepages and nr_hugepages (the 2 MiB
        hstate): the pool grows from the buddy allocator as far as it can."""
        from kmm import hugetlb
        m = self.machine
        h = m.hugetlb.default
        if nr_overcommit_hugepages is not None:
            await hugetlb.set_nr_overcommit_huge_pages(m, h, nr_overcommit_hugepages)
        if nr_hugepages is not None:
            await hugetlb.set_max_huge_pages(m, h, nr_hugepages)

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo's hugetlb lines: HugePages_Total, _Free, _Rsvd, _Surp,
        Hugepagesize and Hugetlb (kB); and PageTables (kB: every page-table page once,
        a PMD table shared between processes too)."""
        from kmm import hugetlb
        mi = hugetlb.hugetlb_report_meminfo(self.machine)
        mi["PageTables"] = self.machine.vmstat.node["nr_page_table_pages"] * 4
        return mi

    def buddyinfo(self, node: int = 0) -> list[int]:
        """/proc/buddyinfo: a node's free blocks per order, 0..10."""
        return self.machine.node_data[node].zone.buddyinfo()

    async def alloc_kernel_pages(self, order: int, reserves: bool = False,
                                 node: int | None = None) -> int:
        """A kernel allocation of 2^order pages that stays put (unmovable: compaction
        cannot move it): its pfn, or -1. GFP_KERNEL may reclaim; ``reserves``
        (__GFP_MEMALLOC without reclaim) takes what is free, below the min watermark
        too, so a program can hold every free block. ``node``: on that node only
        (__alloc_pages_node with __GFP_THISNODE)."""
        from kmm import gfp, page_alloc
        if reserves:
            mask = getattr(gfp, "__GFP_MEMALLOC") | getattr(gfp, "__GFP_NOWARN")
        else:
            mask = getattr(gfp, "GFP_KERNEL") | getattr(gfp, "__GFP_NOWARN")
        if node is not None:
            if not 0 <= node < self.nodes:
                raise ValueError(f"alloc_kernel_pages: node {node} is not one of the "
                                 f"machine's 0..{self.nodes - 1}")
            mask |= getattr(gfp, "__GFP_THISNODE")
        return await page_alloc.alloc_pages(self.machine, order, mask, "unmovable", node)

    async def free_kernel_pages(self, pfn: int) -> None:
        """Free an allocation alloc_kernel_pages made."""
        m = self.machine
        await swap.folio_put(m, m.physmem.page(pfn))

    async def memory_reclaim(self, nr_pages: int, swappiness: int = 100) -> int:
        """Write ``nr_pages`` pages to cgroup v2 memory.reclaim of the group holding every
        process (try_to_free_mem_cgroup_pages, with that memory.swappiness): the pages
        reclaimed."""
        from kmm import vmscan_node
        if isinstance(nr_pages, bool) or not isinstance(nr_pages, int) or nr_pages < 1:
            raise ValueError(f"memory_reclaim: nr_pages must be a positive int, not {nr_pages!r}")
        if isinstance(swappiness, bool) or not isinstance(swappiness, int) \
                or not 0 <= swappiness <= 200:
            raise ValueError(f"memory_reclaim: swappiness must be 0..200, not {swappiness!r}")
        return await vmscan_node.try_to_free_mem_cgroup_pages(self.machine, nr_pages, swappiness)

    async def force_empty(self) -> None:
        """cgroup v1 memory.force_empty of the group holding every process (swappiness 0):
        what a scenario's ``reclaim`` step does."""
        from kmm import vmscan_node
        await vmscan_node.memcg_reclaim(self.machine)

    def _done(self) -> None:
        if self.after_op is not None:
            self.after_op()

    def expect(self, result, *allowed: str, what: str = "call"):
        """Examine the result of a call under test: it must succeed (0, an address or
        a count) or fail with one of the ``allowed`` errno names (a failed call raises
        KmmError; ``errno_name`` turns it into its name); anything else is the
        program's assertion. Returns the result. A failure turned into a name that
        the program never passes here is reported by ``kmm explore`` at the end of the
        run (``unexamined``): a race program cannot ignore what the racing call
        returned::

            r = k.expect(await errno_name(p.madvise(a, SIZE, "collapse")), "EAGAIN",
                         what="collapse")
        """
        if isinstance(result, str):
            for i in range(len(self.failed) - 1, -1, -1):
                if self.failed[i][2] == result:
                    del self.failed[i]
                    break
            if result not in allowed:
                raise UnexpectedResult(f"{what} failed with {result}")
        elif not isinstance(result, int) or result < 0:
            raise UnexpectedResult(f"{what} returned {result!r}")
        return result

    def unexamined(self) -> list[str]:
        """The failed calls no ``expect`` examined, as "process: call -> errno"."""
        return [f"{proc}: {call} -> {errno}" for proc, call, errno in self.failed]


def _inherited(m, task, shadow: dict[int, int]) -> dict[int, int]:
    """The bytes a forked child inherits: all the parent wrote, except in hugetlb pages
    a parent's COW took from it (unmap_ref_private): those are gone from the parent,
    and the child (its VMA no longer marked) will fault fresh zeroed pages there."""
    from kmm import hugetlb_resv, memory
    from kmm.pgtable import pmd_index
    gone = [v for v in task.mm.vmas if v.hugetlb_file is not None and
            hugetlb_resv.is_vma_resv_set(v, hugetlb_resv.HPAGE_RESV_UNMAPPED)]
    if not gone:
        return dict(shadow)

    def mapped(a: int) -> bool:  # a hugetlb page is one PMD leaf
        t = memory.pmd_lookup(m, task.mm, a)
        return t >= 0 and m.physmem.tables[t][pmd_index(a)] != 0
    return {a: b for a, b in shadow.items()
            if not any(v.start <= a < v.end for v in gone) or mapped(a)}


class Proc:
    """A process as seen from one CPU; ``on(cpu)`` gives the same process on another."""

    def __init__(self, k: Kernel, task, cpu: int) -> None:
        self.k = k
        self.m = k.machine
        self.task = task
        self.cpu = cpu

    @property
    def name(self) -> str:
        """The process's name."""
        return self.task.name

    def on(self, cpu: int) -> "Proc":
        """The same process, its accesses made from CPU ``cpu`` (its TLB)."""
        if isinstance(cpu, bool) or not isinstance(cpu, int):
            raise TypeError(f"on: cpu must be an int, not {type(cpu).__name__}")
        if not 0 <= cpu < self.k.cpus:
            raise ValueError(f"on: cpu {cpu} is not one of the machine's 0..{self.k.cpus - 1}")
        return Proc(self.k, self.task, cpu)

    def on_node(self, nid: int) -> "Proc":
        """The same thread moved to node ``nid`` (sched_setaffinity to the node's
        CPUs): the process as seen from the first CPU of that node; its faults then
        allocate there and NUMA hinting faults count it as the task's node."""
        from kmm import mmzone
        cpus = [c for c in range(self.k.cpus) if mmzone.cpu_to_node(self.m, c) == nid]
        if not cpus:
            raise ValueError(f"on_node: node {nid} has no CPU (the machine's nodes: "
                             f"0..{mmzone.nr_node_ids(self.m) - 1})")
        return self.on(cpus[0])

    async def numa_scan(self) -> int:
        """Run NUMA balancing's task_numa_work for this process now, from this CPU, as
        if its scan time had come (kernel.numa_balancing need not be on): the next
        scan_size_mb window becomes PROT_NONE. Returns the pages it changed
        (numa_pte_updates)."""
        from kmm import numa_balancing
        self._alive()
        before = self.m.vmstat.events["numa_pte_updates"]
        if len(self.m.node_data) > 1:  # the scan's numa_node_id() is this CPU's node
            self.m.running_cpu[self.m.sched.current] = self.cpu
        await numa_balancing.task_numa_work(self.m, self.task, force=True)
        self.k._done()
        return self.m.vmstat.events["numa_pte_updates"] - before

    def _alive(self) -> None:
        if not self.task.alive:
            how = f"was killed by {self.task.signal}" if self.task.signal else "has exited"
            raise ProcessLookupError(f"process {self.name} {how}")

    async def mmap(self, size: int, addr: int | None = None, backing: str = "anon",
                   noreserve: bool = False) -> int:
        """A read-write mapping of ``size`` bytes at ``addr`` (default: 2 MiB-aligned
        above every mapping); returns its address. ``backing``: "anon" (MAP_PRIVATE|
        MAP_ANONYMOUS), "shmem" (MAP_SHARED|MAP_ANONYMOUS), "memfd" (a new memfd of the
        size, MAP_SHARED), "memfd_private" (MAP_PRIVATE), "hugetlb" (MAP_HUGETLB),
        "hugetlb_shared" (MAP_HUGETLB|MAP_SHARED); ``noreserve`` adds MAP_NORESERVE.
        KmmError EINVAL (size 0, unaligned addr), ENOMEM (beyond the address space, or
        no hugetlb reservation), EEXIST (addr is mapped)."""
        self._alive()
        size = _ulong("mmap", size, "size")
        if addr is None:
            addr = self._free_area(size)
        addr = _ulong("mmap", addr, "addr")
        backing = _word("mmap", backing, "backing", mmap.BACKINGS)
        r = await mmap.do_mmap(self.m, self.task, addr, size, backing, bool(noreserve))
        self.k._done()
        return _check("mmap", r, f"size={size:#x}, addr={addr:#x}", self)

    async def ftruncate(self, addr: int, size: int):
        """ftruncate of the memfd mapped at ``addr`` (by its mmap): 0, or KmmError EBADF
        (no memfd there), EINVAL."""
        from kmm import truncate
        self._alive()
        inode = self.task.files.get(addr)
        if inode is None:
            return _check("ftruncate", "EBADF", f"{addr:#x}, {size:#x}", self)
        r = await truncate.shmem_setattr_size(self.m, inode, size)
        if r == 0:
            self._forget_file(inode, size, 1 << 62)
        self.k._done()
        return _check("ftruncate", r, f"{addr:#x}, {size:#x}", self)

    async def fallocate_punch_hole(self, addr: int, offset: int, length: int):
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of the memfd mapped at
        ``addr``: 0, or KmmError EBADF (no memfd there), EINVAL. The hole reads back as
        zeros."""
        from kmm import truncate
        self._alive()
        args = f"{addr:#x}, {offset:#x}, {length:#x}"
        inode = self.task.files.get(addr)
        if inode is None:
            return _check("fallocate", "EBADF", args, self)
        r = await truncate.shmem_fallocate_punch_hole(self.m, inode, offset, length)
        if r == 0:
            self._forget_file(inode, offset, offset + length)
        self.k._done()
        return _check("fallocate", r, args, self)

    def _forget_file(self, inode, start: int, end: int) -> None:
        fs = self.k.file_shadow
        for key in [key for key in fs if key[0] == inode.id and start <= key[1] < end]:
            del fs[key]

    def _shared_offset(self, a: int):
        """(inode id, file offset) when a lies in a shared file mapping, else None."""
        from kmm import shmem
        vma = self.task.mm.vma_lookup(a)
        if vma is None or not shmem.vma_is_shmem(vma) or not vma.flags & VM_SHARED:
            return None
        return vma.vm_file.id, ((a - vma.start) + (vma.pgoff << 12))

    def _free_area(self, size: int) -> int:
        # 2 MiB-aligned, above every existing VMA, with a 2 MiB gap (as scenarios place)
        top = max((v.end for v in self.task.mm.vmas), default=0x2000_0000_0000)
        return (top + (4 << 20) - 1) & ~((2 << 20) - 1)

    async def munmap(self, addr: int, length: int) -> int:
        """munmap(addr, length): 0. KmmError EINVAL (unaligned addr, length 0)."""
        self._alive()
        addr, length = _ulong("munmap", addr, "addr"), _ulong("munmap", length, "length")
        r = await mmap.do_munmap(self.m, self.task, addr, length)
        if r == 0:
            self._forget(addr, length)
        self.k._done()
        return _check("munmap", r, f"{addr:#x}, {length:#x}", self)

    async def mprotect(self, addr: int, length: int, prot: str) -> int:
        """mprotect(addr, length, prot), prot one of "none", "r", "rw": 0. KmmError
        EINVAL (unaligned), ENOMEM (a hole in the range)."""
        self._alive()
        addr, length = _ulong("mprotect", addr, "addr"), _ulong("mprotect", length, "length")
        prot = _word("mprotect", prot, "prot", tuple(mprotect.PROT))
        r = await mprotect.do_mprotect(self.m, self.task, addr, length, prot)
        self.k._done()
        return _check("mprotect", r, f"{addr:#x}, {length:#x}, {prot!r}", self,
                      f"mprotect({prot})")

    async def madvise(self, addr: int, length: int, advice: str) -> int:
        """madvise(addr, length, advice), advice one of the names scenarios accept
        (hugepage, nohugepage, dontneed, collapse, pageout, cold, free): 0. KmmError
        with the kernel's errno (EINVAL, ENOMEM for a hole, EAGAIN/ENOMEM/EINVAL from
        MADV_COLLAPSE)."""
        self._alive()
        addr, length = _ulong("madvise", addr, "addr"), _ulong("madvise", length, "length")
        advice = _word("madvise", advice, "advice", tuple(madvise.ADVICE))
        r = await madvise.do_madvise(self.m, self.task, addr, length, advice)
        if r in (0, "ENOMEM") and advice == "dontneed":
            # private anonymous memory reads back as zeros; in a hugetlb VMA only the
            # whole huge pages (the kernel rounds the end down)
            for lo, hi in self._zapped(addr, addr + length):
                self._forget(lo, hi - lo)
        elif r in (0, "ENOMEM") and advice == "free":
            sh, lazy = self.k.shadow[self.name], self.k.lazy[self.name]
            for a in [a for a in sh if addr <= a < addr + length]:
                lazy[a] = sh.pop(a)
        self.k._done()
        return _check("madvise", r, f"{addr:#x}, {length:#x}, {advice!r}", self,
                      f"madvise({advice})")

    async def mremap(self, addr: int, old_len: int, new_len: int, new_addr: int):
        """mremap(addr, old_len, new_len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr): the
        new address. KmmError EINVAL (bad or overlapping ranges; for a hugetlb mapping
        also an address or length not huge-page aligned, or a new length above the
        old), EFAULT (the source is not one mapped VMA). The bytes written move with
        their pages."""
        self._alive()
        addr = _ulong("mremap", addr, "addr")
        old_len = _ulong("mremap", old_len, "old_len")
        new_len = _ulong("mremap", new_len, "new_len")
        new_addr = _ulong("mremap", new_addr, "new_addr")
        r = await mremap.do_mremap(self.m, self.task, addr, old_len, new_len, new_addr)
        if r == new_addr:
            keep = min(old_len, new_len)
            for sh in (self.k.shadow[self.name], self.k.lazy[self.name]):
                moved = {a - addr + new_addr: b for a, b in sh.items() if addr <= a < addr + keep}
                for a in [a for a in sh if addr <= a < addr + old_len
                          or new_addr <= a < new_addr + new_len]:
                    del sh[a]
                sh.update(moved)
        self.k._done()
        return _check("mremap", r, f"{addr:#x}, {old_len:#x}, {new_len:#x}, {new_addr:#x}",
                      self)

    async def set_mempolicy(self, mode: str, nodes=()) -> int:
        """set_mempolicy(2): the process's NUMA policy, ``mode`` one of default, local,
        preferred, bind, interleave, on ``nodes`` (node ids): 0. KmmError EINVAL as the
        kernel returns it (nodes with default/local, no existing node for bind,
        interleave or preferred, a node id beyond MAX_NUMNODES)."""
        from kmm import mempolicy
        self._alive()
        mode = _word("set_mempolicy", mode, "mode", tuple(mempolicy.MODES))
        nodes = _nodes("set_mempolicy", nodes)
        r = await mempolicy.do_set_mempolicy(self.m, self.task, mode, nodes)
        self.k._done()
        return _check("set_mempolicy", r, f"{mode!r}, {nodes!r}", self)

    async def mbind(self, addr: int, length: int, mode: str, nodes=(), flags=()) -> int:
        """mbind(2): the NUMA policy of [addr, addr+length) (modes as set_mempolicy),
        ``flags`` a list of "strict", "move", "move_all" (MPOL_MF_*): 0. KmmError EINVAL
        (bad mode or nodes, unaligned addr), EFAULT (a hole in the range), EIO (strict:
        pages left on other nodes)."""
        from kmm import mempolicy, mempolicy_mbind
        self._alive()
        addr, length = _ulong("mbind", addr, "addr"), _ulong("mbind", length, "length")
        mode = _word("mbind", mode, "mode", tuple(mempolicy.MODES))
        nodes = _nodes("mbind", nodes)
        if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
            raise TypeError("mbind: flags must be a list of str (strict, move, move_all)")
        for f in flags:
            _word("mbind", f, "flag", tuple(mempolicy.FLAGS))
        r = await mempolicy_mbind.do_mbind(self.m, self.task, addr, length, mode, nodes,
                                           list(flags))
        self.k._done()
        return _check("mbind", r, f"{addr:#x}, {length:#x}, {mode!r}, {nodes!r}, "
                      f"{list(flags)!r}", self)

    def numa_maps(self, addr: int, length: int) -> dict:
        """/proc/PID/numa_maps over [addr, addr+length): ``pages`` per node (N<node>=,
        a PMD-mapped THP counting 512) and ``huge`` (PMD-mapped THPs per node), node ids
        as strings."""
        from kmm import task_mmu
        return task_mmu.show_numa_map(self.m, self.task.mm, addr, addr + length)

    async def move_page(self, addr: int) -> str:
        """move_pages(2) of the order-0 page mapped at ``addr``: "moved", "busy" (it could
        not be isolated or migrated) or "absent" (nothing present there)."""
        from kmm import migrate
        self._alive()
        addr = _ulong("move_page", addr, "addr")
        r = await migrate.do_move_page(self.m, self.task, addr)
        self.k._done()
        return r

    async def move_pages(self, pages, nodes=None, move_all: bool = False):
        """move_pages(0, len(pages), pages, nodes, status, flags): with ``nodes`` (one
        node per address) each page's folio moves there, a THP whole (MPOL_MF_MOVE, or
        MPOL_MF_MOVE_ALL with ``move_all``); without, only where each page is. Returns
        (the call's value: 0 or how many pages were not migrated, the status list: a
        node or a negative errno per address). KmmError ENODEV (a node without
        memory), EINVAL (bad flags)."""
        from kmm import migrate_syscalls as ms
        self._alive()
        pages = [_ulong("move_pages", a, "pages[]") for a in pages]
        if nodes is not None:
            for n in nodes:  # int nodes[]: a negative node is the kernel's -ENODEV
                _ulong("move_pages", n, "nodes[]")
            nodes = list(nodes)
            if len(nodes) != len(pages):
                raise ValueError("move_pages: nodes must have one node per page")
        flags = ms.MPOL_MF_MOVE_ALL if move_all else ms.MPOL_MF_MOVE
        r, status = await ms.kernel_move_pages(self.m, self.task, pages, nodes, flags)
        self.k._done()
        _check("move_pages", _errname(r), f"{len(pages)} pages", self)
        return r, status

    async def migrate_pages(self, old_nodes, new_nodes) -> int:
        """migrate_pages(0, maxnode, old_nodes, new_nodes): every folio of the process
        on an old node moves to the new node at the same position; returns how many
        were not migrated. KmmError EINVAL (no new node has memory)."""
        from kmm import migrate_syscalls as ms
        self._alive()
        old = [_ulong("migrate_pages", n, "old_nodes[]") for n in old_nodes]
        new = [_ulong("migrate_pages", n, "new_nodes[]") for n in new_nodes]
        r = await ms.kernel_migrate_pages(self.m, self.task, old, new)
        self.k._done()
        return _check("migrate_pages", _errname(r), f"{old}, {new}", self)

    async def split_huge_page(self, addr: int, length: int = 1 << 21) -> int:
        """Split every THP mapped in [addr, addr+length) to 4 KiB pages, as writing
        "pid,addr,end" to /sys/kernel/debug/split_huge_pages does; returns how many."""
        self._alive()
        addr = _ulong("split_huge_page", addr, "addr")
        length = _ulong("split_huge_page", length, "length")
        r = await huge_memory_split.split_huge_pages_pid(self.m, self.task, addr, addr + length)
        self.k._done()
        return r

    def _zapped(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) MADV_DONTNEED empties: all of it, but in hugetlb
        VMAs up to the last huge page boundary."""
        out, at = [], start
        for v in self.task.mm.vmas:
            if v.hugetlb_file is None or v.end <= start or v.start >= end:
                continue
            s, e = max(start, v.start), min(end, v.end)
            out.append((at, s))
            out.append((s, e & ~(v.hugetlb_file.hstate.size - 1)))
            at = e
        out.append((at, end))
        return [(lo, hi) for lo, hi in out if hi > lo]

    def _forget(self, addr: int, length: int) -> None:
        end = addr + length
        unknown = self.k.unknown.get(self.name)
        if unknown:
            unknown.difference_update([a for a in unknown if addr <= a < end])
        for sh in (self.k.shadow[self.name], self.k.lazy[self.name]):
            if len(sh) < length:
                for a in [a for a in sh if addr <= a < end]:
                    del sh[a]
            else:
                for a in range(addr, end):
                    sh.pop(a, None)

    def _wrote(self, addr: int, n: int) -> None:
        """Bookkeeping of a write of n bytes at addr beyond the shadow: forks of this
        process under way learn of it; a byte of unknown value is known again."""
        k = self.k
        for racing in k.forking.get(self.name, ()):
            racing.update(range(addr, addr + n))
        unknown = k.unknown.get(self.name)
        if unknown:
            unknown.difference_update(range(addr, addr + n))

    async def fork(self, child: str) -> "Proc":
        """fork(): the child process, named ``child`` (a new name), sharing every page
        copy-on-write. ``OutOfMemory`` when the kernel cannot copy the address space."""
        self._alive()
        if not isinstance(child, str) or not child:
            raise TypeError(f"fork: child must be a process name (str), not {child!r}")
        if child in self.m.tasks and self.m.tasks[child].alive:
            raise ValueError(f"fork: child {child!r} names a live process")
        k = self.k
        racing: set[int] = set()
        k.forking.setdefault(self.name, []).append(racing)
        try:
            t = await fork.copy_process(self.m, self.task, child)
        finally:
            forks = k.forking[self.name]
            forks.remove(racing)
            if not forks:
                del k.forking[self.name]
        if isinstance(t, str):
            raise fault.OutOfMemory(f"fork: {t}")
        k.shadow[child] = _inherited(self.m, self.task, k.shadow[self.name])
        k.lazy[child] = dict(k.lazy[self.name])
        unknown = racing | k.unknown.get(self.name, set())
        if unknown:
            k.unknown[child] = unknown
        k._done()
        return Proc(k, t, self.cpu)

    def status(self) -> dict[str, int]:
        """/proc/PID/status's VmPTE (kB): the process's page tables (mm_pgtables_bytes),
        a PMD table it shares with other processes included."""
        return {"VmPTE": self.task.mm.pgtables_bytes >> 10}

    async def exit(self) -> None:
        """exit(): the process's address space is torn down."""
        self._alive()
        await fork.do_exit(self.m, self.task)
        self.k.shadow.pop(self.name, None)
        self.k.lazy.pop(self.name, None)
        self.k.unknown.pop(self.name, None)
        self.k._done()

    async def _kill(self, sig: str) -> None:
        self.task.signal = sig
        await self.exit()

    async def store(self, addr: int, data: bytes) -> None:
        """Write bytes (each page's part is one CPU store). SIGSEGV kills the process."""
        self._alive()
        addr = _ulong("store", addr, "addr")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"store: data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        sh = self.k.shadow[self.name]
        i = 0
        try:
            while i < len(data):
                a = addr + i
                chunk = data[i:i + PAGE_SIZE - (a & (PAGE_SIZE - 1))]
                try:
                    await fault.user_access(self.m, self.task, self.cpu, a, True, chunk)
                except fault.OutOfMemory:
                    await oom_kill.out_of_memory(self.m, self.task)  # then retry
                    continue
                lazy = self.k.lazy[self.name]
                shared = self._shared_offset(a) if self.m.__dict__.get("shmem") else None
                for j, b in enumerate(chunk):
                    if shared is not None:
                        self.k.file_shadow[(shared[0], shared[1] + j)] = b
                        continue
                    sh[a + j] = b
                    lazy.pop(a + j, None)
                self._wrote(a, len(chunk))
                i += len(chunk)
        except (fault.Segv, fault.Sigbus) as e:
            await self._kill(e.signal)
            raise
        self.k._done()

    async def load(self, addr: int, n: int = 1) -> bytes:
        """Read ``n`` bytes at ``addr``. SIGSEGV kills the process."""
        self._alive()
        addr, n = _ulong("load", addr, "addr"), _ulong("load", n, "n")
        out = bytearray()
        try:
            while len(out) < n:
                a = addr + len(out)
                k = min(n - len(out), PAGE_SIZE - (a & (PAGE_SIZE - 1)))
                try:
                    out += await fault.user_access(self.m, self.task, self.cpu, a, False, n=k)
                except fault.OutOfMemory:
                    await oom_kill.out_of_memory(self.m, self.task)  # then retry
        except (fault.Segv, fault.Sigbus) as e:
            await self._kill(e.signal)
            raise
        self.k._done()
        return bytes(out)

    async def touch(self, addr: int, length: int, write: bool = True, value: int = 1,
                    stride: int = PAGE_SIZE) -> int:
        """One access per stride in [addr, addr+length): a byte ``value`` written, or a
        byte read. Returns how many read bytes differed from ``value`` (reads only).
        SIGSEGV kills the process; a fault without memory runs the OOM killer."""
        self._alive()
        addr, length = _ulong("touch", addr, "addr"), _ulong("touch", length, "length")
        stride = _ulong("touch", stride, "stride")
        if stride == 0:
            raise ValueError("touch: stride must be above 0")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ValueError(f"touch: value must be a byte (0..255), not {value!r}")
        sh = self.k.shadow[self.name]
        lazy = self.k.lazy[self.name]
        data = bytes([value])
        mismatches = 0
        m, task, cpu = self.m, self.task, self.cpu
        files = bool(m.__dict__.get("shmem"))
        forking, unknown = self.k.forking, self.k.unknown  # checked per write: a fork
        # may start on another CPU halfway through
        end = addr + length
        a = addr
        try:
            while True:
                try:
                    if write and m.sched.mode is FREE and not files:  # (shared files: the
                        # slow path below keeps their bytes in file_shadow)
                        # the stores that hit the TLB need no coroutine each
                        # (fault.store_run); a miss takes the whole access path
                        while a < end:
                            a0 = a
                            a = fault.store_run(m, task, cpu, a, end, stride, data, sh, lazy)
                            if forking or unknown:
                                for x in range(a0, a, stride):
                                    self._wrote(x, 1)
                            if a < end:
                                await fault.user_access(m, task, cpu, a, True, data)
                                sh[a] = value
                                if lazy:
                                    lazy.pop(a, None)
                                if forking or unknown:
                                    self._wrote(a, 1)
                                a += stride
                        self.k._done()
                        return 0
                    for a in range(a, end, stride):
                        if write:
                            await fault.user_access(m, task, cpu, a, True, data)
                            if files:
                                shared = self._shared_offset(a)
                                if shared is not None:
                                    self.k.file_shadow[shared] = value
                                    continue
                            sh[a] = value
                            if lazy:
                                lazy.pop(a, None)
                            if forking or unknown:
                                self._wrote(a, 1)
                        else:
                            got = await fault.user_access(m, task, cpu, a, False, n=1)
                            mismatches += got[0] != value
                    break
                except fault.OutOfMemory:  # the OOM killer, then the access again
                    await oom_kill.out_of_memory(m, task)
        except (fault.Segv, fault.Sigbus) as e:
            await self._kill(e.signal)
            raise
        self.k._done()
        return mismatches

    async def verify(self) -> list[int]:
        """Addresses whose byte does not read back as last written (should be empty)."""
        bad = []
        hook, self.k.after_op = self.k.after_op, None  # reads change nothing to check
        try:
            unknown = self.k.unknown.get(self.name, ())
            for a, b in sorted(self.k.shadow[self.name].items()):
                if a in unknown:
                    continue
                if (await self.load(a))[0] != b:
                    bad.append(a)
            for a, b in sorted(self.k.lazy[self.name].items()):
                if (await self.load(a))[0] not in (b, 0):
                    bad.append(a)
        finally:
            self.k.after_op = hook
        self.k._done()
        return bad
