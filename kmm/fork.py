"""fork and exit of an mm: kernel/fork.c dup_mm / dup_mmap, mmput.

``dup_mmap`` copies every VMA, links the child into the parent's anon_vma chains and
copies the page tables (``copy_page_range``: private writable pages become read-only in
both, huge PMDs are shared with a fresh deposited table); the parent's TLBs are flushed
before its mmap_lock is released, as the kernel does.
"""

from __future__ import annotations

from kmm import hugetlb_resv, khugepaged, memory, mmap, rmap, shmem, tlb
from kmm.mm_types import VM_HUGETLB, VmArea


async def dup_mmap(m, mm, oldmm) -> bool:
    """dup_mmap: False when memory ran out (the child is then torn down)."""
    await oldmm.mmap_lock.down_write("dup_mmap")
    await mm.mmap_lock.down_write("dup_mmap", subclass=1)  # SINGLE_DEPTH_NESTING
    ok = True
    try:
        for vma in oldmm.vmas:
            new = VmArea(mm, vma.start, vma.end, vma.flags, vma.pgoff)
            new.vm_policy = vma.vm_policy  # vma_dup_policy
            if vma.flags & VM_HUGETLB:
                hugetlb_resv.hugetlb_vma_copy(m, new, vma, fork=True)
            mm.vmas.append(new)
            if vma.vm_file is not None:  # get_file + vma_link_file
                await shmem.vma_link_file(m, new, vma.vm_file)
            rmap.anon_vma_fork(m, new, vma)
            if vma.anon_vma is not None:
                if not await memory.copy_page_range(m, new, vma):
                    ok = False
                    break
        khugepaged.khugepaged_fork(m, mm, oldmm)
    finally:
        await mm.mmap_lock.up_write()
        await tlb.flush_tlb_mm(m, oldmm)
        await oldmm.mmap_lock.up_write()
    return ok


async def copy_process(m, parent, child_name: str):
    """fork(): a new task with a copy of the parent's mm. Returns the task or an errno."""
    mm = await m.mm_alloc(child_name)
    if mm is None:
        return "ENOMEM"
    if not await dup_mmap(m, mm, parent.mm):
        await mmap.exit_mmap(m, mm)
        return "ENOMEM"
    child = m.new_task(child_name, mm)
    child.regions = dict(parent.regions)
    child.files = dict(parent.files)  # dup_fd: the child holds the memfds too
    child.mempolicy = parent.mempolicy  # mpol_dup: the child inherits the policy
    for f in child.files.values():
        shmem.ihold(f)
    return child


async def do_exit(m, task) -> None:
    """do_exit -> exit_mm -> mmput: the last user tears the mm down."""
    task.alive = False
    mm = task.mm
    mm.users -= 1
    if mm.users == 0:
        await mmap.exit_mmap(m, mm)
    files, task.files = task.files, {}
    for f in files.values():  # exit_files: close every memfd
        await shmem.iput(m, f)
