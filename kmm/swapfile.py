"""The swap device: mm/swapfile.c (swap_info_struct, the cluster allocator, swap counts).

One device of ``config.swap`` bytes, modelled as 6.18 sets up a zram device (what the
host oracle swaps to): SWP_SOLIDSTATE and SWP_SYNCHRONOUS_IO, no discard. Slot 0 is the
swap header (SWAP_MAP_BAD), so the first 512-slot cluster can never be wholly free.

``swap_map`` holds each slot's count of swap PTEs plus the SWAP_HAS_CACHE bit (the slot
is in the swap cache, swap_state.py). Clusters sit on the 6.15+ lists: ``free``,
``nonfull[order]``, ``frag[order]`` and ``full``; an allocation tries the per-CPU
cluster first, then a nonfull cluster of its order (below PMD order), then a free
cluster, then one frag cluster, and order 0 finally steals from clusters of any order.
So an order-9 folio needs a wholly free cluster, and order-0 slots fill nonfull clusters
first. Locks: ``swap_cluster_lock`` (ci->lock) outside ``swap_info_lock`` (si->lock),
as move_cluster takes them.

Left out: several devices and priorities, swap count continuation (counts stop at
SWAP_MAP_MAX), discard, reclaiming cache-only slots while scanning (vm_swap_full), the
swap table of 6.18's swap cache (the cache is a dict of slots here), swapoff.
"""

from __future__ import annotations

from errno import EEXIST, ENOENT  # the host is Linux: the kernel's numbers

from kmm import atomic, swap
from kmm.mm_types import PG_dirty, PG_swapcache, PG_writeback, Page
from kmm.pgtable import (
    HPAGE_PMD_ORDER, MAX_SWAPFILES, PAGE_SIZE, is_pmd_migration_entry, is_swap_pte,
    pmd_present, swp_entry, swp_offset, swp_type,
)

SWAPFILE_CLUSTER = 512          # HPAGE_PMD_NR with CONFIG_THP_SWAP
SWAP_NR_ORDERS = HPAGE_PMD_ORDER + 1
SWAP_HAS_CACHE = 0x40
SWAP_MAP_MAX = 0x3E
SWAP_MAP_BAD = 0x3F

# swap_info_struct.flags
SWP_USED = 1 << 0
SWP_WRITEOK = 1 << 1
SWP_SOLIDSTATE = 1 << 4
SWP_SYNCHRONOUS_IO = 1 << 12

# enum swap_cluster_flags (the list a cluster is on); NONE: isolated by an allocator
CLUSTER_FLAG_NONE, CLUSTER_FLAG_FREE, CLUSTER_FLAG_NONFULL = 0, 1, 2
CLUSTER_FLAG_FRAG, CLUSTER_FLAG_FULL = 3, 4
CLUSTER_FLAG_USABLE = CLUSTER_FLAG_FRAG

# __try_to_reclaim_swap flags
TTRS_ANYWAY, TTRS_UNMAPPED, TTRS_FULL = 0x1, 0x2, 0x4



class SwapCluster:
    """struct swap_cluster_info: slots in use, its list, the order it serves."""

    __slots__ = ("idx", "count", "flags", "order", "lock")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.count = 0
        self.flags = CLUSTER_FLAG_NONE
        self.order = 0
        self.lock = None  # ci->lock, created on first use


class SwapInfo:
    """struct swap_info_struct for the one device (type 0)."""

    def __init__(self, m, size: int) -> None:
        self.type = 0
        self.flags = SWP_USED | SWP_WRITEOK | SWP_SOLIDSTATE | SWP_SYNCHRONOUS_IO
        self.max = size // PAGE_SIZE            # slots, the header's included
        self.pages = self.max - 1               # usable slots
        self.inuse_pages = 0
        self.swap_map = bytearray(self.max)
        self.swap_map[0] = SWAP_MAP_BAD         # the swap header
        self.zeromap: set[int] = set()          # slots written as zero-filled folios
        self.store: dict[int, bytes] = {}       # the device's contents, sparse
        self.cache: dict[int, int] = {}         # swap cache: slot -> folio head pfn
        nr = (self.max + SWAPFILE_CLUSTER - 1) // SWAPFILE_CLUSTER
        self.clusters = [SwapCluster(i) for i in range(nr)]
        self.free_clusters: dict[int, None] = {}
        self.nonfull_clusters: list[dict[int, None]] = [{} for _ in range(SWAP_NR_ORDERS)]
        self.frag_clusters: list[dict[int, None]] = [{} for _ in range(SWAP_NR_ORDERS)]
        self.full_clusters: dict[int, None] = {}
        self.percpu_next: dict[tuple, int] = {}  # percpu_swap_cluster.offset[order]
        self.lock = m.locks.spinlock("swap_info_lock", "swap_info:0")
        self._locks = m.locks
        # setup_clusters: the header slot, and slots past the end, are in use
        self.clusters[0].count += 1
        for _ in range(self.max, nr * SWAPFILE_CLUSTER):
            self.clusters[-1].count += 1
        for ci in self.clusters:
            if ci.count:
                ci.flags = CLUSTER_FLAG_NONFULL
                self.nonfull_clusters[0][ci.idx] = None
            else:
                ci.flags = CLUSTER_FLAG_FREE
                self.free_clusters[ci.idx] = None

    def cluster_lock(self, ci: SwapCluster):
        if ci.lock is None:
            ci.lock = self._locks.spinlock("swap_cluster_lock", f"swap_cluster:{ci.idx}")
        return ci.lock

    def list_of(self, ci: SwapCluster) -> dict[int, None] | None:
        f = ci.flags
        if f == CLUSTER_FLAG_FREE:
            return self.free_clusters
        if f == CLUSTER_FLAG_NONFULL:
            return self.nonfull_clusters[ci.order]
        if f == CLUSTER_FLAG_FRAG:
            return self.frag_clusters[ci.order]
        if f == CLUSTER_FLAG_FULL:
            return self.full_clusters
        return None


def swapon(m, size: int) -> SwapInfo | None:
    """sys_swapon: the machine's swap device of ``size`` bytes, or None without swap."""
    if size <= 0:
        return None
    if size < 2 * PAGE_SIZE:
        raise ValueError("a swap device needs a header page and at least one slot")
    return SwapInfo(m, size)


# ----------------------------------------------------------------- entries
def is_swap_entry(m, pte: int) -> bool:
    """A PTE holding a real swap entry (not a migration or other special entry)."""
    return is_swap_pte(pte) and swp_type(pte) < MAX_SWAPFILES


def pte_to_swp_entry(pte: int) -> int:
    """pte_to_swp_entry: the entry without the PTE-only bits (exclusive, soft-dirty)."""
    return swp_entry(swp_type(pte), swp_offset(pte))


def _si(m, entry: int) -> SwapInfo:
    si = m.swap_info
    if si is None or swp_type(entry) != si.type or not 0 < swp_offset(entry) < si.max:
        m.bug(f"bad swap entry {entry:#x}")
    return si


def __swap_count(m, entry: int) -> int:
    """__swap_count: the swap PTEs referencing the slot (SWAP_HAS_CACHE masked off)."""
    si = _si(m, entry)
    return si.swap_map[swp_offset(entry)] & ~SWAP_HAS_CACHE


def get_nr_swap_pages(m) -> int:
    """get_nr_swap_pages: free slots over all devices."""
    si = m.swap_info
    return 0 if si is None else si.pages - si.inuse_pages


def total_swap_pages(m) -> int:
    si = m.swap_info
    return 0 if si is None else si.pages


def vm_swap_full(m) -> bool:
    """vm_swap_full: more than half the swap space is in use."""
    return get_nr_swap_pages(m) * 2 < total_swap_pages(m)


def folio_swapped(m, folio: Page) -> bool:
    """folio_swapped: does any page table still reference a slot of the folio?"""
    si = m.swap_info
    off = swp_offset(folio.swap)
    return any(si.swap_map[o] & ~SWAP_HAS_CACHE for o in range(off, off + folio.nr_pages))


# ---------------------------------------------------------- cluster lists
async def move_cluster(m, si: SwapInfo, ci: SwapCluster, flags: int, order: int) -> None:
    """move_cluster: to the tail of the list ``flags`` names. Context: ci->lock held;
    takes si->lock."""
    await si.lock.lock("move_cluster")
    old = si.list_of(ci)
    if old is not None:
        del old[ci.idx]
    ci.flags = flags
    ci.order = order
    si.list_of(ci)[ci.idx] = None
    await si.lock.unlock()


async def relocate_cluster(m, si: SwapInfo, ci: SwapCluster) -> None:
    """relocate_cluster, after an allocation: an empty cluster is free again, a full one
    goes on the full list and a partly used one on its order's frag list (nonfull is
    for clusters that had slots freed). Context: ci->lock held."""
    if not ci.count:
        if ci.flags != CLUSTER_FLAG_FREE:
            await move_cluster(m, si, ci, CLUSTER_FLAG_FREE, 0)  # free_cluster
    elif ci.count != SWAPFILE_CLUSTER:
        if ci.flags != CLUSTER_FLAG_FRAG:
            await move_cluster(m, si, ci, CLUSTER_FLAG_FRAG, ci.order)
    elif ci.flags != CLUSTER_FLAG_FULL:
        await move_cluster(m, si, ci, CLUSTER_FLAG_FULL, ci.order)


async def isolate_lock_cluster(m, si: SwapInfo, lst: dict[int, None]) -> SwapCluster | None:
    """isolate_lock_cluster: take the first cluster off ``lst``, locked (a cluster whose
    lock is busy is skipped, as the kernel's trylock does)."""
    await si.lock.lock("isolate_lock_cluster")
    found = None
    for idx in list(lst):
        ci = si.clusters[idx]
        if await si.cluster_lock(ci).trylock("isolate_lock_cluster"):
            del lst[idx]
            ci.flags = CLUSTER_FLAG_NONE
            found = ci
            break
    await si.lock.unlock()
    return found


def cluster_is_usable(ci: SwapCluster, order: int) -> bool:
    if ci.flags > CLUSTER_FLAG_USABLE:
        return False
    return order == 0 or ci.count == 0 or ci.order == order


def cluster_scan_range(si: SwapInfo, start: int, nr: int) -> bool:
    """cluster_scan_range: every slot of [start, start+nr) is free."""
    return start + nr <= si.max and not any(si.swap_map[start:start + nr])


def cluster_alloc_range(m, si: SwapInfo, ci: SwapCluster, folio: Page, start: int) -> bool:
    """cluster_alloc_range: the slots become the folio's, in the swap cache.
    Context: ci->lock held."""
    from kmm import swap_state
    nr = folio.nr_pages
    if not si.flags & SWP_WRITEOK:
        return False
    if ci.count == 0:
        ci.order = folio.order  # the first allocation makes the cluster this order's
    si.swap_map[start:start + nr] = bytes([SWAP_HAS_CACHE]) * nr
    si.inuse_pages += nr  # swap_range_alloc
    ci.count += nr
    swap_state.__swap_cache_add_folio(m, si, folio, start)
    return True


async def alloc_swap_scan_cluster(m, si: SwapInfo, ci: SwapCluster, folio: Page,
                                  offset: int) -> int:
    """alloc_swap_scan_cluster: the first fitting range from ``offset`` in the locked
    cluster; remembers where the next allocation of the order should look. Returns the
    slot, or 0. Context: ci->lock held on entry, released on return."""
    nr = folio.nr_pages
    start = ci.idx * SWAPFILE_CLUSTER
    end = min(start + SWAPFILE_CLUSTER, si.max)
    found = nxt = 0
    if end >= nr and ci.count + nr <= SWAPFILE_CLUSTER:
        off = offset
        while off <= end - nr:
            if cluster_scan_range(si, off, nr):
                if cluster_alloc_range(m, si, ci, folio, off):
                    found = off
                    off += nr
                    if ci.count < SWAPFILE_CLUSTER and off <= end - nr:
                        nxt = off
                break
            off += nr
    await relocate_cluster(m, si, ci)
    await si.cluster_lock(ci).unlock()
    si.percpu_next[(m.sched.current.cpu, folio.order)] = nxt
    return found


async def alloc_swap_scan_list(m, si: SwapInfo, lst: dict[int, None], folio: Page,
                               scan_all: bool) -> int:
    """alloc_swap_scan_list: try the first cluster of the list (or all, in turn)."""
    while True:
        ci = await isolate_lock_cluster(m, si, lst)
        if ci is None:
            return 0
        found = await alloc_swap_scan_cluster(m, si, ci, folio, ci.idx * SWAPFILE_CLUSTER)
        if found or not scan_all:
            return found


async def swap_alloc_fast(m, si: SwapInfo, folio: Page) -> int:
    """swap_alloc_fast: the per-CPU cluster's next slot for this order."""
    offset = si.percpu_next.get((m.sched.current.cpu, folio.order), 0)
    if not offset:
        return 0
    ci = si.clusters[offset // SWAPFILE_CLUSTER]
    await si.cluster_lock(ci).lock("swap_alloc_fast")
    if not cluster_is_usable(ci, folio.order):
        await si.cluster_lock(ci).unlock()
        return 0
    if ci.count == 0:
        offset = ci.idx * SWAPFILE_CLUSTER
    return await alloc_swap_scan_cluster(m, si, ci, folio, offset)


async def cluster_alloc_swap_entry(m, si: SwapInfo, folio: Page) -> int:
    """cluster_alloc_swap_entry (the slow path): nonfull clusters of the order (below
    PMD order), then a free cluster, then one frag cluster; order 0 last steals from
    the frag and nonfull clusters of any order. Returns the first slot, or 0."""
    order = folio.order
    if order < HPAGE_PMD_ORDER:
        found = await alloc_swap_scan_list(m, si, si.nonfull_clusters[order], folio, True)
        if found:
            return found
    found = await alloc_swap_scan_list(m, si, si.free_clusters, folio, False)
    if found:
        return found
    if order < HPAGE_PMD_ORDER:
        found = await alloc_swap_scan_list(m, si, si.frag_clusters[order], folio, False)
        if found:
            return found
    if order:
        return 0
    for o in range(1, SWAP_NR_ORDERS):  # order 0 stealing from higher orders
        for lst in (si.frag_clusters[o], si.nonfull_clusters[o]):
            found = await alloc_swap_scan_list(m, si, lst, folio, True)
            if found:
                return found
    return 0


async def folio_alloc_swap(m, folio: Page) -> bool:
    """folio_alloc_swap (mm/swapfile.c). The folio gets contiguous, naturally aligned
    slots (a whole free cluster for a PMD-size folio; an mTHP shares a cluster with
    folios of its order) and joins the swap cache; False
    when the device has no room for its order (the caller splits a large folio and
    retries with its pages). Context: folio locked; takes cluster locks and si->lock."""
    si = m.swap_info
    if si is None:
        return False
    if folio.flags & PG_swapcache:
        m.bug(f"folio_alloc_swap: {folio!r} is already in the swap cache")
    await m.sched.point("folio_alloc_swap", pfn=folio.pfn, order=folio.order)
    found = await swap_alloc_fast(m, si, folio)
    if not found:
        found = await cluster_alloc_swap_entry(m, si, folio)
    return bool(found)


# ------------------------------------------------------------ swap counts
async def swap_duplicate(m, entry: int) -> int:
    """swap_duplicate: one more page table references the slot (fork, try_to_unmap).
    Returns 0, or -ENOENT when the slot was freed meanwhile. Context: the PTE lock of
    the entry is held; takes the cluster lock."""
    si = _si(m, entry)
    off = swp_offset(entry)
    ci = si.clusters[off // SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("swap_duplicate")
    v = si.swap_map[off]
    count = v & ~SWAP_HAS_CACHE
    ret = 0
    if count == 0 and not v & SWAP_HAS_CACHE:
        ret = -ENOENT
    elif count >= SWAP_MAP_MAX:
        m.bug(f"swap count continuation is not modelled (slot {off})")
    else:
        si.swap_map[off] = v + 1
    await lk.unlock()
    return ret


def swap_entries_free(m, si: SwapInfo, ci: SwapCluster, off: int, nr: int) -> bool:
    """swap_entries_free: the slots go back to the device; True if the cluster's list
    must change. Context: ci->lock held."""
    for o in range(off, off + nr):
        si.swap_map[o] = 0
        si.zeromap.discard(o)
        si.store.pop(o, None)
    si.inuse_pages -= nr  # swap_range_free
    ci.count -= nr
    if ci.count < 0:
        m.bug(f"swap cluster {ci.idx} count underflow")
    return (ci.count == 0 and ci.flags != CLUSTER_FLAG_FREE) or (
        ci.count != 0 and ci.flags != CLUSTER_FLAG_NONFULL)


async def _cluster_changed(m, si: SwapInfo, ci: SwapCluster) -> None:
    """free_cluster / partial_free_cluster after slots were freed: an empty cluster is
    free, a partly freed one goes on its order's nonfull list. Context: ci->lock."""
    if ci.count == 0:
        if ci.flags != CLUSTER_FLAG_FREE:
            await move_cluster(m, si, ci, CLUSTER_FLAG_FREE, 0)
    elif ci.flags != CLUSTER_FLAG_NONFULL:
        await move_cluster(m, si, ci, CLUSTER_FLAG_NONFULL, ci.order)


async def swap_put_entries(m, entry: int, nr: int) -> list[int]:
    """__swap_entries_put: drop one page-table reference from each slot; a slot that
    no one references any more is freed unless it is in the swap cache. Returns the
    slots left holding only SWAP_HAS_CACHE. Context: takes the cluster lock."""
    si = _si(m, entry)
    off = swp_offset(entry)
    ci = si.clusters[off // SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("swap_put_entries")
    only_cache = []
    changed = False
    for o in range(off, off + nr):
        v = si.swap_map[o]
        if not v & ~SWAP_HAS_CACHE:
            m.bug(f"swap_put_entries: slot {o} has no reference")
        v -= 1
        if v == SWAP_HAS_CACHE:
            si.swap_map[o] = v
            only_cache.append(o)
        elif v == 0:
            changed |= swap_entries_free(m, si, ci, o, 1)
        else:
            si.swap_map[o] = v
    if changed:
        await _cluster_changed(m, si, ci)
    await lk.unlock()
    return only_cache


async def swap_free_nr(m, entry: int, nr: int = 1) -> None:
    """swap_free_nr: the faulting PTE(s) no longer reference the slots (do_swap_page)."""
    await swap_put_entries(m, entry, nr)


async def free_swap_and_cache(m, entry: int) -> None:
    """free_swap_and_cache_nr (zap, MADV_FREE): drop the PTE's reference; a slot left
    only in the swap cache has its folio dropped from the cache if nothing maps it
    (__try_to_reclaim_swap, TTRS_UNMAPPED | TTRS_FULL). Context: PTE lock held."""
    for off in await swap_put_entries(m, entry, 1):
        await __try_to_reclaim_swap(m, m.swap_info, off, TTRS_UNMAPPED | TTRS_FULL)


async def put_swap_folio(m, folio: Page, entry: int) -> None:
    """put_swap_folio: the swap cache lets go of the folio's slots (SWAP_HAS_CACHE
    cleared); slots no page table references are freed. Context: takes the cluster
    lock."""
    await _drop_cache_flag(m, entry, folio.nr_pages, "put_swap_folio")


async def swapcache_prepare(m, entry: int, nr: int = 1) -> int:
    """swapcache_prepare: claim the slot for a swap-in (SWAP_HAS_CACHE) so that a racing
    swap-in waits. Returns 0, -EEXIST (claimed already) or -ENOENT (slot freed)."""
    si = _si(m, entry)
    off = swp_offset(entry)
    ci = si.clusters[off // SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("swapcache_prepare")
    # __swapcache_set over nr slots (a large swap-in claims them all or none)
    vals = si.swap_map[off:off + nr]
    if any(v & SWAP_HAS_CACHE for v in vals):
        ret = -EEXIST
    elif not all(vals):
        ret = -ENOENT
    else:
        for o in range(off, off + nr):
            si.swap_map[o] |= SWAP_HAS_CACHE
        ret = 0
    await lk.unlock()
    return ret


async def swapcache_clear(m, entry: int, nr: int = 1) -> None:
    """swapcache_clear: drop the claim of swapcache_prepare (the direct swap-in of a
    synchronous device is done); a slot no one references is freed."""
    await _drop_cache_flag(m, entry, nr, "swapcache_clear")


async def _drop_cache_flag(m, entry: int, nr: int, site: str) -> None:
    """Clear SWAP_HAS_CACHE on nr slots from entry (one cluster); free the slots no
    page table references any more. Context: takes the cluster lock."""
    si = _si(m, entry)
    off = swp_offset(entry)
    ci = si.clusters[off // SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock(site)
    changed = False
    for o in range(off, off + nr):
        v = si.swap_map[o] & ~SWAP_HAS_CACHE
        if v:
            si.swap_map[o] = v
        else:
            changed |= swap_entries_free(m, si, ci, o, 1)
    if changed:
        await _cluster_changed(m, si, ci)
    await lk.unlock()


# ------------------------------------------------------- swap cache release
def folio_swapcache_freeable(folio: Page) -> bool:
    return bool(folio.flags & PG_swapcache) and not folio.flags & PG_writeback


async def folio_free_swap(m, folio: Page) -> bool:
    """folio_free_swap: drop the folio from the swap cache and free its slots, if no
    page table references them any more. True if it did. Context: folio locked."""
    from kmm import swap_state
    if not folio_swapcache_freeable(folio) or folio_swapped(m, folio):
        return False
    await swap_state.swap_cache_del_folio(m, folio)
    # folio_set_dirty: the data now lives only in memory
    atomic.folio_set_flags_locked(folio, PG_dirty)
    return True


async def __try_to_reclaim_swap(m, si: SwapInfo, offset: int, flags: int) -> int:
    """__try_to_reclaim_swap: drop the folio caching ``offset`` from the swap cache when
    its slots hold only the cache reference (and, by ``flags``, it is unmapped or swap
    is full). Returns the pages freed, -nr if the folio stayed, 0 if none was cached."""
    from kmm import rmap, swap_state
    folio = await swap_state.swap_cache_get_folio(m, swp_entry(si.type, offset))
    if folio is None:
        return 0
    nr = folio.nr_pages
    ret = -nr
    lk = m.folio_lock_of(folio)
    if await lk.trylock("__try_to_reclaim_swap"):
        need = ((flags & TTRS_ANYWAY) or (flags & TTRS_UNMAPPED and not rmap.folio_mapped(folio))
                or (flags & TTRS_FULL and vm_swap_full(m)))
        if need and folio_swapcache_freeable(folio):
            start = swp_offset(folio.swap)
            if all(si.swap_map[o] == SWAP_HAS_CACHE for o in range(start, start + nr)):
                await swap_state.swap_cache_del_folio(m, folio)
                atomic.folio_set_flags_locked(folio, PG_dirty)
                ret = nr
        await lk.unlock()
    await swap.folio_put(m, folio)
    return ret


# -------------------------------------------------------------- invariants
def read_swapped_byte(m, pte: int, offset: int) -> int:
    """The byte at ``offset`` of the page a swap PTE names, without faulting: from its
    swap cache folio if one holds it (the newer copy), else from the device (a test
    helper: no points, no locks)."""
    si = m.swap_info
    slot = swp_offset(pte)
    pfn = si.cache.get(slot)
    if pfn is not None:
        folio = m.physmem.page(pfn)
        return m.physmem.read(pfn + slot - swp_offset(folio.swap), offset, 1)[0]
    data = si.store.get(slot)
    return 0 if data is None else data[offset]


def check(m) -> list[str]:
    """Invariant: each slot's count equals the swap PTEs naming it, SWAP_HAS_CACHE is set
    exactly for the slots the swap cache holds (each by a PG_swapcache folio whose
    ``swap`` covers it), MM_SWAPENTS counts each mm's swap PTEs, inuse_pages and the
    cluster counts and lists add up, and no swap entry sits in a PMD."""
    from kmm import pagewalk
    from kmm.pgtable import TASK_SIZE
    si = m.swap_info
    errs: list[str] = []
    refs: dict[int, int] = {}
    for task in m.tasks_with_tables():  # an exiting mm's tables count until exit_mmap
        mm = task.mm
        n = 0
        for addr, level, e in pagewalk.walk_leaves(m, mm, 0, TASK_SIZE):
            if level == "pmd":
                if not pmd_present(e) and not is_pmd_migration_entry(e):
                    errs.append(f"{task.name}: non-present PMD {e:#x} at {addr:#x} is not a "
                                "migration entry (swap is never mapped at PMD level)")
                continue
            if not is_swap_entry(m, e):
                continue
            n += 1
            if si is None or swp_type(e) != si.type or not 0 < swp_offset(e) < si.max:
                errs.append(f"{task.name}: swap PTE {e:#x} at {addr:#x} names no slot")
                continue
            refs[swp_offset(e)] = refs.get(swp_offset(e), 0) + 1
        if n != mm.swapents:
            errs.append(f"{task.name}: MM_SWAPENTS {mm.swapents} != {n} swap PTEs")
    return errs + slot_errors(m, refs)


def slot_errors(m, refs: dict[int, int]) -> list[str]:
    """check's part past the page tables: the slots against ``refs`` (slot -> swap PTEs
    naming it, counted by the caller's walk), the swap cache and the cluster counts."""
    si = m.swap_info
    errs: list[str] = []
    shm = m.__dict__.get("shmem")  # shmem's swap entries in the page cache hold one each
    for inode in (shm.inodes.values() if shm is not None else ()):
        for index, (entry, _order, base) in inode.mapping.swapped.items():
            off = swp_offset(entry) + index - base
            refs[off] = refs.get(off, 0) + 1
    if si is None:
        return errs
    pm = m.physmem
    sm = si.swap_map
    in_use = []  # (slot, value) of every slot in use but the header
    counts = []
    for ci in si.clusters:
        start = ci.idx * SWAPFILE_CLUSTER
        chunk = sm[start:start + SWAPFILE_CLUSTER]
        n = len(chunk) - chunk.count(0)
        counts.append(n)
        if n:
            in_use.extend((start + i, v) for i, v in enumerate(chunk) if v)
    counts[0] -= 1  # the header is counted below, with the slots past the end
    in_use = [(o, v) for o, v in in_use if o]
    seen = set()
    for off, v in in_use:
        seen.add(off)
        if v & ~SWAP_HAS_CACHE != refs.get(off, 0):
            errs.append(f"swap slot {off}: count {v & ~SWAP_HAS_CACHE} != "
                        f"{refs.get(off, 0)} swap PTEs")
        cached = off in si.cache
        if bool(v & SWAP_HAS_CACHE) != cached:
            errs.append(f"swap slot {off}: SWAP_HAS_CACHE {bool(v & SWAP_HAS_CACHE)} but "
                        f"{'in' if cached else 'not in'} the swap cache")
        if cached:
            f = pm.pages.get(si.cache[off])
            if (f is None or not f.flags & PG_swapcache or f.refcount < f.nr_pages
                    or not swp_offset(f.swap) <= off < swp_offset(f.swap) + f.nr_pages):
                errs.append(f"swap slot {off}: cached by {f!r}, which does not cover it")
    for off in set(refs) | set(si.cache) | si.zeromap | set(si.store):
        if off not in seen:
            errs.append(f"swap slot {off}: free but referenced, cached or holding data")
    if len(in_use) != si.inuse_pages:
        errs.append(f"swap inuse_pages {si.inuse_pages} != {len(in_use)} slots in use")
    counts[0] += 1
    counts[-1] += len(si.clusters) * SWAPFILE_CLUSTER - si.max
    for ci in si.clusters:
        if ci.count != counts[ci.idx]:
            errs.append(f"swap cluster {ci.idx}: count {ci.count} != {counts[ci.idx]}")
        lst = si.list_of(ci)
        if lst is None or ci.idx not in lst:
            errs.append(f"swap cluster {ci.idx}: not on its list (flags {ci.flags})")
        elif (ci.count == 0) != (ci.flags == CLUSTER_FLAG_FREE) or (
                (ci.count == SWAPFILE_CLUSTER) != (ci.flags == CLUSTER_FLAG_FULL)):
            errs.append(f"swap cluster {ci.idx}: count {ci.count} on list {ci.flags}")
    return errs
