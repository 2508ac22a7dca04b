"""khugepaged and MADV_COLLAPSE, the mechanism: mm/khugepaged.c (anonymous memory).

The mm_slot list and its cursor (``KhugepagedScan``), registration
(``khugepaged_enter_vma``, ``khugepaged_fork``, ``khugepaged_exit``), the scan of one mm
(``khugepaged_scan_mm_slot``) and of one PMD (``hpage_collapse_scan_pmd``), and
``madvise_collapse``. The collapse itself is in khugepaged_collapse.py. One mechanism
serves two policies through ``CollapseControl``: khugepaged (``is_khugepaged``: the
max_ptes_* limits and the young-page rule apply) and MADV_COLLAPSE (they do not). The
daemon loop, its budget and its sleeps are policy, in daemons/khugepaged.py.

Outcomes are ``ScanResult`` values (6.18's enum scan_result, which has no SCAN_PAGE_RO:
6.18 collapses read-only ranges too); the four tracepoints of
include/trace/events/huge_memory.h are emitted with the kernel's names and fields, and
kept in ``KhugepagedScan.log``. Shmem collapse (the page-cache side) is in
khugepaged_file.py. Left out: userfaultfd, memcg charging, KSM, per-VMA locks.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field

from kmm import atomic, huge_memory, mmdebug, mmzone, wait
from kmm.mm_types import PG_lru, PG_referenced
from kmm.pgtable import (
    HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_SIZE, PMD_SHIFT, is_swap_pte,
    pmd_index, pmd_none, pmd_present, pmd_trans_huge, pte_none, pte_pfn, pte_special,
    pte_young,
)

WAITQUEUE = "khugepaged_wait"  # DECLARE_WAIT_QUEUE_HEAD(khugepaged_wait)


class ScanResult(enum.IntEnum):
    """enum scan_result (mm/khugepaged.c, 6.18: the values the host's tracepoint
    format lists, without SCAN_PAGE_RO)."""

    SCAN_FAIL = 0
    SCAN_SUCCEED = 1
    SCAN_PMD_NULL = 2
    SCAN_PMD_NONE = 3
    SCAN_PMD_MAPPED = 4
    SCAN_EXCEED_NONE_PTE = 5
    SCAN_EXCEED_SWAP_PTE = 6
    SCAN_EXCEED_SHARED_PTE = 7
    SCAN_PTE_NON_PRESENT = 8
    SCAN_PTE_UFFD_WP = 9
    SCAN_PTE_MAPPED_HUGEPAGE = 10
    SCAN_LACK_REFERENCED_PAGE = 11
    SCAN_PAGE_NULL = 12
    SCAN_SCAN_ABORT = 13
    SCAN_PAGE_COUNT = 14
    SCAN_PAGE_LRU = 15
    SCAN_PAGE_LOCK = 16
    SCAN_PAGE_ANON = 17
    SCAN_PAGE_COMPOUND = 18
    SCAN_ANY_PROCESS = 19
    SCAN_VMA_NULL = 20
    SCAN_VMA_CHECK = 21
    SCAN_ADDRESS_RANGE = 22
    SCAN_DEL_PAGE_LRU = 23
    SCAN_ALLOC_HUGE_PAGE_FAIL = 24
    SCAN_CGROUP_CHARGE_FAIL = 25
    SCAN_TRUNCATED = 26
    SCAN_PAGE_HAS_PRIVATE = 27
    SCAN_STORE_FAILED = 28
    SCAN_COPY_MC = 29
    SCAN_PAGE_FILLED = 30

    @property
    def status(self) -> str:
        """The word the tracepoints print for it (SCAN_STATUS in huge_memory.h)."""
        return _STATUS[self]


_STATUS = dict(zip(ScanResult, (
    "failed", "succeeded", "pmd_null", "pmd_none", "page_pmd_mapped", "exceed_none_pte",
    "exceed_swap_pte", "exceed_shared_pte", "pte_non_present", "pte_uffd_wp",
    "pte_mapped_hugepage", "lack_referenced_page", "page_null", "scan_aborted",
    "not_suitable_page_count", "page_not_in_lru", "page_locked", "page_not_anon",
    "page_compound", "no_process_for_page", "vma_null", "vma_check_failed",
    "not_suitable_address_range", "could_not_delete_page_from_lru",
    "alloc_huge_page_failed", "ccgroup_charge_failed", "truncated", "page_has_private",
    "store_failed", "copy_poisoned_page", "page_filled")))

R = ScanResult


@dataclass(slots=True)
class CollapseControl:
    """struct collapse_control: who is collapsing. khugepaged enforces the max_ptes_*
    limits and wants young pages; MADV_COLLAPSE does neither."""

    is_khugepaged: bool
    # hpage_collapse_scan_pmd's tally of the scanned pages' nodes (cc->node_load) and
    # the nodes the collapse may allocate on (cc->alloc_nmask)
    node_load: dict = field(default_factory=dict)
    alloc_nmask: set = field(default_factory=set)


class MmSlot:
    """struct khugepaged_mm_slot: one registered mm (holding an mmgrab reference)."""

    __slots__ = ("mm",)

    def __init__(self, mm) -> None:
        self.mm = mm

    def __repr__(self) -> str:
        return f"<mm_slot {self.mm.owner}>"


class KhugepagedScan:
    """struct khugepaged_scan (the list and the cursor) with khugepaged's other globals:
    the sysfs counters, khugepaged_sleep_expire, and khugepaged_mm_lock."""

    def __init__(self, locks) -> None:
        self.mm_head: list[MmSlot] = []     # khugepaged_scan.mm_head, in list order
        self.mm_slot: MmSlot | None = None  # the cursor: NULL between full scans
        self.address = 0
        self.full_scans = 0                 # khugepaged/full_scans
        self.pages_collapsed = 0            # khugepaged/pages_collapsed
        self.sleep_expire = 0               # khugepaged_sleep_expire, emulated ns
        self.lock = locks.spinlock("khugepaged_mm_lock", "khugepaged_mm_lock")
        # emulator statistics (the kernel keeps none): the last tracepoints (event name,
        # fields), and the emulated time spent in khugepaged_scan_mm_slot
        self.log: deque[tuple[str, dict]] = deque(maxlen=4096)
        self.scan_ns = 0
        self.results: Counter = Counter()  # (who, SCAN_* name) -> PMD scans that ended so


# ------------------------------------------------------------------ set-up
def khugepaged_init(m) -> None:
    """khugepaged_init plus the sysfs store handlers that wake the thread:
    scan_sleep_millisecs and alloc_sleep_millisecs reset khugepaged_sleep_expire and
    wake it; a write to ``enabled`` (start_stop_khugepaged) wakes it if the list is
    not empty. full_scans and pages_collapsed are read-only files."""
    m.khugepaged_scan = scan = KhugepagedScan(m.locks)

    def sleep_store(_value) -> None:
        scan.sleep_expire = 0
        _wake_up(m)

    def enabled_store(_value) -> None:
        if scan.mm_head:
            _wake_up(m)

    m.sysfs.on_store("khugepaged/scan_sleep_millisecs", sleep_store)
    m.sysfs.on_store("khugepaged/alloc_sleep_millisecs", sleep_store)
    m.sysfs.on_store("enabled", enabled_store)
    m.sysfs.on_store("hugepages-2048kB/enabled", enabled_store)  # start_stop_khugepaged
    m.sysfs.readonly["khugepaged/full_scans"] = lambda: scan.full_scans
    m.sysfs.readonly["khugepaged/pages_collapsed"] = lambda: scan.pages_collapsed


def _wake_up(m) -> None:
    wait.wake_up(m, WAITQUEUE)  # wake_up_interruptible(&khugepaged_wait)


def khugepaged_report(m) -> dict | None:
    """The report's ``khugepaged`` extension: the sysfs counters and how each PMD scan
    ended, by who scanned (None when neither khugepaged nor MADV_COLLAPSE did anything)."""
    scan = m.khugepaged_scan
    if not scan.results and not scan.full_scans:
        return None
    by: dict[str, dict[str, int]] = {}
    for (who, name), n in sorted(scan.results.items()):
        by.setdefault(who, {})[name] = n
    return {"full_scans": scan.full_scans, "pages_collapsed": scan.pages_collapsed,
            "scan_results": by}


async def trace_event(m, name: str, **fields) -> None:
    """A tracepoint: one trace event with the kernel's name and fields, kept in the log."""
    m.khugepaged_scan.log.append((name, fields))
    await m.sched.point(name, 0, **fields)


# ------------------------------------------------------------ registration
def hugepage_pmd_enabled(m) -> bool:
    """hugepage_pmd_enabled: PMD-size anon THPs may be made (hugepages-2048kB/enabled
    always or madvise, or inherit with the global ``enabled`` not never), or PMD-size
    shmem THPs may; the khugepaged thread runs iff this holds."""
    s = m.sysfs
    bit = 1 << 9
    if (s.anon_orders_always & bit or s.anon_orders_madvise & bit
            or (s.anon_orders_inherit & bit and s.enabled != "never")):
        return True
    from kmm import shmem
    return shmem.shmem_hpage_pmd_enabled(m)


def khugepaged_enter_vma(m, vma) -> None:
    """khugepaged_enter_vma: register the mm once a VMA of it may collapse
    (thp_vma_allowable_order with TVA_KHUGEPAGED: sysfs allows it and the VMA has an
    anon_vma and an aligned 2 MiB block)."""
    mm = vma.mm
    if "MMF_VM_HUGEPAGE" in mm.flags or not hugepage_pmd_enabled(m):
        return
    if huge_memory.thp_vma_allowable_order(m, vma, "khugepaged"):
        __khugepaged_enter(m, mm)


def __khugepaged_enter(m, mm) -> None:
    """__khugepaged_enter: a slot at the list tail, just behind the cursor "to let the
    area settle"; wake khugepaged if the list was empty. Runs between two points, so
    the list changes atomically (the kernel takes khugepaged_mm_lock)."""
    if "MMF_VM_HUGEPAGE" in mm.flags:  # test_and_set_bit
        return
    mm.flags.add("MMF_VM_HUGEPAGE")
    scan = m.khugepaged_scan
    wakeup = not scan.mm_head
    slot = mm.khugepaged_slot = MmSlot(mm)
    scan.mm_head.append(slot)
    if wakeup:
        _wake_up(m)


def khugepaged_fork(m, mm, oldmm) -> None:
    """khugepaged_fork: the child of a registered mm is registered too."""
    if "MMF_VM_HUGEPAGE" in oldmm.flags:
        __khugepaged_enter(m, mm)


async def khugepaged_exit(m, mm) -> None:
    """__khugepaged_exit: drop the slot, unless khugepaged's cursor is on it: then take
    and drop the mmap write lock, so khugepaged is done with the page tables, and leave
    the slot for it to free (collect_mm_slot). Context: mm_users is 0."""
    slot = mm.khugepaged_slot
    if slot is None:
        return
    scan = m.khugepaged_scan
    await scan.lock.lock("__khugepaged_exit")
    free = scan.mm_slot is not slot
    if free:
        scan.mm_head.remove(slot)
    await scan.lock.unlock()
    if free:
        mm.flags.discard("MMF_VM_HUGEPAGE")
        mm.khugepaged_slot = None
    else:
        await mm.mmap_lock.down_write("__khugepaged_exit")
        await mm.mmap_lock.up_write()


def hpage_collapse_test_exit(mm) -> bool:
    return mm.users == 0


def collect_mm_slot(m, slot: MmSlot) -> None:
    """collect_mm_slot: free the slot of an mm that has exited. Context:
    khugepaged_mm_lock held."""
    if hpage_collapse_test_exit(slot.mm):
        m.khugepaged_scan.mm_head.remove(slot)
        slot.mm.khugepaged_slot = None


def khugepaged_has_work(m) -> bool:
    return bool(m.khugepaged_scan.mm_head) and hugepage_pmd_enabled(m)


# ------------------------------------------------------------ the mm scan
async def khugepaged_scan_mm_slot(m, pages: int, cc: CollapseControl) -> tuple[int, ScanResult]:
    """khugepaged_scan_mm_slot: scan the cursor's mm (the first one when the cursor is
    NULL) from the cursor address, PMD by PMD, until ``pages`` of progress are spent or
    a collapse attempt dropped the mmap lock (the next call resumes there). An mm whose
    lock is contended is passed over (mmap_read_trylock). Finishing the last mm sets the
    cursor to NULL and counts a full scan. Returns (progress, last result); each
    ineligible VMA costs 1, each PMD HPAGE_PMD_NR; SCAN_SUCCEED counts pages_collapsed.

    Context: takes khugepaged_mm_lock around the cursor, the mmap lock for read.
    """
    scan = m.khugepaged_scan
    t0 = m.sched.now
    try:
        return await _scan_mm_slot(m, scan, pages, cc)
    finally:
        scan.scan_ns += m.sched.now - t0


async def _scan_mm_slot(m, scan: KhugepagedScan, pages: int, cc) -> tuple[int, ScanResult]:
    result = R.SCAN_FAIL
    progress = 0
    await scan.lock.lock("khugepaged_scan_mm_slot")
    if scan.mm_slot is None:
        if not scan.mm_head:  # the last mm left since the caller saw work
            await scan.lock.unlock()
            return progress, result
        scan.mm_slot = scan.mm_head[0]
        scan.address = 0
    slot = scan.mm_slot
    await scan.lock.unlock()
    mm = slot.mm
    vma = None
    if await mm.mmap_lock.down_read_trylock("khugepaged_scan_mm_slot"):
        progress += 1
        vma, progress, result = await _scan_vmas(m, mm, pages, progress, cc)
    await scan.lock.lock("khugepaged_scan_mm_slot")
    if scan.mm_slot is not slot:
        m.bug("khugepaged_scan_mm_slot: the cursor moved under the scan")
    if hpage_collapse_test_exit(mm) or vma is None:
        i = scan.mm_head.index(slot)
        if i + 1 < len(scan.mm_head):
            scan.mm_slot = scan.mm_head[i + 1]
            scan.address = 0
        else:
            scan.mm_slot = None
            scan.full_scans += 1
        collect_mm_slot(m, slot)
    await scan.lock.unlock()
    return progress, result


async def _scan_vmas(m, mm, pages: int, progress: int, cc):
    """The VMA loop of khugepaged_scan_mm_slot. Returns (vma, progress, result) with
    the mmap lock released; vma is None when the mm was scanned to its end."""
    scan = m.khugepaged_scan
    result = R.SCAN_FAIL
    if hpage_collapse_test_exit(mm):
        await mm.mmap_lock.up_read()
        return None, progress, result  # breakouterloop: the mm is leaving
    for vma in [v for v in mm.vmas if v.end > scan.address]:  # vma_iter_init at address
        if hpage_collapse_test_exit(mm):
            progress += 1
            break
        if not huge_memory.thp_vma_allowable_order(m, vma, "khugepaged"):
            progress += 1
            continue
        hstart = (vma.start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
        hend = vma.end & HPAGE_PMD_MASK
        if scan.address > hend:
            progress += 1
            continue
        if scan.address < hstart:
            scan.address = hstart
        while scan.address < hend:
            if vma.vm_file is not None:  # the page cache's block (khugepaged_file.py)
                from kmm import khugepaged_file
                result = await khugepaged_file.khugepaged_scan_file(m, mm, vma,
                                                                     scan.address, cc)
                mmap_locked = False
            else:
                result, mmap_locked = await hpage_collapse_scan_pmd(m, mm, vma,
                                                                    scan.address, cc)
            if result == R.SCAN_SUCCEED:
                scan.pages_collapsed += 1
            scan.address += HPAGE_PMD_SIZE
            progress += HPAGE_PMD_NR
            if not mmap_locked:
                return vma, progress, result  # breakouterloop_mmap_lock
            if progress >= pages:
                await mm.mmap_lock.up_read()
                return vma, progress, result
    else:
        vma = None
    await mm.mmap_lock.up_read()
    return vma, progress, result


# ------------------------------------------------------------- PMD checks
def find_pmd_or_thp_or_none(m, mm, address: int) -> tuple[ScanResult, int]:
    """find_pmd_or_thp_or_none: (result, PMD table) for the PMD mapping address:
    SCAN_PMD_NULL without a table (or a non-present PMD), SCAN_PMD_NONE for an empty
    PMD, SCAN_PMD_MAPPED for a huge one (the huge zero PMD too), else SCAN_SUCCEED.
    Context: the mmap lock keeps the upper tables alive (read without points, as
    pmdp_get_lockless)."""
    from kmm import memory
    pmd_tbl = memory.pmd_lookup(m, mm, address)
    if pmd_tbl < 0:
        return R.SCAN_PMD_NULL, -1
    pmde = m.physmem.tables[pmd_tbl][pmd_index(address)]
    if pmd_none(pmde):
        return R.SCAN_PMD_NONE, pmd_tbl
    if not pmd_present(pmde):
        return R.SCAN_PMD_NULL, pmd_tbl
    if pmd_trans_huge(pmde):
        return R.SCAN_PMD_MAPPED, pmd_tbl
    return R.SCAN_SUCCEED, pmd_tbl


def hugepage_vma_revalidate(m, mm, address: int, expect_anon: bool, cc):
    """hugepage_vma_revalidate: after the mmap lock was dropped, is the 2 MiB block at
    address still in a VMA that may collapse? Returns (result, vma). Context: mmap
    lock held (the VMA lookup needs it)."""
    mmdebug.mmap_assert_locked(m, mm, "hugepage_vma_revalidate")
    if hpage_collapse_test_exit(mm):
        return R.SCAN_ANY_PROCESS, None
    vma = mm.find_vma(address)
    if vma is None:
        return R.SCAN_VMA_NULL, None
    if not huge_memory.thp_vma_suitable_order(vma, address):
        return R.SCAN_ADDRESS_RANGE, vma
    tva = "khugepaged" if cc.is_khugepaged else "forced_collapse"
    if not huge_memory.thp_vma_allowable_order(m, vma, tva):
        return R.SCAN_VMA_CHECK, vma
    if expect_anon and vma.anon_vma is None:
        return R.SCAN_PAGE_ANON, vma
    return R.SCAN_SUCCEED, vma


def is_refcount_suitable(folio) -> bool:
    """is_refcount_suitable: no reference beyond the mappings and the swap cache (a GUP
    pin or an in-flight lookup would make the copy lose writes)."""
    from kmm import rmap
    from kmm.mm_types import PG_swapcache
    expected = rmap.folio_mapcount(folio)
    if folio.flags & PG_swapcache:
        expected += folio.nr_pages
    return folio.refcount == expected


def folio_test_locked(folio) -> bool:
    return folio.lock is not None and folio.lock.owner is not None


def folio_maybe_mapped_shared(m, folio, cache: dict) -> bool:
    """folio_maybe_mapped_shared, remembered per folio for one pass over a table (a PTE
    table full of one PTE-mapped THP asks 512 times about the same folio)."""
    from kmm import rmap
    v = cache.get(folio.pfn)
    if v is None:
        v = cache[folio.pfn] = rmap.folio_maybe_mapped_shared(m, folio)
    return v


def pte_referenced(pte: int, folio) -> bool:
    """The young test of the scan and the isolate: the PTE's accessed bit, or the folio
    marked referenced (page_idle and secondary MMUs are not modelled)."""
    return pte_young(pte) or bool(folio.flags & PG_referenced)


async def hpage_collapse_scan_pmd(m, mm, vma, address: int,
                                  cc: CollapseControl) -> tuple[ScanResult, bool]:
    """hpage_collapse_scan_pmd: may the PTE table at address collapse? Under the PTE
    lock, count swap PTEs (khugepaged: more than max_ptes_swap is
    SCAN_EXCEED_SWAP_PTE), none or zero-page PTEs (max_ptes_none), PTEs whose folio may
    be mapped by another mm (max_ptes_shared), each counted in its thp_scan_exceed_*
    event when refused; folios must be anonymous, on the LRU, unlocked and without
    extra references. khugepaged also needs one young page (256 when swap-in is
    needed). SCAN_SUCCEED goes on to collapse_huge_page, which drops the mmap lock.
    Returns (result, mmap still locked); emits mm_khugepaged_scan_pmd.

    Context: mmap lock held for read; takes the PTE lock.
    """
    from kmm import khugepaged_collapse, memory
    result, pmd_tbl = find_pmd_or_thp_or_none(m, mm, address)
    referenced = none_or_zero = shared = unmapped = 0
    cc.node_load.clear()  # memset(cc->node_load); nodes_clear(cc->alloc_nmask)
    cc.alloc_nmask.clear()
    node_load = cc.node_load
    pfn = -1
    mmap_locked = True
    if result == R.SCAN_SUCCEED:
        res = await memory.pte_offset_map_lock(m, pmd_tbl, pmd_index(address))
        if res is None:
            result = R.SCAN_PMD_NULL
        else:
            tbl, ptl = res
            max_none = m.sysfs["khugepaged/max_ptes_none"]
            max_swap = m.sysfs["khugepaged/max_ptes_swap"]
            max_shared = m.sysfs["khugepaged/max_ptes_shared"]
            khugepaged = cc.is_khugepaged
            cache: dict = {}
            result = R.SCAN_SUCCEED
            for i in range(HPAGE_PMD_NR):
                pte = await atomic.entry_read(m, "pte", tbl, i)
                if is_swap_pte(pte):
                    unmapped += 1
                    if not khugepaged or unmapped <= max_swap:
                        continue
                    result = R.SCAN_EXCEED_SWAP_PTE
                    m.vmstat.count_vm_event("thp_scan_exceed_swap_pte")
                    break
                if pte_none(pte) or m.is_zero_pfn(pte_pfn(pte)):
                    none_or_zero += 1
                    if not khugepaged or none_or_zero <= max_none:
                        continue
                    result = R.SCAN_EXCEED_NONE_PTE
                    m.vmstat.count_vm_event("thp_scan_exceed_none_pte")
                    break
                if pte_special(pte):  # vm_normal_page: no struct page to collapse
                    result = R.SCAN_PAGE_NULL
                    break
                folio = m.physmem.folio(pte_pfn(pte))
                pfn = folio.pfn
                if folio.anon_vma is None:
                    result = R.SCAN_PAGE_ANON
                    break
                # a single page counts as shared if any part of its THP is
                if folio_maybe_mapped_shared(m, folio, cache):
                    shared += 1
                    if khugepaged and shared > max_shared:
                        result = R.SCAN_EXCEED_SHARED_PTE
                        m.vmstat.count_vm_event("thp_scan_exceed_share_pte")
                        break
                # the node each page is on: the collapse allocates on the busiest
                nid = mmzone.folio_nid(m, folio)
                node_load[nid] = node_load.get(nid, 0) + 1
                if not folio.flags & PG_lru:
                    result = R.SCAN_PAGE_LRU
                    break
                if folio_test_locked(folio):
                    result = R.SCAN_PAGE_LOCK
                    break
                if not is_refcount_suitable(folio):
                    result = R.SCAN_PAGE_COUNT
                    break
                if khugepaged and pte_referenced(pte, folio):
                    referenced += 1
            if result == R.SCAN_SUCCEED and khugepaged and (
                    not referenced or (unmapped and referenced < HPAGE_PMD_NR // 2)):
                result = R.SCAN_LACK_REFERENCED_PAGE
            await ptl.unlock()
            if result == R.SCAN_SUCCEED:
                result = await khugepaged_collapse.collapse_huge_page(
                    m, mm, address, referenced, unmapped, cc)
                mmap_locked = False  # collapse_huge_page returns with it released
    m.khugepaged_scan.results[("khugepaged" if cc.is_khugepaged else "madvise",
                                result.name)] += 1
    await trace_event(m, "mm_khugepaged_scan_pmd", mm=mm.id, pfn=pfn, referenced=referenced,
                      none_or_zero=none_or_zero, status=result.status, unmapped=unmapped)
    return result, mmap_locked


# ------------------------------------------------------------ MADV_COLLAPSE
ERRNO = {R.SCAN_ALLOC_HUGE_PAGE_FAIL: "ENOMEM", R.SCAN_CGROUP_CHARGE_FAIL: "EBUSY",
         R.SCAN_EXCEED_NONE_PTE: "EBUSY", R.SCAN_PAGE_COUNT: "EAGAIN",
         R.SCAN_PAGE_LOCK: "EAGAIN", R.SCAN_PAGE_LRU: "EAGAIN",
         R.SCAN_DEL_PAGE_LRU: "EAGAIN", R.SCAN_PAGE_FILLED: "EAGAIN"}

# results after which madvise_collapse goes on to the next block
CONTINUE = frozenset({R.SCAN_PMD_NULL, R.SCAN_PTE_NON_PRESENT, R.SCAN_PTE_UFFD_WP,
                      R.SCAN_LACK_REFERENCED_PAGE, R.SCAN_PAGE_NULL, R.SCAN_PAGE_COUNT,
                      R.SCAN_PAGE_LOCK, R.SCAN_PAGE_COMPOUND, R.SCAN_PAGE_LRU,
                      R.SCAN_DEL_PAGE_LRU})


def madvise_collapse_errno(r: ScanResult) -> str:
    """madvise_collapse_errno: ENOMEM when no huge page could be had, EBUSY, EAGAIN for
    what may pass (locks, references, the LRU), EINVAL for the rest."""
    return ERRNO.get(r, "EINVAL")


async def madvise_collapse(m, vma, start: int, end: int) -> tuple[int | str, bool]:
    """madvise_collapse: collapse every aligned 2 MiB block of [start, end) in vma, in
    the caller, ignoring the max_ptes_* limits, the young rule and the sysfs modes (not
    VM_NOHUGEPAGE). Blocks already PMD-mapped count as done. Returns (0 or the errno of
    the last failure, whether the mmap lock was dropped).

    Context: mmap lock held for read on entry and on return (dropped meanwhile).
    """
    mm = vma.mm
    mmdebug.mmap_assert_locked(m, mm, "madvise_collapse")
    if not huge_memory.thp_vma_allowable_order(m, vma, "forced_collapse"):
        return "EINVAL", False
    cc = CollapseControl(is_khugepaged=False)
    hstart = (start + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
    hend = end & HPAGE_PMD_MASK
    thps = 0
    last_fail = R.SCAN_FAIL
    mmap_locked = True
    dropped = False
    addr = hstart
    while addr < hend:
        if not mmap_locked:
            await mm.mmap_lock.down_read("madvise_collapse")
            mmap_locked = True
            result, v = hugepage_vma_revalidate(m, mm, addr, False, cc)
            if result != R.SCAN_SUCCEED:
                last_fail = result
                break
            vma = v
            hend = min(hend, vma.end & HPAGE_PMD_MASK)
        if vma.vm_file is not None:  # the page cache's block (khugepaged_file.py)
            from kmm import khugepaged_file
            result = await khugepaged_file.madvise_collapse_file(m, mm, vma, addr, cc)
            mmap_locked = False
        else:
            result, mmap_locked = await hpage_collapse_scan_pmd(m, mm, vma, addr, cc)
        if not mmap_locked:
            dropped = True
        addr += HPAGE_PMD_SIZE
        if result in (R.SCAN_SUCCEED, R.SCAN_PMD_MAPPED):
            thps += 1
            continue
        last_fail = result
        if result not in CONTINUE:
            break
    if not mmap_locked:
        await mm.mmap_lock.down_read("madvise_collapse")
    # unsigned arithmetic: a range ending before its first aligned block wants 2^64 THPs
    if hend >= hstart and thps == (hend - hstart) >> PMD_SHIFT:
        return 0, dropped
    return madvise_collapse_errno(last_fail), dropped


async def do_madvise_collapse(m, mm, start: int, end: int) -> int | str:
    """do_madvise(MADV_COLLAPSE) after the argument checks: madvise_lock (read),
    madvise_walk_vmas calling madvise_collapse on each VMA's part of [start, end) and
    finding its place again when the lock was dropped; the first error ends the walk,
    a hole gives ENOMEM at the end. Context: takes the mmap lock for read."""
    await mm.mmap_lock.down_read("do_madvise")
    try:
        unmapped_error: int | str = 0
        while start < end:
            vma = mm.find_vma(start)
            if vma is None or vma.start >= end:
                return "ENOMEM"
            if start < vma.start:
                unmapped_error = "ENOMEM"
                start = vma.start
            tmp = min(end, vma.end)
            err, _dropped = await madvise_collapse(m, vma, start, tmp)
            if err:
                return err
            start = tmp
        return unmapped_error
    finally:
        await mm.mmap_lock.up_read()
