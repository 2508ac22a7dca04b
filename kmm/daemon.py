"""The public daemon API: what a policy daemon (kswapd, kcompactd, khugepaged, a user's
plug-in) may see and do.

A daemon is a class with ``name`` and an ``async def run(self, ctx)``; ``ctx`` is a
``DaemonContext``. The mechanism it drives (reclaim a node, compact a zone, scan a PMD)
lives in kmm's kernel modules; the daemon chooses when and how much, sleeping in
emulated time and waking on the kernel's waitqueues (``kswapd_wait``, ...), as the
kernel's kthreads do. Daemons import only this module and the standard library.

Waitqueues: mechanism code calls ``wake_up(m, name)`` (e.g. the page allocator's
``wakeup_kswapd``); a daemon waits with ``ctx.wait(name, timeout_ns)``.

The wire contract: every public DaemonContext method takes and returns msgpack-able
plain data only (None, bool, int, float, str, bytes, lists, dicts with str keys, or a
frozen dataclass of such fields, sent as a dict), so a daemon may run in a child
process. Processes are named by pid, VMAs and PMDs by address, pages by pfn; no kmm
object ever reaches a daemon. Calls that are coroutines are preemption points (or
contain some); plain calls are snapshots taken between two points. docs/daemon-api.md
lists every call with its kernel counterpart.
"""

from __future__ import annotations

from kmm import atomic, mmzone, page_idle, wait
from kmm.page_idle import PmdView
import functools

from dataclasses import dataclass
from typing import ClassVar, Protocol

__all__ = ["Daemon", "DaemonContext", "DaemonLoadError", "FolioView", "PmdView", "ZoneState",
           "VM_HUGEPAGE", "VM_NOHUGEPAGE", "HPAGE_PMD_SIZE", "HPAGE_PMD_NR",
           "load_daemons", "load_daemon_spec", "describe_daemons", "start_daemon", "wake_up"]

# The constants a daemon needs to read the views (include/linux/mm.h, pgtable); a daemon
# without kmm copies them from docs/daemon-api.md.
VM_HUGEPAGE = 1 << 29
VM_NOHUGEPAGE = 1 << 30
HPAGE_PMD_SIZE = 2 << 20
HPAGE_PMD_NR = 512


class Daemon(Protocol):
    name: ClassVar[str]

    async def run(self, ctx: "DaemonContext") -> None: ...


@dataclass(frozen=True, slots=True)
class ZoneState:
    """The zone as a reclaim policy sees it: free pages and the three watermarks."""

    free: int
    min: int
    low: int
    high: int
    managed: int


@dataclass(frozen=True, slots=True)
class FolioView:
    """struct page and its folio, by pfn: ``head``/``order`` of the folio holding the
    page, the folio's refcount and mapcount (folio_ref_count, folio_mapcount), its PMD
    mappings (entire_mapcount), this page's own PTE mappings (page_mapcount), the page
    flags by name (PG_ without the prefix, from the head), its LRU list ("" when off the
    LRU), the page type ("buddy", "table", "zero" or "") and whether it waits on the
    deferred split queue."""

    pfn: int
    head: int
    order: int
    refcount: int
    mapcount: int
    entire_mapcount: int
    page_mapcount: int
    flags: list
    lru: str
    anon: bool
    page_type: str
    deferred_split: bool


_PAGE_FLAGS = ("head", "lru", "dirty", "referenced", "swapbacked", "anon_exclusive",
               "reserved", "partially_mapped", "uptodate", "active", "swapcache",
               "writeback", "isolated", "unevictable")


# wake_up and the waitqueues are mechanism (kmm.wait); re-exported for daemons' callers
wake_up = wait.wake_up


class DaemonContext:
    """One daemon's handle on the machine (in-process; the same calls go over the wire
    when a daemon runs in its own process)."""

    def __init__(self, m, name: str, nid: int = 0) -> None:
        self._m = m
        self.name = name
        self.nid = nid  # the node of a per-node thread (kswapdN, kcompactdN)

    @property
    def now(self) -> int:
        """Emulated time, in ns."""
        return self._m.sched.now

    async def sleep(self, ns: int) -> None:
        """Sleep in emulated time (schedule_timeout)."""
        await self._m.sched.sleep(ns)

    async def wait(self, queue: str, timeout_ns: int | None = None) -> bool:
        """wait_event(_timeout) on a named waitqueue: True if woken, False on timeout."""
        if self.nid:  # a per-node thread waits on its own node's waitqueue
            queue = mmzone.node_wq(queue, self.nid)
        return await wait.wait_event(self._m, queue, timeout_ns)

    def knob(self, name: str):
        """A sysfs knob's current value (/sys/kernel/mm/transparent_hugepage/...)."""
        return self._m.sysfs[name]

    def zone(self) -> ZoneState:
        """The zone of the daemon's node (node 0 for a daemon that is not per node)."""
        z = self._m.node_data[self.nid].zone
        return ZoneState(z.nr_free, z.wmark["min"], z.wmark["low"], z.wmark["high"],
                         z.managed)

    # --- reclaim (mm/vmscan.c), for kswapd
    def kswapd_order(self) -> int:
        """READ_ONCE(pgdat->kswapd_order): the highest order wakeup_kswapd asked for."""
        from kmm import vmscan
        return vmscan.NODE_DATA(self._m, self.nid).kswapd_order

    def set_kswapd_order(self, order: int) -> None:
        """WRITE_ONCE(pgdat->kswapd_order, order)."""
        from kmm import vmscan
        vmscan.NODE_DATA(self._m, self.nid).kswapd_order = order

    def prepare_kswapd_sleep(self, order: int) -> bool:
        """prepare_kswapd_sleep: may kswapd sleep? The zone is balanced for ``order``
        (free pages above the high watermark), or the node is hopeless (reclaim failed
        MAX_RECLAIM_RETRIES times in a row)."""
        from kmm import vmscan_node
        return vmscan_node.prepare_kswapd_sleep(self._m, order, self.nid)

    async def balance_pgdat(self, order: int) -> int:
        """balance_pgdat: reclaim, at falling priority, until the zone is balanced for
        ``order``; returns the order reclaim finished at (0 when a high-order goal was
        dropped for fragmentation)."""
        from kmm import vmscan_node
        return await vmscan_node.balance_pgdat(self._m, order, self.nid)

    def count_vm_event(self, item: str) -> None:
        """count_vm_event for the daemon's own events: the kernel's that daemons count
        (kswapd_low_wmark_hit_quickly, ...) or a new name of the daemon's own (lower
        case, digits and '_'), which appears in the report's vm_events once counted."""
        import re
        if not isinstance(item, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", item):
            raise ValueError(f"count_vm_event: {item!r} is not an event name (lower case "
                             "letters, digits and '_')")
        events = self._m.vmstat.events
        if item not in events:
            events[item] = 0
        self._m.vmstat.count_vm_event(item)

    def kcompactd_work_requested(self) -> bool:
        """kcompactd_work_requested: an allocation asked kcompactd for an order
        (wakeup_kcompactd); the request stands until kcompactd_do_work serves it."""
        from kmm import compaction
        return compaction.kcompactd_work_requested(self._m, self.nid)

    async def kcompactd_do_work(self) -> str:
        """kcompactd_do_work: compact the zone (MIGRATE_SYNC_LIGHT) until a free block
        of the requested order exists or the scanners meet, unless compaction is
        deferred or cannot help. Returns the enum compact_result name."""
        from kmm import compaction
        return (await compaction.kcompactd_do_work(self._m, self.nid)).name

    def wakeup_kcompactd(self, order: int) -> None:
        """wakeup_kcompactd: ask kcompactd for a free block of ``order`` (kswapd does
        before it sleeps: reclaim freed pages, compaction makes them a block)."""
        from kmm import compaction
        compaction.wakeup_kcompactd(self._m, order, self.nid)

    # -- khugepaged (mm/khugepaged.c): the mm_slot list, its cursor and the scan
    def hugepage_pmd_enabled(self) -> bool:
        """hugepage_pmd_enabled: PMD THPs may be made; khugepaged runs only then."""
        from kmm import khugepaged
        return khugepaged.hugepage_pmd_enabled(self._m)

    def khugepaged_has_work(self) -> bool:
        """khugepaged_has_work: some mm is registered and THPs are enabled."""
        from kmm import khugepaged
        return khugepaged.khugepaged_has_work(self._m)

    def khugepaged_scan_at_head(self) -> bool:
        """The scan cursor is NULL: the next mm scanned is the list's first, and a pass
        over the list is complete (khugepaged_do_scan counts these)."""
        return self._m.khugepaged_scan.mm_slot is None

    async def khugepaged_scan_mm_slot(self, pages: int) -> list:
        """khugepaged_scan_mm_slot: scan the cursor's mm for up to ``pages`` of
        progress (each PMD is HPAGE_PMD_NR, each passed-over VMA 1), collapsing what
        may collapse with khugepaged's limits. Returns (progress, the last SCAN_*
        result's name); finishing the last mm counts a full scan."""
        from kmm import khugepaged
        cc = khugepaged.CollapseControl(is_khugepaged=True)
        progress, result = await khugepaged.khugepaged_scan_mm_slot(self._m, pages, cc)
        return [progress, result.name]  # a list: what arrives over the wire

    @property
    def khugepaged_sleep_expire(self) -> int:
        """khugepaged_sleep_expire (emulated ns): a scan_sleep_millisecs or
        alloc_sleep_millisecs write resets it to 0 and wakes khugepaged_wait."""
        return self._m.khugepaged_scan.sleep_expire

    @khugepaged_sleep_expire.setter
    def khugepaged_sleep_expire(self, ns: int) -> None:
        self._m.khugepaged_scan.sleep_expire = ns


    # -- observe: counters, processes, page tables, struct pages, TLBs
    def vmstat(self) -> dict:
        """/proc/vmstat: every event the machine counts and the node stats
        (nr_anon_pages, nr_anon_transparent_hugepages, ...), by name."""
        v = self._m.vmstat
        return {**v.node, **v.events}

    def mm_list(self) -> list:
        """The live processes, by pid: ``{"pid", "name", "mm_id", "khugepaged" (the mm
        is on khugepaged's mm_slot list), "vmas": [{"start", "end", "flags" (vm_flags:
        VM_HUGEPAGE, VM_NOHUGEPAGE, ...), "thp" (thp_vma_allowable_order for
        khugepaged: the sysfs mode lets this VMA collapse)}]}``."""
        from kmm import huge_memory
        m = self._m
        out = []
        for t in sorted(m.tasks.values(), key=lambda t: t.pid):
            if not t.alive:
                continue
            out.append({"pid": t.pid, "name": t.name, "mm_id": t.mm.id,
                        "khugepaged": t.mm.khugepaged_slot is not None,
                        "vmas": [{"start": v.start, "end": v.end, "flags": v.flags,
                                  "thp": huge_memory.thp_vma_allowable_order(m, v, "khugepaged")}
                                 for v in t.mm.vmas]})
        return out

    def _mm(self, pid: int):
        for t in self._m.tasks.values():
            if t.pid == pid and t.alive:
                return t.mm
        return None

    def page_table(self, pid: int, start: int, end: int, ptes: bool = False) -> list[PmdView]:
        """walk_page_range's view of [start, end) in pid's address space: one PmdView
        per 2 MiB block the range touches (``ptes``: with every PTE). A snapshot taken
        between two points, as a lockless walk (pmdp_get_lockless, ptep_get_lockless)
        reads it; [] for a pid that has exited."""
        mm = self._mm(pid)
        if mm is None:
            return []
        return page_idle.page_table_view(self._m, mm, start, end, ptes)

    def folio(self, pfn: int) -> FolioView | None:
        """struct page / folio of ``pfn`` (page_folio): None outside memory."""
        from kmm import mm_types, rmap, swap
        m = self._m
        if not 0 <= pfn < m.physmem.nr_pages:
            return None
        page = m.physmem.page(pfn)
        f = m.physmem.folio(pfn)
        flags = [n for n in _PAGE_FLAGS if f.flags & getattr(mm_types, "PG_" + n)]
        return FolioView(pfn, f.pfn, f.order, f.refcount, rmap.folio_mapcount(f),
                         f.entire_mapcount, page.mapcount, flags,
                         swap.folio_lru_list(f) if f.flags & mm_types.PG_lru else "",
                         f.anon_vma is not None, f.page_type, f.on_deferred_list)

    def tlb_misses(self) -> list:
        """dTLB misses (hardware page walks) per CPU since boot."""
        return list(self._m.tlb_stats)

    async def clear_young(self, pid: int, start: int, end: int, flush: bool = False) -> list:
        """Test and clear the accessed bits of [start, end) in pid's address space, as
        the page-idle and reclaim walkers do (kmm.page_idle.clear_young, which documents
        the TLB caveat and the locking). Returns ``[addr, young]`` per 2 MiB block that
        has a table or a huge PMD: PTEs found young, or 512 for a young huge PMD; []
        for a pid that has exited."""
        mm = self._mm(pid)
        if mm is None:
            return []
        return await page_idle.clear_young(self._m, mm, start, end, flush)

    # -- act: collapse, split, reclaim
    async def collapse(self, pid: int, addr: int, mode: str = "khugepaged") -> str:
        """Collapse the 2 MiB block holding ``addr`` into a THP: hugepage_vma_revalidate,
        hpage_collapse_scan_pmd and collapse_huge_page, with collapse_control as
        khugepaged sets it (``mode="khugepaged"``: the max_ptes_* limits and the young
        rule apply, the sysfs mode must allow the VMA) or as MADV_COLLAPSE does
        (``"madvise"``: none of them). Returns the SCAN_* name (SCAN_SUCCEED, or
        SCAN_PMD_MAPPED when it is a THP already; SCAN_ANY_PROCESS for a pid that has
        exited). Context: takes the mmap lock for read (the collapse retakes it for
        write), the PTE lock, the folio locks; allocates the huge page."""
        from kmm import khugepaged
        from kmm.pgtable import HPAGE_PMD_MASK
        if mode not in ("khugepaged", "madvise"):
            raise ValueError(f"collapse mode must be khugepaged or madvise, not {mode!r}")
        mm = self._mm(pid)
        if mm is None:
            return "SCAN_ANY_PROCESS"
        cc = khugepaged.CollapseControl(is_khugepaged=mode == "khugepaged")
        haddr = addr & HPAGE_PMD_MASK
        await mm.mmap_lock.down_read("collapse")
        locked = True
        try:
            result, vma = khugepaged.hugepage_vma_revalidate(self._m, mm, haddr, False, cc)
            if result == khugepaged.ScanResult.SCAN_SUCCEED:
                result, locked = await khugepaged.hpage_collapse_scan_pmd(
                    self._m, mm, vma, haddr, cc)
        finally:
            if locked:
                await mm.mmap_lock.up_read()
        return result.name

    async def split_huge_pmd(self, pid: int, addr: int) -> bool:
        """split_huge_pmd: map the THP at ``addr`` with a PTE table instead of its huge
        PMD (the folio stays whole; thp_split_pmd counts). True if a huge PMD was there.
        Context: takes the mmap lock for read, then the PMD lock."""
        from kmm import huge_memory, memory
        from kmm.pgtable import is_pmd_migration_entry, pmd_index, pmd_trans_huge
        m = self._m
        mm = self._mm(pid)
        if mm is None:
            return False
        await mm.mmap_lock.down_read("split_huge_pmd")
        try:
            vma = mm.vma_lookup(addr)
            pmd_tbl = memory.pmd_lookup(m, mm, addr) if vma is not None else -1
            if pmd_tbl < 0:
                return False
            pmd = await atomic.entry_read(m, "pmd", pmd_tbl, pmd_index(addr))
            if not (pmd_trans_huge(pmd) or is_pmd_migration_entry(pmd)):
                return False
            await huge_memory.split_huge_pmd_address(m, vma, addr, False)
            return True
        finally:
            await mm.mmap_lock.up_read()

    async def split_huge_page(self, pid: int, addr: int) -> int:
        """split_huge_page on the THP mapped in the 2 MiB block of ``addr``, as the
        debugfs split_huge_pages file does (its PMD is split first; thp_split_page
        counts). Returns how many folios were split (0: none there, or it was pinned or
        locked). Context: the mmap lock for read, the folio lock, the anon_vma lock."""
        from kmm import huge_memory_split
        from kmm.pgtable import HPAGE_PMD_MASK, HPAGE_PMD_SIZE as SIZE
        m = self._m
        task = next((t for t in m.tasks.values() if t.pid == pid and t.alive), None)
        if task is None:
            return 0
        haddr = addr & HPAGE_PMD_MASK
        return await huge_memory_split.split_huge_pages_pid(m, task, haddr, haddr + SIZE)

    async def try_to_free_pages(self, order: int = 0) -> int:
        """try_to_free_pages: one round of direct reclaim (GFP_KERNEL) for an allocation
        of ``order``; returns the pages reclaimed."""
        from kmm import vmscan_node
        return await vmscan_node.try_to_free_pages(self._m, order, "GFP_KERNEL")


def start_daemon(m, daemon: Daemon, nid: int = 0) -> None:
    """Run a daemon as a daemon actor of the machine (the run ends without it). A
    per-node thread (kswapd, kcompactd) of node ``nid`` > 0 is named with the node
    (kswapd1) and runs in-process, on its node."""
    from kmm.runtime import remote  # kmm run --spawn: its code runs in a child process
    name = f"{daemon.name}{nid}" if nid else daemon.name
    ctx = DaemonContext(m, name, nid)
    run = (remote.daemon_runner(m, daemon) if not nid else None) or daemon.run
    if nid:
        m.actor_node[name] = nid
    m.sched.spawn(m.sched.nursery, name, run, ctx, kind="daemon",
                  daemon=True)


ENTRY_POINT_GROUP = "kmm.daemons"
# the kernel's per-node threads: a machine of N nodes runs one per node (kmm.mmzone)
PER_NODE_DAEMONS = ("kswapd", "kcompactd")


class DaemonLoadError(Exception):
    """A daemon plug-in that cannot be used; the message names it and its source."""


def _validated(cls, label: str):
    """The checks every plug-in passes on load, whichever door it came through."""
    if not isinstance(getattr(cls, "name", None), str) or not callable(getattr(cls, "run", None)):
        raise DaemonLoadError(f"daemon {label}: needs a str `name` and an "
                              "`async def run(self, ctx)`")
    return cls


def load_daemons(names=None) -> list:
    """The daemon classes installed under the ``kmm.daemons`` entry-point group (the
    built-in kswapd, kcompactd and khugepaged come through the same door as
    third-party plug-ins), validated on load. ``names`` selects some; unknown names are
    an error."""
    found = _installed()
    wanted = sorted(found) if names is None else list(names)
    return [_loaded(name) for name in wanted]


@functools.cache
def _loaded(name: str) -> type:
    """One installed daemon class, loaded and validated once per process (its label
    reads the distribution's metadata, which costs more than a short run)."""
    found = _installed()
    ep = found.get(name)
    if ep is None:
        raise DaemonLoadError(f"no daemon named {name!r} in entry-point group "
                              f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(sorted(found))})")
    label = f"{name!r} ({ep.value}, from {getattr(ep.dist, 'name', '?')})"
    try:
        cls = ep.load()
    except Exception as e:  # a broken plug-in is reported, not raised through
        raise DaemonLoadError(f"daemon {label}: cannot load: {e}") from None
    return _validated(cls, label)


@functools.cache
def _installed() -> dict:
    """The group's entry points by name, read once per process: every run starts the
    default daemons, and reading the installed distributions costs more than a short
    run (the explorer runs thousands)."""
    from importlib.metadata import entry_points
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_daemon_spec(spec: str):
    """A daemon class named ``module:Class`` (``kmm run --daemon``), validated as an
    entry-point plug-in is."""
    import importlib
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DaemonLoadError(f"daemon {spec!r}: expected module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise DaemonLoadError(f"daemon {spec!r}: cannot load: {e}") from None
    return _validated(cls, repr(spec))


def describe_daemons() -> list[dict]:
    """What ``kmm daemons`` lists: each installed daemon's name, where it comes from
    and its knobs with their defaults."""
    from dataclasses import fields, is_dataclass
    from importlib.metadata import entry_points
    rows = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        row = {"name": ep.name, "class": ep.value,
               "distribution": getattr(ep.dist, "name", "?"), "knobs": {}}
        try:
            cls = _validated(ep.load(), repr(ep.name))
            knobs = getattr(cls, "Knobs", None)
            if knobs is not None and is_dataclass(knobs):
                row["knobs"] = {f.name: f.default for f in fields(knobs)}
        except Exception as e:
            row["error"] = str(e)
        rows.append(row)
    return rows
