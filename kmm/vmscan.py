"""Page reclaim: mm/vmscan.c, with do_shrink_slab/shrink_slab (mm/shrinker.c) and
memory.force_empty (mm/memcontrol-v1.c).

The mechanism only: ``shrink_folio_list`` (the fate of each isolated folio: keep,
activate, swap out whole or split first, unmap, write, free, discard lazyfree),
isolation and putback, ``shrink_inactive_list``/``shrink_active_list``/``shrink_lruvec``
with the kernel's scan balance (``get_scan_count``), and MADV_PAGEOUT's
``reclaim_pages``. ``shrink_slab`` over ``m.shrinkers``, ``shrink_node``, direct reclaim
(``try_to_free_pages``) and the pieces of kswapd's ``balance_pgdat`` are in
kmm/vmscan_node.py; the kswapd loop itself is policy, in daemons/kswapd.py, woken
through the ``kswapd_wait`` waitqueue.

One node, one zone, one lruvec with the classic active/inactive lists (MGLRU, the
lru_gen alternative, is not modelled). The anon LRU is only scanned while swap has room
(``can_reclaim_anon_pages``); shrinkers run regardless. Left out: memcg hierarchies and
protection (a ``target_mem_cgroup`` reclaim stands for the one group holding every
process, with its own swappiness), file pages (the file lists hold only lazyfree
anonymous folios), writeback throttling and congestion, demotion, workingset refault
detection, watermark boosting, direct reclaim throttling on pfmemalloc reserves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from itertools import islice

from kmm import atomic, huge_memory_mthp, huge_memory_split, page_io, rmap, swap, swapfile
from kmm.mm_types import (
    PG_active, PG_dirty, PG_isolated, PG_partially_mapped, PG_referenced, PG_swapbacked,
    PG_swapcache, PG_unevictable, PG_writeback, Page,
)
from kmm.gfp import GFP, GFP_KERNEL, __GFP_IO
from kmm.pgtable import HPAGE_PMD_ORDER, swp_offset

SWAP_CLUSTER_MAX = 32
DEF_PRIORITY = 12
MAX_RECLAIM_RETRIES = 16
MAX_SWAPPINESS = 200
VM_SWAPPINESS = 60            # /proc/sys/vm/swappiness default
SHRINK_BATCH = 128
DEFAULT_SEEKS = 2
DEACTIVATE_ANON, DEACTIVATE_FILE = 1, 2
INACTIVE_ANON, ACTIVE_ANON, INACTIVE_FILE, ACTIVE_FILE = swap.LRU_LISTS

class Outcome(enum.Enum):
    """Where shrink_folio_list's pass over one folio ends: the labels its gotos jump to
    (free_it, activate_locked_split, activate_locked, keep_locked, keep)."""

    FREE = "free_it"
    ACTIVATE_LOCKED_SPLIT = "activate_locked_split"
    ACTIVATE_LOCKED = "activate_locked"
    KEEP_LOCKED = "keep_locked"
    KEEP = "keep"


# enum folio_references / pageout_t
FOLIOREF_RECLAIM, FOLIOREF_RECLAIM_CLEAN, FOLIOREF_KEEP, FOLIOREF_ACTIVATE = range(4)
PAGE_KEEP, PAGE_ACTIVATE, PAGE_SUCCESS, PAGE_CLEAN = range(4)



@dataclass(slots=True)
class ScanControl:
    """struct scan_control: one reclaim invocation's goal, limits and progress."""

    nr_to_reclaim: int = 0
    gfp_mask: int = GFP_KERNEL
    order: int = 0
    priority: int = DEF_PRIORITY
    may_writepage: bool = False
    may_unmap: bool = False
    may_swap: bool = False
    may_deactivate: int = 0
    force_deactivate: bool = False
    skipped_deactivate: bool = False
    cache_trim_mode: bool = False
    cache_trim_mode_failed: bool = False
    no_cache_trim_mode: bool = False
    file_is_tiny: bool = False
    compaction_ready: bool = False
    memcg_full_walk: bool = False
    target_mem_cgroup: bool = False  # cgroup reclaim (memory.force_empty)
    swappiness: int = VM_SWAPPINESS  # the target memcg's, else vm.swappiness
    is_kswapd: bool = False           # current_is_kswapd()
    anon_cost: int = 0
    file_cost: int = 0
    nr_scanned: int = 0
    nr_reclaimed: int = 0
    nid: int = 0  # the node being reclaimed (kswapd's; direct reclaim: node 0)


@dataclass(slots=True)
class ReclaimStat:
    """struct reclaim_stat: what shrink_folio_list did with the folios it saw."""

    nr_pageout: int = 0
    nr_activate: list = field(default_factory=lambda: [0, 0])
    nr_ref_keep: int = 0
    nr_unmap_fail: int = 0
    nr_lazyfree_fail: int = 0


class PgData:
    """pglist_data: the node's id, its zone (kmm.page_alloc.Zone), its fallback order
    (node ids, kmm.mmzone.build_zonelists) and its reclaim state (kswapd's order and
    failures, the lruvec's cost counters, the shrinkers' deferred work)."""

    __slots__ = ("node_id", "zone", "zonelist", "kswapd_order", "kswapd_failures",
                 "anon_cost", "file_cost", "nr_deferred")

    def __init__(self, node_id: int = 0) -> None:
        self.node_id = node_id
        self.zone = None
        self.zonelist: list[int] = [node_id]
        self.kswapd_order = 0
        self.kswapd_failures = 0
        self.anon_cost = 0
        self.file_cost = 0
        self.nr_deferred: dict[tuple[int, bool], int] = {}  # shrinker -> deferred work


def NODE_DATA(m, nid: int = 0) -> PgData:
    """NODE_DATA(nid) (node 0 by default: reclaim's one lruvec belongs to it)."""
    return m.node_data[nid]


def _gfp(gfp) -> int:
    """A gfp mask given as bits or as a GFP_* name (kmm.gfp.GFP)."""
    if isinstance(gfp, str):
        gfp = GFP.get(gfp, GFP_KERNEL)
    return gfp if isinstance(gfp, int) else GFP_KERNEL


# ----------------------------------------------------------- predicates
def can_reclaim_anon_pages(m) -> bool:
    """can_reclaim_anon_pages: is there room in swap (no demotion here)?"""
    return swapfile.get_nr_swap_pages(m) > 0


def can_age_anon_pages(m) -> bool:
    """can_age_anon_pages: aging the anon LRU is worth it while swap exists."""
    return swapfile.total_swap_pages(m) > 0


def zone_reclaimable_pages(m) -> int:
    """zone_reclaimable_pages: file LRU pages, plus anon ones while swap has room (or
    the free pages, when nothing is reclaimable)."""
    nr = m.lruvec.nr_pages
    n = nr[INACTIVE_FILE] + nr[ACTIVE_FILE]
    if can_reclaim_anon_pages(m):
        n += nr[INACTIVE_ANON] + nr[ACTIVE_ANON]
    return n or m.zone.nr_free


def inactive_is_low(m, inactive: str) -> bool:
    """inactive_is_low: the inactive list is smaller than 1/inactive_ratio of the active
    one, the ratio being sqrt(10 * GiB of the two lists) (1 below 1 GiB)."""
    nr = m.lruvec.nr_pages
    active = ACTIVE_ANON if inactive == INACTIVE_ANON else ACTIVE_FILE
    gb = (nr[inactive] + nr[active]) >> 18
    ratio = int((10 * gb) ** 0.5) if gb else 1
    return nr[inactive] * ratio < nr[active]


def lru_note_cost(m, file: bool, nr_io: int, nr_rotated: int) -> None:
    """lru_note_cost: IO and rotations make a list costlier to reclaim; the costs decay
    by half whenever they exceed a quarter of the LRU."""
    pg = NODE_DATA(m)
    cost = nr_io * SWAP_CLUSTER_MAX + nr_rotated
    if file:
        pg.file_cost += cost
    else:
        pg.anon_cost += cost
    if pg.file_cost + pg.anon_cost > sum(m.lruvec.nr_pages.values()) // 4:
        pg.file_cost //= 2
        pg.anon_cost //= 2


# ------------------------------------------------------ isolate / putback
async def isolate_lru_folios(m, nr_to_scan: int, sc: ScanControl, lru: str):
    """isolate_lru_folios: take folios from the tail (oldest end) of a list until
    ``nr_to_scan`` pages were looked at; each taken folio gets a reference and leaves
    the LRU. Returns (folios, in processing order; pages taken; pages scanned).
    Context: lru_lock held."""
    src = m.lruvec.lists[lru]
    taken: list[Page] = []
    nr_taken = scanned = 0
    rotate = []
    pm = m.physmem
    for pfn in list(islice(src, nr_to_scan)):  # each folio is at least one page
        if scanned >= nr_to_scan:
            break
        folio = pm.pages[pfn]
        scanned += folio.nr_pages
        if (not sc.may_unmap and rmap.folio_mapped(folio)) or folio.refcount <= 0:
            rotate.append(folio)
            continue
        atomic.folio_ref_add_locked(folio)  # folio_try_get
        swap.lruvec_del_folio(m, folio)  # folio_test_clear_lru
        atomic.folio_set_flags_locked(folio, PG_isolated)
        taken.append(folio)
        nr_taken += folio.nr_pages
    for folio in rotate:  # list_move back to the list's head
        swap.lruvec_del_folio(m, folio)
        swap.lruvec_add_folio(m, folio)
    await atomic.point(m.sched, "mm_vmscan_lru_isolate", 10 * len(taken) + 1, lru=lru,
                       nr_taken=nr_taken)
    return taken, nr_taken, scanned


async def move_folios_to_lru(m, folios: list[Page]) -> int:
    """move_folios_to_lru: back on the lists their flags name, dropping the isolation
    reference; a folio whose last reference that was is freed instead. Returns the
    pages moved. Context: takes the lru_lock."""
    lk = m.lruvec.lru_lock
    moved = 0
    dead = []
    await lk.lock("move_folios_to_lru")
    for folio in folios:
        atomic.folio_clear_flags_locked(folio, PG_isolated)
        if await atomic.folio_put_testzero(m, folio):
            dead.append(folio)
            continue
        swap.lruvec_add_folio(m, folio)
        moved += folio.nr_pages
    await lk.unlock()
    for folio in dead:
        await swap.__folio_put(m, folio)
    return moved


# ------------------------------------------------------- shrink_folio_list
async def folio_check_references(m, folio: Page, sc: ScanControl) -> int:
    """folio_check_references: a folio referenced through its mappings since the last
    look is kept for another trip (the first time) or activated (referenced twice, or
    by several mappings); an unreferenced one is reclaimed."""
    referenced_ptes = await rmap.folio_referenced(m, folio)
    referenced_folio = bool(folio.flags & PG_referenced)
    atomic.folio_clear_flags_locked(folio, PG_referenced)
    if referenced_ptes:
        atomic.folio_set_flags_locked(folio, PG_referenced)
        if referenced_folio or referenced_ptes > 1:
            return FOLIOREF_ACTIVATE
        return FOLIOREF_KEEP
    if referenced_folio and not folio.flags & PG_swapbacked:  # folio_is_file_lru
        return FOLIOREF_RECLAIM_CLEAN
    return FOLIOREF_RECLAIM


async def pageout(m, folio: Page) -> int:
    """pageout -> writeout -> swap_writeout: write a dirty swap-cache folio out.
    Context: folio locked; unlocked on PAGE_SUCCESS."""
    if folio.refcount != 1 + folio.nr_pages:  # is_page_cache_freeable
        return PAGE_KEEP
    if not folio.flags & PG_swapcache:  # no mapping to write to
        return PAGE_KEEP
    if not folio.flags & PG_dirty:  # folio_clear_dirty_for_io
        return PAGE_CLEAN
    atomic.folio_clear_flags_locked(folio, PG_dirty)
    if await page_io.swap_writeout(m, folio) == page_io.AOP_WRITEPAGE_ACTIVATE:
        return PAGE_ACTIVATE
    return PAGE_SUCCESS


async def __remove_mapping(m, folio: Page) -> bool:
    """__remove_mapping for a swap-cache folio: if only the isolation and the cache hold
    it and it is clean, freeze it and let its slots go (the PTEs keep their swap
    entries). Context: folio locked."""
    si = m.swap_info
    await atomic.point(m.sched, "__remove_mapping", pfn=folio.pfn)
    if folio.refcount != 1 + folio.nr_pages or folio.flags & PG_dirty:
        return False
    atomic.folio_ref_freeze_locked(folio)  # folio_ref_freeze(1 + nr): the cache's refs go with it
    from kmm import swap_state
    entry = folio.swap
    ci = si.clusters[swp_offset(entry) // swapfile.SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("__remove_mapping")
    swap_state.__swap_cache_del_folio(m, si, folio)
    await lk.unlock()
    await swapfile.put_swap_folio(m, folio, entry)
    atomic.folio_set_field_locked(folio, "swap", 0)
    return True


async def shrink_folio_list(m, folio_list: list[Page], sc: ScanControl, stat: ReclaimStat,
                            ignore_references: bool) -> int:
    """shrink_folio_list: try to free each isolated folio (the list's end is taken
    first; split-off pages are appended and follow). An anonymous folio gets swap
    slots (a PMD-size one a whole cluster, else it is split: thp_swpout_fallback), is
    unmapped (a PMD mapping split for it), written and freed; a clean lazyfree one is
    just dropped (pglazyfreed). What stays goes back to ``folio_list``, activated or
    not. Returns the pages reclaimed. Context: folios isolated, no locks held."""
    ret: list[Page] = []
    nr_reclaimed = 0
    pgactivate = 0
    while folio_list:
        folio = folio_list.pop()
        lk = m.folio_lock_of(folio)
        if not await lk.trylock("shrink_folio_list"):
            ret.append(folio)
            continue
        nr_pages = folio.nr_pages
        sc.nr_scanned += nr_pages
        outcome = Outcome.KEEP_LOCKED
        anon = folio.anon_vma is not None
        while True:  # one pass; "break" with outcome set is the kernel's goto
            if folio.flags & PG_unevictable:
                outcome = Outcome.ACTIVATE_LOCKED
                break
            if not sc.may_unmap and rmap.folio_mapped(folio):
                break
            if folio.flags & PG_writeback:  # case 2: mark for immediate reclaim
                outcome = Outcome.ACTIVATE_LOCKED
                break
            references = FOLIOREF_RECLAIM
            if not ignore_references:
                references = await folio_check_references(m, folio, sc)
            if references == FOLIOREF_ACTIVATE:
                outcome = Outcome.ACTIVATE_LOCKED
                break
            if references == FOLIOREF_KEEP:
                stat.nr_ref_keep += nr_pages
                break
            if folio.mapping is not None:
                # shmem: unmapped first (a PMD split, which zaps a file PMD), then
                # pageout -> shmem_writeout; without swap (or room) it is redirtied and
                # activated (AOP_WRITEPAGE_ACTIVATE)
                if rmap.folio_mapped(folio):
                    await rmap.try_to_unmap(m, folio, split_pmd=folio.order >= HPAGE_PMD_ORDER)
                from kmm import shmem
                if (rmap.folio_mapped(folio) or not sc.may_writepage
                        or folio.refcount != 1 + folio.nr_pages  # is_page_cache_freeable
                        or not await shmem.shmem_writeout(m, folio)):
                    outcome = Outcome.ACTIVATE_LOCKED
                    break
                stat.nr_pageout += nr_pages
                if not await lk.trylock("shrink_folio_list"):  # written and unlocked
                    outcome = Outcome.KEEP
                    break
                if (folio.flags & (PG_writeback | PG_dirty)
                        or not await __remove_mapping(m, folio)):
                    break
                outcome = Outcome.FREE
                break
            if anon and folio.flags & PG_swapbacked and not folio.flags & PG_swapcache:
                if not sc.gfp_mask & __GFP_IO:
                    break
                if folio.order:
                    if not huge_memory_split.can_split_folio(m, folio, 1):
                        outcome = Outcome.ACTIVATE_LOCKED
                        break
                    # split partially mapped folios right away: free the unmapped
                    # pages without IO
                    if (folio.on_deferred_list and folio.flags & PG_partially_mapped
                            and await huge_memory_split.split_folio_to_list(m, folio, folio_list)):
                        outcome = Outcome.ACTIVATE_LOCKED
                        break
                if not await swapfile.folio_alloc_swap(m, folio):
                    if not folio.order:
                        outcome = Outcome.ACTIVATE_LOCKED_SPLIT
                        break
                    order = folio.order
                    if await huge_memory_split.split_folio_to_list(m, folio, folio_list):
                        outcome = Outcome.ACTIVATE_LOCKED
                        break
                    if order == HPAGE_PMD_ORDER:
                        m.vmstat.count_vm_event("thp_swpout_fallback")
                    huge_memory_mthp.count_mthp_stat(m, order, "swpout_fallback")
                    if not await swapfile.folio_alloc_swap(m, folio):
                        outcome = Outcome.ACTIVATE_LOCKED_SPLIT
                        break
                # MADV_FREE'd ptes may be clean while the folio is swap-backed again:
                # dirty it, or its data would not be written (folio_mark_dirty)
                atomic.folio_set_flags_locked(folio, PG_dirty)
            if nr_pages > 1 and not folio.order:  # split above: its pages come later
                sc.nr_scanned -= nr_pages - 1
                nr_pages = 1
            if rmap.folio_mapped(folio):
                was_swapbacked = bool(folio.flags & PG_swapbacked)
                await rmap.try_to_unmap(m, folio, split_pmd=folio.order >= HPAGE_PMD_ORDER)
                if rmap.folio_mapped(folio):
                    stat.nr_unmap_fail += nr_pages
                    if not was_swapbacked and folio.flags & PG_swapbacked:
                        stat.nr_lazyfree_fail += nr_pages
                    outcome = Outcome.ACTIVATE_LOCKED
                    break
            if folio.flags & PG_dirty:
                if not folio.flags & PG_swapbacked:
                    # a dirty lazyfree folio is file-LRU to reclaim: direct reclaim
                    # never writes those, it activates them (immediate reclaim)
                    outcome = Outcome.ACTIVATE_LOCKED
                    break
                if references == FOLIOREF_RECLAIM_CLEAN or not sc.may_writepage:
                    break
                res = await pageout(m, folio)
                if res == PAGE_KEEP:
                    break
                if res == PAGE_ACTIVATE:
                    outcome = Outcome.ACTIVATE_LOCKED
                    break
                if res == PAGE_SUCCESS:
                    stat.nr_pageout += nr_pages
                    if folio.flags & (PG_writeback | PG_dirty):
                        outcome = Outcome.KEEP
                        break
                    if not await lk.trylock("shrink_folio_list"):  # a synchronous write
                        outcome = Outcome.KEEP
                        break
                    if folio.flags & (PG_writeback | PG_dirty):
                        break
            if anon and not folio.flags & PG_swapbacked:
                if not await atomic.folio_ref_freeze(m, folio, 1):
                    break
                m.vmstat.count_vm_event("pglazyfreed", nr_pages)
            elif not folio.flags & PG_swapcache or not await __remove_mapping(m, folio):
                break
            outcome = Outcome.FREE
            break
        if outcome is Outcome.FREE:
            await lk.unlock()
            nr_reclaimed += nr_pages
            atomic.folio_clear_flags_locked(folio, PG_isolated)
            await swap.__folio_put(m, folio)  # folio_unqueue_deferred_split, free_unref_folios
            continue
        if outcome is Outcome.ACTIVATE_LOCKED_SPLIT and nr_pages > 1:
            sc.nr_scanned -= nr_pages - 1
            nr_pages = 1
        if outcome in (Outcome.ACTIVATE_LOCKED, Outcome.ACTIVATE_LOCKED_SPLIT):
            if folio.flags & PG_swapcache and swapfile.vm_swap_full(m):
                await swapfile.folio_free_swap(m, folio)
            atomic.folio_set_flags_locked(folio, PG_active)
            stat.nr_activate[0 if folio.flags & PG_swapbacked else 1] += nr_pages
            pgactivate += nr_pages
        if outcome is not Outcome.KEEP:
            await lk.unlock()
        ret.append(folio)
    folio_list[:] = ret
    if pgactivate:
        m.vmstat.count_vm_event("pgactivate", pgactivate)
    return nr_reclaimed


# --------------------------------------------------------- LRU scanning
async def shrink_inactive_list(m, nr_to_scan: int, sc: ScanControl, lru: str) -> int:
    """shrink_inactive_list: isolate a batch from the list's tail, shrink_folio_list it,
    put back what stayed. Returns the pages reclaimed."""
    file = lru == INACTIVE_FILE
    lk = m.lruvec.lru_lock
    await lk.lock("shrink_inactive_list")
    folios, nr_taken, nr_scanned = await isolate_lru_folios(m, nr_to_scan, sc, lru)
    ev = m.vmstat
    if not sc.target_mem_cgroup:
        ev.count_vm_event("pgscan_kswapd" if sc.is_kswapd else "pgscan_direct", nr_scanned)
    ev.count_vm_event("pgscan_file" if file else "pgscan_anon", nr_scanned)
    await lk.unlock()
    if not nr_taken:
        return 0
    stat = ReclaimStat()
    folios.reverse()  # list_move to dst's head: the first taken is processed first
    nr_reclaimed = await shrink_folio_list(m, folios, sc, stat, False)
    await move_folios_to_lru(m, folios)
    if not sc.target_mem_cgroup:
        ev.count_vm_event("pgsteal_kswapd" if sc.is_kswapd else "pgsteal_direct",
                          nr_reclaimed)
    ev.count_vm_event("pgsteal_file" if file else "pgsteal_anon", nr_reclaimed)
    lru_note_cost(m, file, stat.nr_pageout, nr_scanned - nr_reclaimed)
    return nr_reclaimed


async def shrink_active_list(m, nr_to_scan: int, sc: ScanControl, lru: str) -> None:
    """shrink_active_list: move a batch from the active list's tail to the inactive
    list, clearing the young bits it finds on the way (anonymous folios are never
    rotated back, even when referenced)."""
    lk = m.lruvec.lru_lock
    await lk.lock("shrink_active_list")
    folios, nr_taken, nr_scanned = await isolate_lru_folios(m, nr_to_scan, sc, lru)
    if not sc.target_mem_cgroup:
        m.vmstat.count_vm_event("pgrefill", nr_scanned)
    await lk.unlock()
    for folio in folios:
        await rmap.folio_referenced(m, folio)  # ages the mappings; anon is not rotated
        atomic.folio_clear_flags_locked(folio, PG_active)
    nr_deactivate = await move_folios_to_lru(m, folios)
    if nr_deactivate:
        m.vmstat.count_vm_event("pgdeactivate", nr_deactivate)


async def shrink_list(m, lru: str, nr_to_scan: int, sc: ScanControl) -> int:
    if lru in (ACTIVE_ANON, ACTIVE_FILE):
        if sc.may_deactivate & (DEACTIVATE_FILE if lru == ACTIVE_FILE else DEACTIVATE_ANON):
            await shrink_active_list(m, nr_to_scan, sc, lru)
        else:
            sc.skipped_deactivate = True
        return 0
    return await shrink_inactive_list(m, nr_to_scan, sc, lru)


def prepare_scan_control(m, sc: ScanControl) -> None:
    """prepare_scan_control: the cost balance, whether each active list may be
    deactivated (its inactive list is low), cache trim mode and a tiny file LRU."""
    pg = NODE_DATA(m)
    nr = m.lruvec.nr_pages
    sc.anon_cost, sc.file_cost = pg.anon_cost, pg.file_cost
    if sc.force_deactivate:
        sc.may_deactivate = DEACTIVATE_ANON | DEACTIVATE_FILE
    else:
        sc.may_deactivate = ((DEACTIVATE_ANON if inactive_is_low(m, INACTIVE_ANON) else 0)
                             | (DEACTIVATE_FILE if inactive_is_low(m, INACTIVE_FILE) else 0))
    sc.cache_trim_mode = bool(nr[INACTIVE_FILE] >> sc.priority
                              and not sc.may_deactivate & DEACTIVATE_FILE
                              and not sc.no_cache_trim_mode)
    if not sc.target_mem_cgroup:
        file = nr[ACTIVE_FILE] + nr[INACTIVE_FILE]
        sc.file_is_tiny = bool(file + m.zone.nr_free <= m.zone.wmark["high"]
                               and not sc.may_deactivate & DEACTIVATE_ANON
                               and nr[INACTIVE_ANON] >> sc.priority)


def get_scan_count(m, sc: ScanControl) -> list[int]:
    """get_scan_count: pages to scan on each list this round: (size >> priority), all
    file without swap room (or for a swappiness-0 cgroup), both equally at priority 0,
    else split by swappiness and the lists' recent reclaim cost."""
    swappiness = sc.swappiness
    balance = "fract"
    if not sc.may_swap or not can_reclaim_anon_pages(m):
        balance = "file"
    elif sc.target_mem_cgroup and not swappiness:
        balance = "file"
    elif not sc.priority and swappiness:
        balance = "equal"
    elif sc.file_is_tiny:
        balance = "anon"
    elif sc.cache_trim_mode:
        balance = "file"
    fraction = [0, 0]
    denominator = 1
    if balance == "fract":
        total = sc.anon_cost + sc.file_cost
        anon_cost, file_cost = total + sc.anon_cost, total + sc.file_cost
        total = anon_cost + file_cost
        ap = swappiness * (total + 1) // (anon_cost + 1)
        fp = (MAX_SWAPPINESS - swappiness) * (total + 1) // (file_cost + 1)
        fraction, denominator = [ap, fp], ap + fp
    out = []
    for lru in swap.LRU_LISTS:
        file = lru in (INACTIVE_FILE, ACTIVE_FILE)
        scan = m.lruvec.nr_pages[lru] >> sc.priority
        if balance == "fract":
            scan = scan * fraction[file] // denominator if denominator else 0
        elif balance in ("file", "anon") and (balance == "file") != file:
            scan = 0
        out.append(scan)
    return out


async def shrink_lruvec(m, sc: ScanControl) -> None:
    """shrink_lruvec: scan the lists in SWAP_CLUSTER_MAX batches toward get_scan_count's
    targets; once enough is reclaimed (kswapd, or below DEF_PRIORITY), scale the
    remaining work to keep anon and file proportional. Then age the anon lists."""
    nr = get_scan_count(m, sc)
    targets = list(nr)
    nr_reclaimed = 0
    proportional = not sc.target_mem_cgroup and not sc.is_kswapd and sc.priority == DEF_PRIORITY
    while nr[0] or nr[2] or nr[3]:
        for i, lru in enumerate(swap.LRU_LISTS):
            if nr[i]:
                n = min(nr[i], SWAP_CLUSTER_MAX)
                nr[i] -= n
                nr_reclaimed += await shrink_list(m, lru, n, sc)
        if nr_reclaimed < sc.nr_to_reclaim or proportional:
            continue
        nr_file, nr_anon = nr[2] + nr[3], nr[0] + nr[1]
        if not nr_file or not nr_anon:
            break
        if nr_file > nr_anon:
            percentage = nr_anon * 100 // (targets[0] + targets[1] + 1)
            stop, other = 0, 2
        else:
            percentage = nr_file * 100 // (targets[2] + targets[3] + 1)
            stop, other = 2, 0
        nr[stop] = nr[stop + 1] = 0
        for i in (other, other + 1):
            scanned = targets[i] - nr[i]
            nr[i] = targets[i] * (100 - percentage) // 100
            nr[i] -= min(nr[i], scanned)
    sc.nr_reclaimed += nr_reclaimed
    if can_age_anon_pages(m) and inactive_is_low(m, INACTIVE_ANON):
        await shrink_active_list(m, SWAP_CLUSTER_MAX, sc, ACTIVE_ANON)


# ------------------------------------------------------------ MADV_PAGEOUT
async def reclaim_folio_list(m, folios: list[Page]) -> int:
    """reclaim_folio_list: shrink_folio_list ignoring references, then put back."""
    sc = ScanControl(gfp_mask=GFP_KERNEL, may_writepage=True, may_unmap=True,
                     may_swap=True)
    stat = ReclaimStat()
    nr = await shrink_folio_list(m, folios, sc, stat, True)
    for folio in folios:  # in the order they were processed
        await swap.folio_putback_lru(m, folio)
    folios.clear()
    return nr


async def reclaim_pages(m, folios: list[Page]) -> int:
    """reclaim_pages (MADV_PAGEOUT): reclaim these isolated folios now, whatever their
    age, in the order given. Returns the pages reclaimed."""
    if not folios:
        return 0
    lst = []
    for folio in folios:
        atomic.folio_clear_flags_locked(folio, PG_active)
        lst.insert(0, folio)
    return await reclaim_folio_list(m, lst)
