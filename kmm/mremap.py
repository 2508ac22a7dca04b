"""mremap of anonymous private memory to a fixed place: mm/mremap.c.

``do_mremap`` with MREMAP_MAYMOVE | MREMAP_FIXED, the form the khugepaged selftest's
collapse_compound_extreme uses: unmap the destination, shrink the source if the new
length is smaller, then ``move_vma``: a copy of the VMA at the new place (same anon_vma,
page offset kept, so the rmap finds the moved pages), ``move_page_tables`` moving PTEs
(``move_ptes``) and whole huge PMDs with their deposited table (``move_huge_pmd``;
a huge PMD the move covers only partly is split first), and the old range unmapped.
A new length above the old grows the new VMA; the grown part starts empty. hugetlb
VMAs: kmm.hugetlb_mremap (aligned, never grown, entries moved whole). Left out:
in-place resizing (no MREMAP_FIXED), MREMAP_DONTUNMAP, accounting, mlock, uffd.
"""

from __future__ import annotations

from kmm import (
    atomic, huge_memory, hugetlb_mremap, hugetlb_resv, memory, mmap, pgtable_generic as pgg, rmap,
    tlb,
)
from kmm.mm_types import VmArea
from kmm.pgtable import (
    PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, TASK_SIZE, is_swap_pmd, pmd_index, pmd_none,
    pmd_trans_huge, pte_index, pte_none, pte_present,
)


async def do_mremap(m, task, addr: int, old_len: int, new_len: int,
                    new_addr: int) -> int | str:
    """mremap(addr, old_len, new_len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr): the new
    address, or an errno name (EINVAL for bad or overlapping ranges, EFAULT when the
    source is not one mapped VMA). Context: takes the mmap lock for write."""
    if addr & (PAGE_SIZE - 1) or new_addr & (PAGE_SIZE - 1):
        return "EINVAL"
    old_len, new_len = mmap.page_align(old_len), mmap.page_align(new_len)
    if not new_len or new_len > TASK_SIZE - new_addr or old_len > TASK_SIZE - addr:
        return "EINVAL"
    if addr < new_addr + new_len and new_addr < addr + old_len:  # mremap_to: overlap
        return "EINVAL"
    mm = task.mm
    await mm.mmap_lock.down_write("do_mremap")
    try:
        vma = mm.vma_lookup(addr)
        if vma is not None and vma.hugetlb_file is not None:
            err = hugetlb_mremap.hugetlb_mremap_check(vma, addr, old_len, new_len, new_addr)
            size = vma.hugetlb_file.hstate.size
            if err is None and (old_len | new_len) & (size - 1):
                # the shrink or the unmap would cut a huge page: vm_ops->may_split
                err = "EINVAL"
            if err is not None:
                return err
        await munmap_locked(m, mm, new_addr, new_addr + new_len)
        if old_len > new_len:
            await munmap_locked(m, mm, addr + new_len, addr + old_len)
            old_len = new_len
        vma = mm.vma_lookup(addr)  # vma_to_resize
        if vma is None or old_len > vma.end - addr:
            return "EFAULT"
        await move_vma(m, vma, addr, old_len, new_len, new_addr)
        return new_addr
    finally:
        await mm.mmap_lock.up_write()


async def munmap_locked(m, mm, start: int, end: int) -> None:
    """do_vmi_munmap with the mmap write lock already held (mremap holds it across)."""
    victims = []
    for vma in mmap.vmas_in(mm, start, end):
        if vma.start < start:
            vma = await mmap.split_vma(m, vma, start)
        if vma.end > end:
            await mmap.split_vma(m, vma, end)
        victims.append(vma)
    if victims:
        for v in victims:
            mm.vmas.remove(v)
        await mmap.unmap_region(m, mm, victims, start, end)


async def move_vma(m, vma: VmArea, old_addr: int, old_len: int, new_len: int,
                   new_addr: int) -> None:
    """move_vma: the VMA's part at old_addr becomes a VMA of new_len at new_addr with
    the same page offset (copy_vma), its page tables move, the old part is unmapped."""
    mm = vma.mm
    new_pgoff = vma.pgoff + ((old_addr - vma.start) >> PAGE_SHIFT)
    new_vma = VmArea(mm, new_addr, new_addr + new_len, vma.flags, new_pgoff)  # copy_vma
    new_vma.vm_policy = vma.vm_policy
    rmap.anon_vma_clone(new_vma, vma)
    if vma.hugetlb_file is not None:  # vm_area_dup: the file, the VMA lock or resv map
        hugetlb_resv.hugetlb_vma_copy(m, new_vma, vma, fork=False)
    mm.vmas.append(new_vma)
    mm.vmas.sort(key=lambda v: v.start)
    await m.sched.point("copy_vma", mm=mm.id, start=new_addr, end=new_addr + new_len)
    if vma.hugetlb_file is not None:
        await hugetlb_mremap.move_hugetlb_page_tables(m, vma, new_vma, old_addr, new_addr,
                                                      old_len)
        hugetlb_mremap.clear_vma_resv_huge_pages(vma)
    else:
        await move_page_tables(m, vma, old_addr, new_vma, new_addr, old_len)
    mmap.vma_merge_around(mm, new_vma)
    await munmap_locked(m, mm, old_addr, old_addr + old_len)


async def move_page_tables(m, vma: VmArea, old_addr: int, new_vma: VmArea, new_addr: int,
                           length: int) -> None:
    """move_page_tables: extent by extent (up to the next PMD boundary of either side),
    a huge PMD moves whole when the extent is a whole aligned PMD, else it is split and
    its PTEs move. Context: mmap lock held for write; takes the anon_vma lock (the
    kernel's take_rmap_locks) so no rmap walk sees a page in neither place."""
    mm = vma.mm
    anon = vma.anon_vma.root.rwsem if vma.anon_vma is not None else None
    if anon is not None:
        await anon.down_write("move_page_tables")
    try:
        done = 0
        while done < length:
            old, new = old_addr + done, new_addr + done
            extent = min(PMD_SIZE - (old & (PMD_SIZE - 1)), PMD_SIZE - (new & (PMD_SIZE - 1)),
                         length - done)
            old_pmd = memory.pmd_lookup(m, mm, old)
            if old_pmd < 0:
                done += extent
                continue
            oidx = pmd_index(old)
            pmdval = await atomic.entry_read(m, "pmd", old_pmd, oidx)
            if pmd_none(pmdval):
                done += extent
                continue
            new_pmd = await memory.pmd_alloc(m, mm, new)
            if new_pmd < 0:
                m.bug("move_page_tables: out of memory for a page table")
            if pmd_trans_huge(pmdval) or is_swap_pmd(pmdval):
                if extent == PMD_SIZE and await move_huge_pmd(m, vma, old, new, old_pmd,
                                                               new_pmd):
                    done += extent
                    continue
                await huge_memory.__split_huge_pmd(m, vma, old_pmd, oidx, old, freeze=False)
            nidx = pmd_index(new)
            if pmd_none(await atomic.entry_read(m, "pmd", new_pmd, nidx)):
                if not await memory.__pte_alloc(m, mm, new_pmd, nidx):
                    m.bug("move_page_tables: out of memory for a page table")
            await move_ptes(m, vma, old_pmd, old, old + extent, new_pmd, new)
            done += extent
    finally:
        if anon is not None:
            await anon.up_write()


async def move_ptes(m, vma: VmArea, old_pmd: int, old_addr: int, old_end: int,
                    new_pmd: int, new_addr: int) -> None:
    """move_ptes: each entry moves from the old table to the new one, under both PTE
    locks (the new one nested); the old range is flushed before the locks drop."""
    res = await memory.pte_offset_map_lock(m, old_pmd, pmd_index(old_addr))
    if res is None:
        return
    otbl, optl = res
    nres = await memory.pte_offset_map_lock(m, new_pmd, pmd_index(new_addr), subclass=1)
    if nres is None:
        await optl.unlock()
        return
    ntbl, nptl = nres
    same = nptl is optl
    if same:  # one table: the nested lock is the same lock
        await nptl.unlock()
    flush = False
    a, n = old_addr, new_addr
    while a < old_end:
        ent = await atomic.entry_read(m, "pte", otbl, pte_index(a))
        if not pte_none(ent):
            await atomic.entry_get_and_clear(m, "pte", otbl, pte_index(a))  # ptep_get_and_clear
            flush = flush or pte_present(ent)
            await atomic.entry_set(m, "pte", ntbl, pte_index(n), ent)
        a += PAGE_SIZE
        n += PAGE_SIZE
    if flush:
        await tlb.flush_tlb_mm_range(m, vma.mm, old_addr, old_end)
    if not same:
        await nptl.unlock()
    await optl.unlock()


async def move_huge_pmd(m, vma: VmArea, old_addr: int, new_addr: int, old_pmd: int,
                        new_pmd: int) -> bool:
    """move_huge_pmd: a whole huge PMD (and its deposited table) moves to an empty PMD
    slot. False if the PMD is no longer huge or the slot is taken."""
    mm = vma.mm
    oidx, nidx = pmd_index(old_addr), pmd_index(new_addr)
    if not pmd_none(await atomic.entry_read(m, "pmd", new_pmd, nidx)):
        return False
    optl, nptl = m.table_lock(old_pmd), m.table_lock(new_pmd)
    await optl.lock("move_huge_pmd")
    if nptl is not optl:
        await nptl.lock("move_huge_pmd", subclass=1)
    cur = await atomic.entry_read(m, "pmd", old_pmd, oidx)
    moved = pmd_trans_huge(cur) or is_swap_pmd(cur)
    if moved:
        pmd = await pgg.pmdp_huge_clear_flush(m, vma, old_addr, old_pmd, oidx)
        table = await pgg.pgtable_trans_huge_withdraw(m, mm, old_pmd)
        await pgg.pgtable_trans_huge_deposit(m, mm, new_pmd, table)
        await atomic.entry_set(m, "pmd", new_pmd, nidx, pmd)
    if nptl is not optl:
        await nptl.unlock()
    await optl.unlock()
    return moved
