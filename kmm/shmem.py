"""Shared memory: shmem inodes, their huge-page policy and their faults. mm/shmem.c.

A shmem file is an inode of the internal shm mount with a page cache
(``filemap.AddressSpace``). ``shmem_zero_setup`` gives a MAP_SHARED|MAP_ANONYMOUS VMA
its own file (anonymous shmem); ``memfd_create`` makes a file the process holds by a
descriptor and maps with MAP_SHARED or MAP_PRIVATE.

Orders: ``shmem_allowable_huge_orders`` combines the global ``shmem_enabled`` (the
internal mount's huge= option: always / within_size / advise / never, and the
overrides deny / force) with the per-size ``hugepages-<size>kB/shmem_enabled`` knobs,
which apply to a fault in anonymous shmem, a memfd's mapping included (shmem_mmap gives
every unlinked file shmem_anon_vm_ops); the write path follows the global knob only,
with every file order. ``shmem_alloc_and_add_folio`` tries the suitable orders highest
first: an order whose aligned range is outside the VMA, or already has a folio in the
page cache, is not suitable (no fallback is counted for it); a failed allocation counts
``thp_file_fallback`` (PMD size) and the per-size ``shmem_fallback``.

The fault (``shmem_fault`` -> ``shmem_get_folio_gfp`` with SGP_CACHE) returns the folio
locked with a reference; the caller maps it (memory_file.finish_fault) and unlocks.
Truncation and hole punching (``shmem_setattr``, ``shmem_fallocate``) are in
truncate.py; swap (``shmem_writeout``, ``shmem_swapin_folio``) at the end of this
module. Left out: tmpfs mounts and their huge= options, quotas, userfaultfd, fallocate
preallocation, ``shmem_unused_huge_shrink`` (huge folios beyond i_size: scenarios
never leave any).
"""

from __future__ import annotations

from kmm import atomic, filemap, gfp as gfpmod, huge_memory, page_alloc, swap
from kmm.mm_types import PG_dirty, PG_uptodate, PG_writeback, VM_HUGEPAGE, VM_NOHUGEPAGE, Page
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE

COST_CLEAR_PAGE = 250
SHMEM_ORDERS = tuple(range(1, HPAGE_PMD_ORDER + 1))  # THP_ORDERS_ALL_FILE_DEFAULT
ALL_FILE_ORDERS = sum(1 << o for o in SHMEM_ORDERS)
PMD_ORDER_BIT = 1 << HPAGE_PMD_ORDER

# enum sgp_type
SGP_READ, SGP_NOALLOC, SGP_CACHE, SGP_WRITE, SGP_FALLOC = range(5)

EINVAL, ENOMEM, EEXIST = "EINVAL", "ENOMEM", "EEXIST"


class ShmemInode:
    """struct shmem_inode_info + its inode: size, page cache, reference count."""

    __slots__ = ("id", "i_size", "mapping", "i_count", "i_rwsem", "evicted")

    def __init__(self, m, id: int, size: int) -> None:
        self.id = id
        self.i_size = size
        self.mapping = filemap.AddressSpace(m, id, self)
        self.i_count = 0                # open files + mapping VMAs (iput at zero)
        self.i_rwsem = m.locks.rwsem("i_rwsem", f"i_rwsem:{id}")
        self.evicted = False

    def __repr__(self) -> str:
        return f"<shmem inode {self.id} size={self.i_size} pages={self.mapping.nrpages}>"


def vma_is_shmem(vma) -> bool:
    f = vma.vm_file
    return f is not None and isinstance(f, ShmemInode)


def vma_is_anon_shmem(vma) -> bool:
    """vma_is_anon_shmem: the VMA has shmem_anon_vm_ops, which shmem_mmap gives every
    file unlinked at the time of the mmap: anonymous shmem and every memfd (kmm has no
    tmpfs path to link a file to)."""
    return vma_is_shmem(vma)


class ShmemState:
    """The internal shm mount: its live inodes, the next inode number, and the per-size
    shmem stats (counted in hugepages-<size>kB/stats/ by huge_memory_mthp)."""

    def __init__(self) -> None:
        self.inodes: dict[int, ShmemInode] = {}
        self.next_ino = 1


def shmem_state(m) -> ShmemState:
    st = m.__dict__.get("shmem")
    if st is None:
        st = m.shmem = ShmemState()
    return st


def shmem_inodes(m) -> dict[int, ShmemInode]:
    """The live shmem inodes of the machine (for the checker and the report)."""
    return shmem_state(m).inodes


def shmem_new_inode(m, size: int) -> ShmemInode:
    """shmem_get_inode on the internal mount (__shmem_file_setup)."""
    st = shmem_state(m)
    inode = ShmemInode(m, st.next_ino, size)
    st.next_ino += 1
    st.inodes[inode.id] = inode
    return inode


def ihold(inode: ShmemInode) -> None:
    inode.i_count += 1


async def iput(m, inode: ShmemInode) -> None:
    """iput: the last reference evicts the inode (shmem_evict_inode truncates it all)."""
    inode.i_count -= 1
    if inode.i_count > 0:
        return
    from kmm import truncate
    await truncate.truncate_inode_pages_range(m, inode.mapping, 0, None)
    inode.evicted = True
    shmem_inodes(m).pop(inode.id, None)


# ------------------------------------------------------------------ policy
def _size_knob(m, order: int) -> str:
    """hugepages-<size>kB/shmem_enabled, the per-size knob of one order (by default
    inherit for PMD size, never below)."""
    try:
        return m.sysfs[f"hugepages-{4 << order}kB/shmem_enabled"]
    except KeyError:
        return "inherit" if order == HPAGE_PMD_ORDER else "never"


def huge_shmem_orders(m, which: str) -> int:
    """huge_shmem_orders_{always,inherit,madvise,within_size}: one bit per order."""
    want = "advise" if which == "madvise" else which
    return sum(1 << o for o in SHMEM_ORDERS if _size_knob(m, o) == want)


def shmem_get_orders_within_size(inode: ShmemInode, orders: int, index: int,
                                 write_end: int) -> int:
    """shmem_get_orders_within_size: the orders whose aligned block ends inside
    max(i_size, write_end)."""
    out = 0
    i_size = max(write_end, inode.i_size)
    i_size = (i_size + PAGE_SIZE - 1) >> PAGE_SHIFT
    for o in SHMEM_ORDERS:
        if orders & (1 << o):
            n = 1 << o
            if i_size >= (index + n) // n * n:  # round_up(index + 1, n)
                out |= 1 << o
    return out


def shmem_huge_global_enabled(m, inode: ShmemInode, index: int, write_end: int,
                              force: bool, vm_flags: int, vma=None) -> int:
    """shmem_huge_global_enabled: the orders the mount's huge= (the global knob)
    allows. A fault in a mapping (vma) gets the PMD order only, having no write size
    to size a smaller folio by; the write path (no vma) every file order."""
    huge = m.sysfs["shmem_enabled"]
    if huge == "deny":
        return 0
    if force or huge == "force":
        return PMD_ORDER_BIT
    orders = PMD_ORDER_BIT if vma is not None else ALL_FILE_ORDERS
    if huge == "always":
        return orders
    if huge == "within_size":
        w = shmem_get_orders_within_size(inode, orders, index, write_end)
        if w:
            return w
        huge = "advise"
    if huge == "advise" and vm_flags & VM_HUGEPAGE:
        return PMD_ORDER_BIT
    return 0


def shmem_allowable_huge_orders(m, inode: ShmemInode, vma, index: int, write_end: int,
                                force: bool) -> int:
    """shmem_allowable_huge_orders: the orders a fault (or, with ``force``, a
    collapse) may allocate at index."""
    vm_flags = vma.flags if vma is not None else 0
    if vm_flags & VM_NOHUGEPAGE:  # vma_thp_disabled
        return 0
    global_orders = shmem_huge_global_enabled(m, inode, index, write_end, force, vm_flags,
                                              vma)
    if vma is None or not vma_is_anon_shmem(vma):
        return global_orders  # the write path (and tmpfs files): the mount's policy only
    huge = m.sysfs["shmem_enabled"]
    if huge == "deny":
        return 0
    if huge == "force":
        return huge_shmem_orders(m, "inherit")
    mask = huge_shmem_orders(m, "always")
    mask |= shmem_get_orders_within_size(inode, huge_shmem_orders(m, "within_size"), index, 0)
    if vm_flags & VM_HUGEPAGE:
        mask |= huge_shmem_orders(m, "madvise")
    if global_orders:
        mask |= huge_shmem_orders(m, "inherit")
    return mask & ALL_FILE_ORDERS


def shmem_hpage_pmd_enabled(m) -> bool:
    """shmem_hpage_pmd_enabled: may any shmem get PMD-size folios (khugepaged runs)?"""
    huge = m.sysfs["shmem_enabled"]
    if huge == "deny":
        return False
    k = _size_knob(m, HPAGE_PMD_ORDER)
    return k in ("always", "advise", "within_size") or (k == "inherit" and huge != "never")


def thp_vma_suitable_order(vma, addr: int, order: int) -> bool:
    """thp_vma_suitable_order for a file VMA: the file offset and the address agree
    modulo the folio size, and the aligned block lies inside the VMA."""
    n = 1 << order
    if ((vma.start >> PAGE_SHIFT) - vma.pgoff) % n:
        return False
    size = n << PAGE_SHIFT
    haddr = addr & ~(size - 1)
    return vma.start <= haddr and haddr + size <= vma.end


def shmem_suitable_orders(m, inode: ShmemInode, vma, addr: int, index: int,
                          orders: int) -> int:
    """shmem_suitable_orders: drop the orders outside the VMA, then those above the
    highest whose aligned range of the page cache is empty."""
    if vma is not None:
        orders = sum(1 << o for o in SHMEM_ORDERS
                     if orders & (1 << o) and thp_vma_suitable_order(vma, addr, o))
    for o in reversed(SHMEM_ORDERS):
        if not orders & (1 << o):
            continue
        n = 1 << o
        start = index // n * n
        if not filemap.range_has_entry(inode.mapping, start, start + n):
            break
        orders &= ~(1 << o)
    return orders


# ---------------------------------------------------------------- allocation
def count_shmem_stat(m, order: int, item: str) -> None:
    """count_mthp_stat(order, MTHP_STAT_SHMEM_*): per-size stats (hugepages-*/stats)."""
    from kmm import huge_memory_mthp
    huge_memory_mthp.count_mthp_stat(m, order, item)


async def shmem_alloc_folio(m, gfp: int, order: int, vma, addr: int) -> Page | None:
    pfn = await page_alloc.vma_alloc_folio(m, gfp, order, vma, addr)
    return None if pfn < 0 else m.physmem.page(pfn)


async def shmem_alloc_and_add_folio(m, vma, addr: int, gfp: int, inode: ShmemInode,
                                    index: int, orders: int) -> Page | str:
    """shmem_alloc_and_add_folio: a new folio of the highest suitable order (else
    order 0) added to the page cache, locked, with the caller's reference and on the
    LRU; or an errno (EEXIST: a racing fault added one first)."""
    folio = None
    nr = 1
    if orders:
        suitable = shmem_suitable_orders(m, inode, vma, addr, index, orders)
        for o in reversed(SHMEM_ORDERS):
            if not suitable & (1 << o):
                continue
            nr = 1 << o
            folio = await shmem_alloc_folio(m, gfp, o, vma, addr & ~((nr << PAGE_SHIFT) - 1))
            if folio is not None:
                index = index // nr * nr
                break
            if o == HPAGE_PMD_ORDER:
                m.vmstat.count_vm_event("thp_file_fallback")
            count_shmem_stat(m, o, "shmem_fallback")
        if folio is None:
            return ENOMEM
    else:
        folio = await shmem_alloc_folio(m, gfp, 0, vma, addr)
        if folio is None:
            return ENOMEM
    lk = m.folio_lock_of(folio)
    await lk.lock("shmem_alloc_and_add_folio")  # __folio_set_locked: nobody sees it yet
    if not await filemap.filemap_add_folio(m, inode.mapping, folio, index):
        await lk.unlock()
        await swap.folio_put(m, folio)
        return EEXIST
    await swap.folio_add_lru(m, folio)
    return folio


async def shmem_get_folio_gfp(m, inode: ShmemInode, index: int, write_end: int, sgp: int,
                              vma=None, addr: int = 0,
                              subclass: int = 0) -> Page | str | None:
    """shmem_get_folio_gfp: the folio at index, locked and with a reference: found in
    the page cache, or allocated (``thp_file_alloc`` for a PMD-size one), zeroed and
    added. Returns an errno name (EINVAL: index at or beyond i_size, the fault's
    SIGBUS), or None (SGP_READ / SGP_NOALLOC on a hole). ``subclass`` is the lockdep
    nesting of the folio lock taken (collapse_file holds other folio locks)."""
    while True:
        if sgp <= SGP_CACHE and index << PAGE_SHIFT >= inode.i_size:
            return EINVAL
        folio = await filemap.filemap_get_folio(m, inode.mapping, index)
        if folio is not None:
            lk = m.folio_lock_of(folio)
            await lk.lock("shmem_get_folio_gfp", subclass)
            if (folio.mapping is not inode.mapping or not _covers(folio, index)) and (
                    not m.bugs or "shmem_fault_no_truncate_recheck" not in m.bugs):
                await lk.unlock()   # truncated or split meanwhile: look again
                await swap.folio_put(m, folio)
                continue
            break
        if index in inode.mapping.swapped:  # a swap entry: read it back, whatever sgp
            folio = await shmem_swapin_folio(m, inode, index, vma, addr, subclass)
            if folio is None:
                continue
            if isinstance(folio, str):
                return folio  # ENOMEM: no folio to read it into
            break
        if sgp == SGP_READ or sgp == SGP_NOALLOC:
            return None
        orders = shmem_allowable_huge_orders(m, inode, vma, index, write_end, False)
        folio = None
        if orders:
            huge_gfp = huge_memory.vma_thp_gfp_mask(m, vma)
            r = await shmem_alloc_and_add_folio(m, vma, addr, huge_gfp, inode, index, orders)
            if r == EEXIST:
                continue
            if isinstance(r, Page):
                folio = r
                if folio.order == HPAGE_PMD_ORDER:
                    m.vmstat.count_vm_event("thp_file_alloc")
                count_shmem_stat(m, folio.order, "shmem_alloc")
        if folio is None:
            r = await shmem_alloc_and_add_folio(m, vma, addr, gfpmod.GFP_HIGHUSER_MOVABLE,
                                                inode, index, 0)
            if r == EEXIST:
                continue
            if isinstance(r, str):
                return r
            folio = r
        # clear: a new folio is zeroed and marked uptodate before anyone maps it
        await m.sched.point("clear_highpage", COST_CLEAR_PAGE * folio.nr_pages, pfn=folio.pfn)
        m.physmem.clear(folio.pfn, folio.nr_pages)
        atomic.folio_set_flags_locked(folio, PG_uptodate)  # folio locked, unmapped
        if sgp <= SGP_CACHE and index << PAGE_SHIFT >= inode.i_size:
            # truncated since the check: the folio stays for truncation to remove
            await m.folio_lock_of(folio).unlock()
            await swap.folio_put(m, folio)
            return EINVAL
        break
    return folio


def _covers(folio: Page, index: int) -> bool:
    return folio.index <= index < folio.index + folio.nr_pages


async def shmem_fault(m, vmf) -> Page | str:
    """shmem_fault: the page-cache folio for the faulting offset (SGP_CACHE), locked,
    with a reference; or an errno (the fault's VM_FAULT_SIGBUS / OOM)."""
    vma = vmf.vma
    inode = vma.vm_file
    index = vma.linear_page_index(vmf.address)
    folio = await shmem_get_folio_gfp(m, inode, index, 0, SGP_CACHE, vma, vmf.address)
    if folio is None:
        return EINVAL
    return folio


# ------------------------------------------------------------------ files
def shmem_zero_setup(m, vma) -> None:
    """shmem_zero_setup: a MAP_SHARED|MAP_ANONYMOUS VMA gets a new file of its size."""
    inode = shmem_new_inode(m, vma.end - vma.start)
    vma.vm_file = inode
    vma.pgoff = 0
    ihold(inode)


def memfd_create(m, size: int) -> ShmemInode:
    """memfd_create + ftruncate(size): a new shmem file held by one descriptor."""
    inode = shmem_new_inode(m, size)
    ihold(inode)
    return inode


def shmem_thp_vma_allowable(m, vma, tva: str) -> bool:
    """__thp_vma_allowable_orders for a shmem VMA at PMD order: never at a fault (shmem
    has no ->huge_fault: its fault allocates the huge folio itself); elsewhere an aligned
    2 MiB block must fit (file offset included) and shmem's policy must allow PMD size
    (``forced_collapse``, MADV_COLLAPSE, as if huge=force)."""
    if tva == "pagefault" or vma.flags & VM_NOHUGEPAGE or not vma_is_shmem(vma):
        return False
    addr = vma.end - (PAGE_SIZE << HPAGE_PMD_ORDER)
    if tva != "smaps" and not thp_vma_suitable_order(vma, addr, HPAGE_PMD_ORDER):
        return False
    orders = shmem_allowable_huge_orders(m, vma.vm_file, vma, vma.pgoff, 0,
                                         tva == "forced_collapse")
    return bool(orders & PMD_ORDER_BIT)


MEMINFO = (("ShmemHugePages", "nr_shmem_hugepages"), ("ShmemPmdMapped", "nr_shmem_pmdmapped"),
           ("FileHugePages", "nr_file_hugepages"), ("FilePmdMapped", "nr_file_pmdmapped"))


def shmem_meminfo(m) -> dict[str, int]:
    """The /proc/meminfo lines of shmem and file THPs (kB) that are not zero: the
    machine boots with none, so this is their change over a run."""
    node = m.vmstat.node
    return {name: node[item] * 4 for name, item in MEMINFO if node[item]}


# ------------------------------------------------------------- mappings
async def shmem_mmap(m, task, vma, backing: str) -> None:
    """The file side of mmap: shmem_zero_setup for MAP_SHARED|MAP_ANONYMOUS, or a new
    memfd (memfd_create + ftruncate to the length; the descriptor stays open in the
    task, keyed by the address) mapped from offset 0; then vma_link_file."""
    if backing == "shmem":
        inode = shmem_new_inode(m, vma.end - vma.start)
    else:
        inode = memfd_create(m, vma.end - vma.start)
        task.files[vma.start] = inode
    vma.pgoff = 0
    await vma_link_file(m, vma, inode)


async def vma_link_file(m, vma, inode: ShmemInode) -> None:
    """get_file + vma_link_file: the VMA holds the file and joins its i_mmap."""
    vma.vm_file = inode
    ihold(inode)
    lk = inode.mapping.i_mmap_rwsem
    await lk.down_write("vma_link_file")
    inode.mapping.i_mmap.append(vma)
    await lk.up_write()


async def vma_unlink_file(m, vma) -> None:
    """unlink_file_vma + fput: the VMA leaves i_mmap; the last reference evicts."""
    inode = vma.vm_file
    lk = inode.mapping.i_mmap_rwsem
    await lk.down_write("unlink_file_vma")
    if vma in inode.mapping.i_mmap:
        inode.mapping.i_mmap.remove(vma)
    await lk.up_write()
    await iput(m, inode)


def vma_unlink_merged(vma) -> None:
    """A VMA merged into its neighbour (which maps the same file and keeps a
    reference, so this is never the last one) leaves i_mmap. vma_merge holds the
    i_mmap lock across the merge; the merge here happens between two points."""
    inode = vma.vm_file
    if inode is None:
        return
    if vma in inode.mapping.i_mmap:
        inode.mapping.i_mmap.remove(vma)
    inode.i_count -= 1


# ------------------------------------------------------------------- swap
async def shmem_writeout(m, folio: Page) -> bool:
    """shmem_writeout: a clean-for-io, unmapped shmem folio of any order goes to swap
    whole (a PMD-size one gets a whole cluster: thp_swpout; an mTHP aligned slots in a
    cluster of its order): slots allocated (the folio joins the swap cache), one slot
    reference per page for the page cache's swap entries (swap_shmem_alloc), the folio
    leaves the page cache for those entries, and it is written (swap_writeout unlocks
    it). False (redirty; the caller activates it) without swap or without room (6.18
    splits a large folio then and tries its pages, and splits one that crosses i_size
    first: kmm does neither). Context: folio locked and isolated, not mapped."""
    from kmm import page_io, swapfile
    from kmm.pgtable import swp_entry, swp_offset, swp_type
    if m.swap_info is None or not swapfile.total_swap_pages(m):
        return False
    if not await swapfile.folio_alloc_swap(m, folio):
        return False
    entry = folio.swap
    nr = folio.nr_pages
    for i in range(nr):  # swap_shmem_alloc
        await swapfile.swap_duplicate(m, swp_entry(swp_type(entry), swp_offset(entry) + i))
    mapping = folio.mapping
    index = folio.index
    await mapping.i_pages_lock.lock("shmem_delete_from_page_cache")
    filemap.__filemap_remove_folio(m, folio)
    for i in range(nr):
        mapping.swapped[index + i] = (entry, folio.order, index)
    await mapping.i_pages_lock.unlock()
    await swap.folio_put(m, folio, nr)  # the page cache's references
    await page_io.swap_writeout(m, folio)
    return True


async def shmem_swapin_folio(m, inode: ShmemInode, index: int, vma, addr: int,
                             subclass: int = 0) -> Page | str | None:
    """shmem_swapin_folio (synchronous device, skipping the swap cache): a folio of the
    order the entry was written at is read back whole (pswpin per page), replaces the
    swap entries in the page cache, and the slots are freed. Returns it locked with a
    reference; ENOMEM when no folio could be allocated (the entry stays; the kernel
    may retry a large entry at order 0, kmm reads an entry back at its own order); or
    None to look again: a racing swap-in claimed the slots first, or the entry left
    the page cache before or while it was read (shmem_confirm_swap: a truncation freed
    it, or another swap-in put its folio there). Context: no locks held."""
    from kmm import page_io, swap_state, swapfile
    mapping = inode.mapping
    swapped = mapping.swapped.get(index)
    if swapped is None:
        return None  # -EEXIST
    entry, order, base = swapped
    nr = 1 << order
    gfp = huge_memory.vma_thp_gfp_mask(m, vma) if order else gfpmod.GFP_HIGHUSER_MOVABLE
    folio = await shmem_alloc_folio(m, gfp, order, vma, addr & ~((nr << PAGE_SHIFT) - 1))
    if folio is None:
        return ENOMEM
    if await swapfile.swapcache_prepare(m, entry, nr):
        await swap.folio_put(m, folio)
        # the slot is claimed: a folio still in the swap cache holds it (written out,
        # but reclaim could not free it: swap_cache_get_folio, which the kernel asks
        # first), or a racing swap-in is reading it (relax, look again)
        cached = await swap_state.swap_cache_get_folio(m, entry)
        if cached is not None:
            return await _shmem_swapin_cached(m, mapping, cached, swapped, subclass)
        await m.sched.sleep(1000)
        return None
    lk = m.folio_lock_of(folio)
    await lk.lock("shmem_swapin_folio", subclass)
    atomic.folio_set_field_locked(folio, "swap", entry)
    await page_io.swap_read_folio(m, folio)  # unlocks it
    await lk.lock("shmem_swapin_folio", subclass)
    atomic.folio_set_field_locked(folio, "swap", 0)
    if vma is not None:  # a fault's (fault_type): truncation's and collapse's count none
        m.vmstat.count_vm_event("pgmajfault")
    # shmem_confirm_swap under the folio lock, then shmem_add_to_page_cache in place of
    # the entries: one i_pages section, so a punch either freed them first (the folio
    # is dropped) or finds the folio and removes it
    if not await filemap.filemap_add_folio(m, mapping, folio, base, expected=swapped):
        await lk.unlock()
        await swapfile.swapcache_clear(m, entry, nr)  # frees the slots the punch left
        await swap.folio_put(m, folio)
        return None  # -EEXIST
    atomic.folio_set_flags_locked(folio, PG_uptodate | PG_dirty)
    await swap.folio_add_lru(m, folio)
    await swapfile.swap_free_nr(m, entry, nr)
    await swapfile.swapcache_clear(m, entry, nr)  # the claim swapcache_prepare made
    # (on all nr slots: swapcache_prepare claims a large folio's slots all or none)
    return folio


async def _shmem_swapin_cached(m, mapping, folio: Page, swapped: tuple,
                               subclass: int) -> Page | None:
    """shmem_swapin_folio with the folio found in the swap cache (a reference taken):
    locked, still caching the entry, it takes the entries' place in the page cache and
    leaves the swap cache, and the page cache's slot references go. Returns it locked,
    or None to look again."""
    from kmm import swap_state, swapfile
    entry, order, base = swapped
    nr = 1 << order
    lk = m.folio_lock_of(folio)
    await lk.lock("shmem_swapin_folio", subclass)
    if folio.flags & PG_writeback:  # folio_wait_writeback: being written: wait, look again
        await lk.unlock()
        await swap.folio_put(m, folio)
        await m.sched.sleep(1000)
        return None
    if (not swap_state.folio_matches_swap_entry(folio, entry) or folio.nr_pages != nr
            or not await filemap.filemap_add_folio(m, mapping, folio, base,
                                                   expected=swapped)):
        await lk.unlock()  # -EEXIST: freed, or swapped in by another fault meanwhile
        await swap.folio_put(m, folio)
        return None
    await swap_state.swap_cache_del_folio(m, folio)
    atomic.folio_set_flags_locked(folio, PG_dirty)  # the data lives only in memory now
    await swapfile.swap_free_nr(m, entry, nr)
    return folio


async def shmem_free_swap(m, mapping, index: int, start: int = 0,
                          end: int = 1 << 62) -> int:
    """shmem_free_swap: truncation drops the page-cache swap entry at index and the
    slots it holds, a large entry whole, and only if all of it lies in [start, end).
    Returns the pages freed: 0 if a racing swap-in took it (the slots are then the
    swap-in's to free) or it reaches outside the range."""
    from kmm import swapfile
    from kmm.pgtable import swp_entry, swp_offset, swp_type
    # xa_cmpxchg of the entry to NULL, under the i_pages lock: a swap-in replacing it
    # by its folio (filemap_add_folio) is done before, or finds it gone
    await mapping.i_pages_lock.lock("shmem_free_swap")
    got = mapping.swapped.get(index)
    entry, order, base = got or (0, 0, 0)
    nr = 1 << order
    if got is None or base < start or base + nr > end:
        await mapping.i_pages_lock.unlock()
        return 0
    for i in range(base, base + nr):
        del mapping.swapped[i]
    await mapping.i_pages_lock.unlock()
    for i in range(nr):
        await swapfile.free_swap_and_cache(m, swp_entry(swp_type(entry), swp_offset(entry) + i))
    return nr


def shmem_swapped_in(mapping, start: int, end: int) -> int:
    """shmem_partial_swap_usage: swapped-out pages of the file in [start, end)."""
    return sum(1 for i in mapping.swapped if start <= i < end)
