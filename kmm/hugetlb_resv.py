"""hugetlb reservations and mappings: mm/hugetlb.c (reserve maps, hugetlb_reserve_pages,
the hugetlb vm_operations) and fs/hugetlbfs (the file behind a MAP_HUGETLB mapping).

A MAP_HUGETLB mmap gets a file on the internal hugetlbfs mount (hugetlb_file_setup).
Reservations are taken at mmap, so that a later fault cannot fail for want of a page:

- a **private** mapping reserves every huge page of the range in a per-VMA *reserve
  map* owned by the mapping process (HPAGE_RESV_OWNER); the map records the indices
  whose reservation was *consumed* (inverted semantics); a forked child shares none of
  it and faults on unreserved pages;
- a **shared** mapping reserves in the *inode's* region map, which records the indices
  reserved or instantiated; every mapper of the file shares it;
- MAP_NORESERVE reserves nothing: a fault then takes an unreserved free page or a
  surplus page, or gets SIGBUS.

The region maps are modelled as sets of huge-page indices (the kernel keeps a list of
[from, to) file_region entries; the counts they answer are the same). Left out: subpool
limits (no mount options on the internal mount), hugetlb cgroup charges, PMD sharing
(huge_pmd_share: each mm keeps its own PMD entries), truncation and hole punching.
"""

from __future__ import annotations

from kmm import atomic, hugetlb, swap
from kmm.mm_types import (
    VM_HUGETLB, VM_MAYEXEC, VM_MAYREAD, VM_MAYSHARE, VM_MAYWRITE, VM_NORESERVE, VM_READ,
    VM_SHARED, VM_WRITE, VmArea,
)
from kmm.pgtable import PAGE_SHIFT, TASK_SIZE

HPAGE_RESV_OWNER = 1 << 0     # the VMA's process created the private mapping
HPAGE_RESV_UNMAPPED = 1 << 1  # a COW by the owner unmapped a page from this VMA


class ResvMap:
    """struct resv_map: the indices of a region map, its kref and its rw_sema (the
    hugetlb VMA lock of a private mapping)."""

    __slots__ = ("regions", "refs", "rw_sema")

    def __init__(self, m, name: str) -> None:
        self.regions: set[int] = set()
        self.refs = 1
        self.rw_sema = m.locks.rwsem("hugetlb_vma_lock", f"hugetlb_vma_lock:{name}")


class HugetlbFile:
    """The struct file and inode of hugetlb_file_setup: size, page cache (shared
    mappings' folios by index), the inode's region map, references, i_mmap."""

    __slots__ = ("id", "hstate", "size", "cache", "resv_map", "count", "i_mmap",
                 "i_mmap_rwsem")

    def __init__(self, m, hstate, size: int) -> None:
        self.id = m.hugetlb.next_file
        m.hugetlb.next_file += 1
        self.hstate = hstate
        self.size = size
        self.cache: dict[int, int] = {}     # index -> head pfn (the mapping's xarray)
        self.resv_map = ResvMap(m, f"inode{self.id}")
        self.count = 0                      # f_count: one per VMA mapping the file
        self.i_mmap: list[VmArea] = []      # mapping->i_mmap
        self.i_mmap_rwsem = m.locks.rwsem("i_mmap_rwsem", f"i_mmap_rwsem:hugetlb{self.id}")


class HugetlbVmaData:
    """vm_private_data of a hugetlb VMA: the private reserve map with HPAGE_RESV_* flags,
    or (shared mappings) the hugetlb_vma_lock."""

    __slots__ = ("resv", "flags", "vma_lock")

    def __init__(self, resv: ResvMap | None, flags: int, vma_lock=None) -> None:
        self.resv = resv
        self.flags = flags
        self.vma_lock = vma_lock


def _data(vma) -> HugetlbVmaData | None:
    return vma.vm_private_data


def is_vma_resv_set(vma, flag: int) -> bool:
    d = _data(vma)
    return d is not None and bool(d.flags & flag)


def vma_resv_map(vma) -> ResvMap | None:
    """vma_resv_map: the inode's map for a shared mapping, the VMA's own for a private
    one (None in a child, or without reservations)."""
    if vma.flags & VM_MAYSHARE:
        return vma.hugetlb_file.resv_map
    d = _data(vma)
    return d.resv if d is not None else None


def vma_hugecache_offset(vma, addr: int) -> int:
    """vma_hugecache_offset: the huge-page index of addr in the file."""
    h = vma.hugetlb_file.hstate
    return ((addr - vma.start) >> (h.order + PAGE_SHIFT)) + (vma.pgoff >> h.order)


# ---------------------------------------------------------------- the VMA lock
def hugetlb_vma_lock(vma):
    """The rw_semaphore behind hugetlb_vma_lock_read/write: a shared mapping's own
    hugetlb_vma_lock, a private owner's resv_map->rw_sema, else none."""
    d = _data(vma)
    if d is None:
        return None
    if vma.flags & VM_MAYSHARE:
        return d.vma_lock
    return d.resv.rw_sema if d.resv is not None else None


async def hugetlb_vma_lock_read(vma) -> None:
    lk = hugetlb_vma_lock(vma)
    if lk is not None:
        await lk.down_read("hugetlb_vma_lock_read")


async def hugetlb_vma_unlock_read(vma) -> None:
    lk = hugetlb_vma_lock(vma)
    if lk is not None:
        await lk.up_read()


async def hugetlb_vma_lock_write(vma) -> None:
    lk = hugetlb_vma_lock(vma)
    if lk is not None:
        await lk.down_write("hugetlb_vma_lock_write")


async def hugetlb_vma_unlock_write(vma) -> None:
    lk = hugetlb_vma_lock(vma)
    if lk is not None:
        await lk.up_write()


# ------------------------------------------------------------ reserve maps
def vma_needs_reservation(m, vma, addr: int) -> int:
    """vma_needs_reservation: 0 when a reservation exists for this index, 1 when the
    fault needs a page nobody reserved (a child's private mapping, MAP_NORESERVE, or a
    private index whose reservation was already consumed)."""
    resv = vma_resv_map(vma)
    if resv is None:
        return 1
    idx = vma_hugecache_offset(vma, addr)
    present = idx in resv.regions
    if vma.flags & VM_MAYSHARE:
        return 0 if present else 1
    return 1 if present else 0  # private: the map holds consumed reservations


def vma_commit_reservation(m, vma, addr: int) -> None:
    """vma_commit_reservation: record the index as instantiated (shared) or its
    reservation as consumed (private owner)."""
    resv = vma_resv_map(vma)
    if resv is not None:
        resv.regions.add(vma_hugecache_offset(vma, addr))


def vma_add_reservation(m, vma, addr: int) -> None:
    """vma_add_reservation: a private owner's consumed reservation becomes available
    again (the zap that freed its page restores the global count)."""
    resv = vma_resv_map(vma)
    if resv is not None and not vma.flags & VM_MAYSHARE:
        resv.regions.discard(vma_hugecache_offset(vma, addr))


async def hugetlb_reserve_pages(m, file: HugetlbFile, frm: int, to: int, vma,
                                vm_flags: int) -> bool:
    """hugetlb_reserve_pages: reserve huge pages [frm, to) of the file for a new mapping
    (global resv_huge_pages, gathering surplus pages if the free pool is short). False
    when the pool cannot cover it: mmap fails with ENOMEM."""
    if vm_flags & VM_NORESERVE:
        return True
    h = file.hstate
    if vm_flags & VM_MAYSHARE:
        resv = file.resv_map
        chg = sum(1 for i in range(frm, to) if i not in resv.regions)  # region_chg
    else:
        resv = ResvMap(m, f"mm{vma.mm.id}:{vma.start:#x}")
        chg = to - frm
        vma.vm_private_data = HugetlbVmaData(resv, HPAGE_RESV_OWNER)
    if not await hugetlb.hugetlb_acct_memory(m, h, chg):
        if not vm_flags & VM_MAYSHARE:
            vma.vm_private_data = None
        return False
    if vm_flags & VM_MAYSHARE:
        resv.regions.update(range(frm, to))  # region_add
    return True


async def hugetlb_unreserve_pages(m, file: HugetlbFile, freed: int) -> None:
    """hugetlb_unreserve_pages(inode, 0, LONG_MAX, freed): the inode goes; its
    reservations for pages never instantiated return to the pool."""
    chg = len(file.resv_map.regions)  # region_del
    file.resv_map.regions.clear()
    await hugetlb.hugetlb_acct_memory(m, file.hstate, -(chg - freed))


# ------------------------------------------------------- vm_operations_struct
def hugetlb_vm_op_split(vma, addr: int) -> int | str:
    """hugetlb_vm_op_split: a hugetlb VMA splits only at a huge page boundary."""
    if addr & (vma.hugetlb_file.hstate.size - 1):
        return "EINVAL"
    return 0


def hugetlb_vm_op_open(m, vma) -> None:
    """hugetlb_vm_op_open (a VMA copied by split or fork): a private owner's copy
    shares the reserve map (one more reference); a shared mapping's copy gets its own
    hugetlb_vma_lock."""
    d = _data(vma)
    if vma.flags & VM_MAYSHARE:
        vma.vm_private_data = HugetlbVmaData(
            None, 0, m.locks.rwsem("hugetlb_vma_lock",
                                 f"hugetlb_vma_lock:mm{vma.mm.id}:{vma.start:#x}"))
    elif d is not None and d.flags & HPAGE_RESV_OWNER:
        vma.vm_private_data = HugetlbVmaData(d.resv, d.flags)
        d.resv.refs += 1


def hugetlb_vma_copy(m, new, old, fork: bool) -> None:
    """The hugetlb part of copying a VMA (__split_vma, or vm_area_dup in dup_mmap):
    the copy maps the same file; a fork drops the private reserve map
    (hugetlb_dup_vma_private); then vm_ops->open."""
    get_file(new, old.hugetlb_file)
    new.vm_private_data = old.vm_private_data
    if fork:
        hugetlb_dup_vma_private(new)
    hugetlb_vm_op_open(m, new)


def hugetlb_dup_vma_private(vma) -> None:
    """hugetlb_dup_vma_private (fork): a child's private mapping has no reserve map and
    no flags (its faults are not guaranteed to succeed); hugetlb_vm_op_open then gives
    a shared one its own lock."""
    vma.vm_private_data = None


async def hugetlb_vm_op_close(m, vma) -> None:
    """hugetlb_vm_op_close: a private owner gives back the reservations of the range
    that were never consumed; then the VMA's file reference goes (fput)."""
    d = _data(vma)
    if d is not None and d.flags & HPAGE_RESV_OWNER and not vma.flags & VM_MAYSHARE:
        resv = d.resv
        start = vma_hugecache_offset(vma, vma.start)
        end = vma_hugecache_offset(vma, vma.end)
        reserve = (end - start) - sum(1 for i in resv.regions if start <= i < end)
        if reserve:
            await hugetlb.hugetlb_acct_memory(m, vma.hugetlb_file.hstate, -reserve)
        resv.refs -= 1
    vma.vm_private_data = None
    await fput(m, vma)


def get_file(vma, file: HugetlbFile) -> None:
    """get_file: a VMA maps the file (and is on its i_mmap)."""
    vma.hugetlb_file = file
    file.count += 1
    file.i_mmap.append(vma)


async def fput(m, vma) -> None:
    """fput: the last reference evicts the inode (hugetlbfs_evict_inode): the page
    cache folios are released, then the remaining reservations."""
    file = vma.hugetlb_file
    if vma in file.i_mmap:  # unlink_file_vma, under i_mmap_rwsem (huge_pmd_share reads)
        await file.i_mmap_rwsem.down_write("unlink_file_vma")
        file.i_mmap.remove(vma)
        await file.i_mmap_rwsem.up_write()
    file.count -= 1
    if file.count:
        return
    freed = 0
    for idx in sorted(file.cache):  # remove_inode_hugepages
        folio = m.physmem.page(file.cache.pop(idx))
        freed += 1
        await swap.folio_put(m, folio)  # the page cache's reference
    await hugetlb_unreserve_pages(m, file, freed)


# --------------------------------------------------------------------- mmap
async def hugetlb_mmap(m, mm, addr: int, length: int, shared: bool,
                       noreserve: bool) -> VmArea | str:
    """mmap(MAP_ANONYMOUS | MAP_HUGETLB [| MAP_SHARED] [| MAP_NORESERVE]) at a fixed,
    free address: the length is rounded up to the huge page size (ksys_mmap_pgoff),
    the address must be aligned (hugetlb_get_unmapped_area), the reservation is made
    at mmap (hugetlbfs_file_mmap) or the call fails with ENOMEM. Returns the new VMA
    for the caller (do_mmap) to insert, or an errno name.
    Context: mmap_lock held for write; the range is free."""
    h = m.hugetlb.default
    if addr & (h.size - 1):
        return "EINVAL"
    length = (length + h.size - 1) & ~(h.size - 1)
    if addr + length > TASK_SIZE:
        return "ENOMEM"
    file = HugetlbFile(m, h, length)  # hugetlb_file_setup
    flags = (VM_READ | VM_WRITE | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC | VM_HUGETLB)
    if shared:
        flags |= VM_SHARED | VM_MAYSHARE
    if noreserve:
        flags |= VM_NORESERVE
    vma = VmArea(mm, addr, addr + length, flags, 0)
    get_file(vma, file)
    if shared:
        hugetlb_vm_op_open(m, vma)  # hugetlb_vma_lock_alloc
    if not await hugetlb_reserve_pages(m, file, 0, length >> (h.order + PAGE_SHIFT), vma,
                                       flags):
        vma.vm_private_data = None
        await fput(m, vma)
        return "ENOMEM"
    return vma


__all__ = ["hugetlb_mmap", "hugetlb_reserve_pages", "vma_needs_reservation",
           "hugetlb_vm_op_close", "hugetlb_vm_op_open", "hugetlb_vm_op_split"]
