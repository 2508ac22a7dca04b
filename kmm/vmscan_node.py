"""Node-level reclaim: the second half of mm/vmscan.c, with do_shrink_slab/shrink_slab
(mm/shrinker.c) and memory.force_empty (mm/memcontrol-v1.c).

``shrink_node`` over the lruvec (kmm/vmscan.py's ``shrink_lruvec``) and the shrinkers,
the reclaim/compaction continuation test, direct reclaim (``do_try_to_free_pages``,
``try_to_free_pages``, ``try_to_free_mem_cgroup_pages``), and the pieces of kswapd's
``balance_pgdat`` (``pgdat_balanced``, ``kswapd_shrink_node``, ``wakeup_kswapd``); the
kswapd loop itself is policy, in daemons/kswapd.py. kmm/vmscan.py holds the folio side:
isolation, ``shrink_folio_list``, pageout and the LRU list scanning.
"""

from __future__ import annotations

from kmm import atomic, mmzone, vmscan, wait
from kmm.gfp import GFP_KERNEL, PAGE_ALLOC_COSTLY_ORDER, __GFP_DIRECT_RECLAIM


# ---------------------------------------------------------------- slab
async def do_shrink_slab(m, shrinker, priority: int, memcg: bool) -> int:
    """do_shrink_slab (mm/shrinker.c): scan (freeable >> priority) * 4 / seeks objects,
    plus the work deferred by earlier calls, in batches of ``batch`` (128); below one
    batch only when the scan covers every object. Returns the objects freed."""
    freeable = shrinker.count_objects(m)
    if freeable <= 0:
        return 0
    pg = vmscan.NODE_DATA(m)
    key = (id(shrinker), memcg)
    nr = pg.nr_deferred.pop(key, 0)  # xchg_nr_deferred
    seeks = getattr(shrinker, "seeks", vmscan.DEFAULT_SEEKS)
    batch = getattr(shrinker, "batch", 0) or vmscan.SHRINK_BATCH
    delta = (freeable >> priority) * 4 // seeks if seeks else freeable // 2
    total_scan = min((nr >> priority) + delta, 2 * freeable)
    freed = scanned = 0
    while total_scan >= batch or total_scan >= freeable:
        nr_to_scan = min(batch, total_scan)
        ret = await shrinker.scan_objects(m, nr_to_scan)
        if ret is None or ret < 0:  # SHRINK_STOP
            break
        freed += ret
        m.vmstat.count_vm_event("slabs_scanned", nr_to_scan)
        total_scan -= nr_to_scan
        scanned += nr_to_scan
    nxt = min(max(nr + delta - scanned, 0), 2 * freeable)
    if nxt:
        pg.nr_deferred[key] = pg.nr_deferred.get(key, 0) + nxt  # add_nr_deferred
    return freed


async def shrink_slab(m, gfp_mask: int, priority: int, memcg: bool = False) -> int:
    """shrink_slab: every registered shrinker (memcg-aware ones only, for a cgroup's
    reclaim). Returns the objects freed."""
    freed = 0
    for shrinker in list(m.shrinkers):
        if memcg and not getattr(shrinker, "memcg_aware", True):
            continue
        freed += await do_shrink_slab(m, shrinker, priority, memcg)
    return freed


# ------------------------------------------------------------ shrink_node
def compact_gap(order: int) -> int:
    return 2 << order


def _compaction_suitable(m, order: int) -> bool:
    """compaction_suitable (mm/compaction.c): enough free order-0 pages above the
    watermark for compaction to have room to work."""
    z = m.zone
    mark = z.wmark["low"] if order > PAGE_ALLOC_COSTLY_ORDER else z.wmark["min"]
    return z.zone_watermark_ok(0, mark + compact_gap(order))


def in_reclaim_compaction(sc: vmscan.ScanControl) -> bool:
    return bool(sc.order) and (sc.order > PAGE_ALLOC_COSTLY_ORDER
                               or sc.priority < vmscan.DEF_PRIORITY - 2)


def should_continue_reclaim(m, nr_reclaimed: int, sc: vmscan.ScanControl) -> bool:
    """should_continue_reclaim: a high-order reclaim goes on until compaction could
    proceed or the allocation succeed, as long as it makes progress."""
    if not in_reclaim_compaction(sc) or not nr_reclaimed:
        return False
    z = m.zone
    if z.zone_watermark_ok(sc.order, z.wmark["min"]) or _compaction_suitable(m, sc.order):
        return False
    inactive = m.lruvec.nr_pages[vmscan.INACTIVE_FILE]
    if vmscan.can_reclaim_anon_pages(m):
        inactive += m.lruvec.nr_pages[vmscan.INACTIVE_ANON]
    return inactive > compact_gap(sc.order)


async def shrink_node(m, sc: vmscan.ScanControl) -> None:
    """shrink_node: one pass over the node's LRU lists and shrinkers at sc.priority
    (again while a high-order reclaim should continue). Progress revives the node's
    kswapd (sc.nid)."""
    pg = vmscan.NODE_DATA(m, sc.nid)
    while True:
        nr_reclaimed = sc.nr_reclaimed
        vmscan.prepare_scan_control(m, sc)
        await vmscan.shrink_lruvec(m, sc)
        await shrink_slab(m, sc.gfp_mask, sc.priority, sc.target_mem_cgroup)
        nr_node_reclaimed = sc.nr_reclaimed - nr_reclaimed
        if not should_continue_reclaim(m, nr_node_reclaimed, sc):
            break
    if nr_node_reclaimed:
        pg.kswapd_failures = 0
    elif sc.cache_trim_mode:
        sc.cache_trim_mode_failed = True


def compaction_ready(m, sc: vmscan.ScanControl) -> bool:
    """compaction_ready: a costly-order reclaim can stop once compaction may go ahead
    (with a high-watermark buffer) or the allocation would succeed."""
    z = m.zone
    if z.zone_watermark_ok(sc.order, z.wmark["min"]):
        return True
    if not _compaction_suitable(m, sc.order):
        return False
    return z.zone_watermark_ok(0, z.wmark["high"] + compact_gap(sc.order))


async def do_try_to_free_pages(m, sc: vmscan.ScanControl) -> int:
    """do_try_to_free_pages: shrink the node at falling priority until nr_to_reclaim
    pages are back (or compaction can take over); retries once with a full memcg walk
    and once with forced deactivation before reporting no progress."""
    initial = sc.priority
    while True:
        if not sc.target_mem_cgroup:
            m.vmstat.count_vm_event("allocstall_normal")
        while True:
            sc.nr_scanned = 0
            if (not sc.target_mem_cgroup and sc.order > PAGE_ALLOC_COSTLY_ORDER
                    and compaction_ready(m, sc)):
                sc.compaction_ready = True
            else:
                await shrink_node(m, sc)
            if sc.nr_reclaimed >= sc.nr_to_reclaim or sc.compaction_ready:
                break
            if sc.priority < vmscan.DEF_PRIORITY - 2:
                sc.may_writepage = True
            sc.priority -= 1
            if sc.priority < 0:
                break
        if sc.nr_reclaimed:
            return sc.nr_reclaimed
        if sc.compaction_ready:
            return 1
        if not sc.memcg_full_walk:
            sc.priority, sc.memcg_full_walk = initial, True
        elif sc.skipped_deactivate:
            sc.priority, sc.force_deactivate, sc.skipped_deactivate = initial, True, False
        else:
            return 0


def allow_direct_reclaim(m) -> bool:
    """allow_direct_reclaim: free pages above half the min watermark (else kswapd is
    woken: throttling the caller is not modelled)."""
    pg = vmscan.NODE_DATA(m)
    if pg.kswapd_failures >= vmscan.MAX_RECLAIM_RETRIES:
        return True
    ok = m.zone.nr_free > m.zone.wmark["min"] // 2
    if not ok and wait.wq_has_sleeper(m, "kswapd_wait"):
        wait.wake_up(m, "kswapd_wait")
    return ok


async def try_to_free_pages(m, order: int, gfp) -> int:
    """try_to_free_pages: direct reclaim for an allocation of ``order`` (gfp: the mask
    bits or a GFP_* name). Returns the pages reclaimed (1 when compaction may proceed
    instead). Context: the allocating task, no locks held."""
    allow_direct_reclaim(m)
    sc = vmscan.ScanControl(nr_to_reclaim=vmscan.SWAP_CLUSTER_MAX, gfp_mask=vmscan._gfp(gfp),
                            order=order, priority=vmscan.DEF_PRIORITY, may_writepage=True,
                            may_unmap=True, may_swap=True)
    await m.sched.point("mm_vmscan_direct_reclaim_begin", order=order)
    nr = await do_try_to_free_pages(m, sc)
    await m.sched.point("mm_vmscan_direct_reclaim_end", nr_reclaimed=nr)
    return nr


async def try_to_free_mem_cgroup_pages(m, nr_pages: int, swappiness: int) -> int:
    """try_to_free_mem_cgroup_pages: reclaim for the cgroup holding every process (its
    memory.swappiness given); memcg-aware shrinkers only."""
    sc = vmscan.ScanControl(nr_to_reclaim=max(nr_pages, vmscan.SWAP_CLUSTER_MAX),
                            gfp_mask=GFP_KERNEL, priority=vmscan.DEF_PRIORITY,
                            may_writepage=True, may_unmap=True, may_swap=True,
                            target_mem_cgroup=True, swappiness=swappiness)
    return await do_try_to_free_pages(m, sc)


async def mem_cgroup_force_empty(m, swappiness: int = 0) -> None:
    """mem_cgroup_force_empty (memory.force_empty of a cgroup-v1 group holding every
    process, as the oracle's ``reclaim`` step writes it): reclaim until the group is
    empty or MAX_RECLAIM_RETRIES rounds freed nothing. With swappiness 0 (the
    oracle's group) anonymous memory stays; lazyfree folios and shrinkers go."""
    retries = vmscan.MAX_RECLAIM_RETRIES
    while retries:
        if not await try_to_free_mem_cgroup_pages(m, 1, swappiness):
            retries -= 1


# ----------------------------------------------------------------- kswapd
def pgdat_balanced(m, order: int, nid: int = 0) -> bool:
    """pgdat_balanced: the node's zone meets the high watermark for ``order``."""
    z = m.node_data[nid].zone
    return z.zone_watermark_ok(order, z.wmark["high"])


def prepare_kswapd_sleep(m, order: int, nid: int = 0) -> bool:
    """prepare_kswapd_sleep: may kswapd sleep? Yes on a hopeless node (left to direct
    reclaim) or a balanced one."""
    return (vmscan.NODE_DATA(m, nid).kswapd_failures >= vmscan.MAX_RECLAIM_RETRIES
            or pgdat_balanced(m, order, nid))


async def kswapd_age_node(m, sc: vmscan.ScanControl) -> None:
    """kswapd_age_node: deactivate some anon pages while the inactive list is low."""
    if vmscan.can_age_anon_pages(m) and vmscan.inactive_is_low(m, vmscan.INACTIVE_ANON):
        await vmscan.shrink_active_list(m, vmscan.SWAP_CLUSTER_MAX, sc, vmscan.ACTIVE_ANON)


async def kswapd_shrink_node(m, sc: vmscan.ScanControl, nid: int = 0) -> bool:
    """kswapd_shrink_node: aim at the high watermark; True if enough was scanned
    (no need to raise the priority). The LRU lists are one for the whole machine (see
    balance_pgdat): node ``nid`` only sets the target."""
    before = sc.nr_reclaimed
    sc.nr_to_reclaim = max(m.node_data[nid].zone.wmark["high"], vmscan.SWAP_CLUSTER_MAX)
    await shrink_node(m, sc)
    if sc.order and sc.nr_reclaimed >= compact_gap(sc.order):
        sc.order = 0  # fragmentation: settle for order 0, compaction does the rest
    return max(sc.nr_scanned, sc.nr_reclaimed - before) >= sc.nr_to_reclaim


async def balance_pgdat(m, order: int, nid: int = 0) -> int:
    """balance_pgdat: kswapd's reclaim: passes from DEF_PRIORITY down to 1 until the
    zone meets its high watermark for ``order``, raising the priority when a pass
    scanned too little or freed nothing. A run that freed nothing counts a kswapd
    failure (16 make the node hopeless). Returns the order reclaim finished at.
    Context: kswapd of node ``nid``. Simplification on a machine of several nodes: the
    LRU lists are the machine's (not per node), so a node's kswapd reclaims from all
    memory, and its balance is its own zone's watermark."""
    pg = vmscan.NODE_DATA(m, nid)
    m.vmstat.count_vm_event("pageoutrun")
    sc = vmscan.ScanControl(gfp_mask=GFP_KERNEL, order=order, may_unmap=True, is_kswapd=True,
                            nid=nid)
    while True:
        sc.priority = vmscan.DEF_PRIORITY
        balanced = False
        while sc.priority >= 1:
            if pgdat_balanced(m, sc.order, nid):
                balanced = True
                break
            before = sc.nr_reclaimed
            sc.may_writepage = sc.may_swap = True
            await kswapd_age_node(m, sc)
            sc.nr_scanned = 0
            raise_priority = not await kswapd_shrink_node(m, sc, nid)
            if raise_priority or not sc.nr_reclaimed - before:
                sc.priority -= 1
        if balanced:
            return sc.order
        if (not sc.nr_reclaimed and not sc.no_cache_trim_mode
                and sc.cache_trim_mode_failed):
            sc.no_cache_trim_mode = True
            continue
        break
    if not sc.nr_reclaimed:
        pg.kswapd_failures += 1
    return sc.order


async def wakeup_kswapd(m, order: int, gfp=None, nid: int = 0) -> None:
    """wakeup_kswapd: record the order kswapd should reclaim for, and wake it if it
    sleeps on ``kswapd_wait`` and the zone is not balanced for that order. A hopeless
    or balanced node is left alone (and, for a caller that may not direct reclaim,
    kcompactd is woken instead, when the tree has it). Context: the allocator's slow
    path."""
    pg = vmscan.NODE_DATA(m, nid)
    if nid:
        await atomic.point(m.sched, "wakeup_kswapd", order=order, nid=nid)
    else:
        await atomic.point(m.sched, "wakeup_kswapd", order=order)
    if pg.kswapd_order < order:
        pg.kswapd_order = order
    wq = mmzone.node_wq("kswapd_wait", nid)
    if not wait.wq_has_sleeper(m, wq):
        return
    if pg.kswapd_failures >= vmscan.MAX_RECLAIM_RETRIES or pgdat_balanced(m, order, nid):
        if gfp is not None and not vmscan._gfp(gfp) & __GFP_DIRECT_RECLAIM:
            from kmm import compaction
            compaction.wakeup_kcompactd(m, order, nid)
        return
    wait.wake_up(m, wq)


async def memcg_reclaim(m) -> None:
    """The scenarios' ``reclaim`` step, as the oracle applies it: memory.force_empty of
    the cgroup-v1 group holding the run's processes, whose swappiness is 0."""
    await mem_cgroup_force_empty(m, swappiness=0)
