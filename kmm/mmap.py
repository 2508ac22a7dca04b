"""Mappings: mm/mmap.c and mm/vma.c for anonymous private memory.

``do_mmap`` places a VMA (the scenario gives a fixed, 2 MiB-aligned address: the
MAP_FIXED_NOREPLACE the oracle uses too), ``do_munmap`` splits the VMAs at the range's
ends (``split_vma`` splits a huge PMD straddling an unaligned boundary first, through
``vma_adjust_trans_huge``), zaps the range and frees the page tables nothing else uses.
``exit_mmap`` tears a whole mm down. VMA modification (``vma_modify_flags``) splits and
re-merges VMAs for mprotect and madvise. Errors are errno names, as the syscalls return.
"""

from __future__ import annotations

from kmm import (
    huge_memory, hugetlb_fault, hugetlb_pmd_share, hugetlb_resv, khugepaged, memory, memory_zap,
    mmdebug, rmap, shmem,
)
from kmm.mm_types import (
    VM_HUGETLB, VM_MAYEXEC, VM_MAYREAD, VM_MAYSHARE, VM_MAYWRITE, VM_READ, VM_SHARED, VM_WRITE,
    MmStruct, VmArea,
)
from kmm.pgtable import PAGE_SIZE, TASK_SIZE, vm_page_prot


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def vmas_in(mm: MmStruct, start: int, end: int) -> list[VmArea]:
    return [v for v in mm.vmas if v.start < end and v.end > start]


def _insert(mm: MmStruct, vma: VmArea) -> None:
    vmas = mm.vmas
    i = 0
    while i < len(vmas) and vmas[i].start < vma.start:
        i += 1
    vmas.insert(i, vma)


async def split_vma(m, vma: VmArea, addr: int) -> VmArea:
    """split_vma: vma becomes [start, addr) and the returned new VMA [addr, end).

    A huge PMD straddling an unaligned addr is split first (vma_adjust_trans_huge).
    Context: mmap_lock held for write.
    """
    mmdebug.mmap_assert_write_locked(m, vma.mm, "__split_vma (vma_start_write)")
    await huge_memory.vma_adjust_trans_huge(m, vma, addr, addr, None)
    if vma.flags & VM_HUGETLB:  # a split inside a shared PUD range ends the sharing
        await hugetlb_pmd_share.hugetlb_split(m, vma, addr)
    new = VmArea(vma.mm, addr, vma.end, vma.flags, vma.pgoff + ((addr - vma.start) >> 12))
    new.vm_policy = vma.vm_policy  # vma_dup_policy
    rmap.anon_vma_clone(new, vma)
    if vma.vm_file is not None:
        await shmem.vma_link_file(m, new, vma.vm_file)
    if vma.flags & VM_HUGETLB:
        hugetlb_resv.hugetlb_vma_copy(m, new, vma, fork=False)
    vma.end = addr
    _insert(vma.mm, new)
    await m.sched.point("split_vma", mm=vma.mm.id, addr=addr)
    return new


def _mergeable(a: VmArea, b: VmArea) -> bool:
    return (a.end == b.start and a.flags == b.flags
            and a.hugetlb_file is b.hugetlb_file is None
            and b.pgoff == a.pgoff + ((b.start - a.start) >> 12)
            and a.vm_file is b.vm_file and a.vm_policy == b.vm_policy
            and (a.anon_vma is None or b.anon_vma is None or a.anon_vma is b.anon_vma))


def vma_merge_around(mm: MmStruct, vma: VmArea) -> VmArea:
    """vma_merge: join vma with identical neighbours (same flags, same anon_vma)."""
    i = mm.vmas.index(vma)
    if i + 1 < len(mm.vmas) and _mergeable(vma, mm.vmas[i + 1]):
        nxt = mm.vmas.pop(i + 1)
        vma.end = nxt.end
        shmem.vma_unlink_merged(nxt)
        if vma.anon_vma is None and nxt.anon_vma is not None:
            rmap.anon_vma_clone(vma, nxt)
        rmap.unlink_anon_vmas(nxt)
    if i > 0 and _mergeable(mm.vmas[i - 1], vma):
        prev = mm.vmas[i - 1]
        mm.vmas.pop(i)
        prev.end = vma.end
        shmem.vma_unlink_merged(vma)
        if prev.anon_vma is None and vma.anon_vma is not None:
            rmap.anon_vma_clone(prev, vma)
        rmap.unlink_anon_vmas(vma)
        vma = prev
    return vma


async def vma_modify_flags(m, vma: VmArea, start: int, end: int, flags: int) -> VmArea:
    """vma_modify_flags: give [start, end) of vma new flags, splitting and merging.
    Context: mmap_lock held for write (vm_flags_reset -> vma_start_write)."""
    mmdebug.mmap_assert_write_locked(m, vma.mm, "vma_modify_flags (vma_start_write)")
    if vma.start < start:
        vma = await split_vma(m, vma, start)
    if vma.end > end:
        await split_vma(m, vma, end)
    vma.flags = flags
    vma.page_prot = vm_page_prot(flags)
    return vma_merge_around(vma.mm, vma)


# The mapping kinds mmap makes (the program API and the scenario loader check against
# this one table): anon is MAP_PRIVATE|MAP_ANONYMOUS; shmem MAP_SHARED|MAP_ANONYMOUS; memfd
# memfd_create + ftruncate(size) + MAP_SHARED; memfd_private the same file MAP_PRIVATE
# (writes COW into anonymous memory); hugetlb MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB,
# hugetlb_shared with MAP_SHARED.
BACKINGS = ("anon", "shmem", "memfd", "memfd_private", "hugetlb", "hugetlb_shared")


async def do_mmap(m, task, addr: int, length: int, backing: str = "anon",
                  noreserve: bool = False) -> int | str:
    """mmap(addr, length, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|
    MAP_FIXED_NOREPLACE): the start address, or an errno name. ``backing`` "shmem" is
    MAP_SHARED|MAP_ANONYMOUS (shmem_zero_setup), "memfd" a new memfd of the length
    mapped MAP_SHARED, "memfd_private" the same mapped MAP_PRIVATE; "hugetlb" adds
    MAP_HUGETLB, "hugetlb_shared" MAP_HUGETLB with MAP_SHARED; ``noreserve`` is
    MAP_NORESERVE (hugetlb_resv.hugetlb_mmap)."""
    if length <= 0 or addr & (PAGE_SIZE - 1):
        return "EINVAL"
    length = page_align(length)
    if addr + length > TASK_SIZE:
        return "ENOMEM"
    mm = task.mm
    await mm.mmap_lock.down_write("do_mmap")
    try:
        if vmas_in(mm, addr, addr + length):
            return "EEXIST"
        if backing in ("hugetlb", "hugetlb_shared"):
            vma = await hugetlb_resv.hugetlb_mmap(m, mm, addr, length,
                                                  backing == "hugetlb_shared", noreserve)
            if isinstance(vma, str):
                return vma
            _insert(mm, vma)
            await m.sched.point("mmap_region", mm=mm.id, start=addr, end=vma.end)
            return addr
        flags = VM_READ | VM_WRITE | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
        if backing in ("shmem", "memfd"):
            flags |= VM_SHARED | VM_MAYSHARE
        vma = VmArea(mm, addr, addr + length, flags, addr >> 12)
        if backing != "anon":
            await shmem.shmem_mmap(m, task, vma, backing)
        _insert(mm, vma)
        vma = vma_merge_around(mm, vma)
        await m.sched.point("mmap_region", mm=mm.id, start=addr, end=addr + length)
        khugepaged.khugepaged_enter_vma(m, vma)
        return addr
    finally:
        await mm.mmap_lock.up_write()


async def unmap_region(m, mm: MmStruct, victims: list[VmArea], start: int,
                       end: int) -> None:
    """unmap_region: zap the victims, then free the tables only they used.

    Context: mmap_lock held for write; the victims are already off mm.vmas.
    """
    tlbg = memory_zap.MmuGather(mm)
    for vma in victims:
        if vma.flags & VM_HUGETLB:  # the final zap: a shared VMA's lock goes with it
            await hugetlb_fault.unmap_hugepage_range(m, tlbg, vma, vma.start, vma.end, True)
        else:
            await memory_zap.unmap_page_range(m, tlbg, vma, vma.start, vma.end)
    prev = [v for v in mm.vmas if v.end <= start]
    nxt = [v for v in mm.vmas if v.start >= end]
    floor = prev[-1].end if prev else 0
    ceiling = nxt[0].start if nxt else TASK_SIZE
    await tlbg.finish(m)
    for vma in victims:  # remove_vma -> vma_close
        if vma.flags & VM_HUGETLB:
            await hugetlb_resv.hugetlb_vm_op_close(m, vma)
    # free_pgtables: each VMA leaves its anon_vma chains (under the anon_vma lock, so
    # an rmap walk in progress finishes first) before its page tables go
    for vma in victims:
        if vma.vm_file is not None:  # unlink_file_vma, then fput
            await shmem.vma_unlink_file(m, vma)
        roots = {id(av.root): av.root for av in vma.avc}
        for root in roots.values():
            await root.rwsem.down_write("unlink_anon_vmas")
        rmap.unlink_anon_vmas(vma)
        for root in roots.values():
            await root.rwsem.up_write()
    await memory_zap.free_pgtables(m, mm, start, end, floor, ceiling)


async def do_munmap(m, task, start: int, length: int) -> int | str:
    """munmap: 0, or EINVAL for an unaligned start or an empty range."""
    if start & (PAGE_SIZE - 1) or length <= 0 or start + length > TASK_SIZE:
        return "EINVAL"
    end = start + page_align(length)
    mm = task.mm
    await mm.mmap_lock.down_write("do_vmi_munmap")
    try:
        victims = []
        for vma in vmas_in(mm, start, end):  # vm_ops->may_split, before any change
            for cut in (start, end):
                if vma.flags & VM_HUGETLB and vma.start < cut < vma.end:
                    if hugetlb_resv.hugetlb_vm_op_split(vma, cut):
                        return "EINVAL"
        for vma in vmas_in(mm, start, end):
            if vma.start < start:
                vma = await split_vma(m, vma, start)
            if vma.end > end:
                await split_vma(m, vma, end)
            victims.append(vma)
        if victims:
            for v in victims:
                mm.vmas.remove(v)
            await unmap_region(m, mm, victims, start, end)
        return 0
    finally:
        await mm.mmap_lock.up_write()


async def exit_mmap(m, mm: MmStruct) -> None:
    """exit_mmap: unmap everything, free every table, drop the huge zero reference."""
    await khugepaged.khugepaged_exit(m, mm)
    await mm.mmap_lock.down_write("exit_mmap")
    victims = list(mm.vmas)
    mm.vmas.clear()
    await unmap_region(m, mm, victims, 0, TASK_SIZE)
    huge_memory.mm_put_huge_zero_folio(m, mm)
    await mm.mmap_lock.up_write()
    # the mm has no tables from here (mm_free_pgd): the PGD's free takes points
    pgd, mm.pgd = mm.pgd, -1
    await m.pte_free(mm, pgd)
