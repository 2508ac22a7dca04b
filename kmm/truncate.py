"""Truncation and hole punching of shmem files, and the split of page-cache folios.
mm/truncate.c, mm/shmem.c (shmem_setattr, shmem_fallocate, shmem_undo_range) and the
file side of mm/huge_memory.c's __folio_split.

Every mapper goes first: ``unmap_mapping_range`` zaps the range in each VMA of the
file's i_mmap (a huge PMD only partly inside is split, i.e. zapped whole:
``thp_split_pmd``), and a punch hole keeps a private mapping's COW copies (even_cows
false) where a shrinking truncate drops them too. Then ``shmem_undo_range`` removes the
folios wholly inside the range, and ``truncate_inode_partial_folio`` zeroes the part
of a folio the range cuts, splits a large one (``thp_split_page``) and drops the pages
that fell inside. New faults cannot map a folio meanwhile: they map under the folio
lock, which truncation holds, and recheck ``folio.mapping``.

The split (``try_folio_split_to_order``) is non-uniform as in 6.18: the folio is halved
and only the half holding the cut is halved again, leaving folios of orders 0, 0, 1, 2,
..., order-1 around it; then the folio holding the page at offset+length is cut there
too, so the folios inside the range can be dropped whole. A folio in the swap cache is
split uniformly to order 0, and so is every page-cache split asked for through
``__folio_split`` (reclaim). Each split counts the old order's mTHP ``split`` (and
``thp_split_page`` at PMD order), which the host recordings pin
(memfd_punch_hole_then_write: one 2 MiB split and one 64 KiB split).

Deviation from 6.18: shmem_undo_range's last pass restarts whenever a folio it split
changed order (6.18 restarts only when the folio left to it is order 0 and otherwise
goes on from the next index); the same folios end up dropped.
"""

from __future__ import annotations

from kmm import atomic, filemap, memory_zap, swap
from kmm.mm_types import (
    PG_active, PG_dirty, PG_head, PG_isolated, PG_referenced, PG_swapbacked,
    PG_uptodate, Page,
)
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE

EAGAIN, EBUSY, EINVAL = 11, 16, 22


# ---------------------------------------------------------------- unmapping
async def unmap_mapping_range(m, mapping, holebegin: int, holelen: int,
                              even_cows: bool) -> None:
    """unmap_mapping_range: zap [holebegin, holebegin+holelen) of the file (holelen 0:
    to the end) in every VMA mapping it. Context: takes i_mmap_rwsem for read, then
    the page-table locks."""
    first = holebegin >> PAGE_SHIFT
    last = (1 << 62) if holelen == 0 else first + ((holelen + PAGE_SIZE - 1) >> PAGE_SHIFT)
    await unmap_mapping_pages(m, mapping, first, last, even_cows)


async def unmap_mapping_pages(m, mapping, first: int, last: int, even_cows: bool) -> None:
    """unmap_mapping_pages: file pages [first, last) out of every mapper's tables."""
    lk = mapping.i_mmap_rwsem
    await lk.down_read("unmap_mapping_pages")
    for vma in list(mapping.i_mmap):
        vfirst = vma.pgoff
        vlast = vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT)
        lo, hi = max(first, vfirst), min(last, vlast)
        if lo >= hi:
            continue
        start, end = vma.address_of(lo), vma.address_of(hi)
        tlbg = memory_zap.MmuGather(vma.mm, even_cows)  # zap_page_range_single
        tlbg.i_mmap_locked = True  # the VMA is kept alive by i_mmap_rwsem
        await memory_zap.unmap_page_range(m, tlbg, vma, start, end)
        await tlbg.finish(m)
    await lk.up_read()


async def unmap_mapping_folio(m, folio: Page) -> None:
    """unmap_mapping_folio: the folio's pages out of every mapper (COWs stay)."""
    await unmap_mapping_pages(m, folio.mapping, folio.index, folio.index + folio.nr_pages,
                              False)


# ------------------------------------------------------------------ removal
async def truncate_inode_folio(m, mapping, folio: Page) -> None:
    """truncate_inode_folio: unmap a locked folio and take it out of the page cache.
    Context: folio locked, the caller holds a reference."""
    if folio.mapping is not mapping:
        return
    from kmm import rmap
    if rmap.folio_mapped(folio):  # truncate_cleanup_folio
        await unmap_mapping_folio(m, folio)
    atomic.folio_clear_flags_locked(folio, PG_dirty)  # folio locked
    await filemap.filemap_remove_folio(m, folio)


def _zero(m, folio: Page, offset: int, length: int) -> None:
    """folio_zero_range: bytes [offset, offset+length) of the folio read zero."""
    pm = m.physmem
    while length > 0:
        pfn = folio.pfn + (offset >> PAGE_SHIFT)
        off = offset & (PAGE_SIZE - 1)
        n = min(length, PAGE_SIZE - off)
        if n == PAGE_SIZE:
            pm.clear(pfn)
        elif not pm.is_zero(pfn):
            pm.write(pfn, off, bytes(n))
        offset += n
        length -= n


async def truncate_inode_partial_folio(m, folio: Page, lstart: int, lend: int) -> bool:
    """truncate_inode_partial_folio: the part of the folio inside [lstart, lend] is
    zeroed; a large folio is then split so its pages inside can go. True when done
    (the folio dropped, or split), False when the folio stays as it is (zeroed).
    Context: folio locked, reference held."""
    pos = folio.index << PAGE_SHIFT
    size = folio.nr_pages << PAGE_SHIFT
    offset = lstart - pos if pos < lstart else 0
    length = size - offset if pos + size <= lend + 1 else lend + 1 - pos - offset
    if length == size:
        await truncate_inode_folio(m, folio.mapping, folio)
        return True
    _zero(m, folio, offset, length)
    if not folio.order:
        return True
    base = folio.pfn  # the pages stay where they are whatever the split makes of them
    split_at = base + (offset >> PAGE_SHIFT)
    if await try_folio_split_to_order(m, folio, split_at, 0) == 0:
        # a second cut at offset+length, so that the folios inside the range can go
        # whole (no large folio straddling its end is left to pin them)
        if offset + length == size:
            return True
        split_at2 = base + ((offset + length) >> PAGE_SHIFT)
        folio2 = m.physmem.folio(split_at2)
        if not await filemap.folio_try_get(m, folio2):
            return True
        lk2 = m.folio_lock_of(folio2)
        if await lk2.trylock("truncate_inode_partial_folio"):
            if folio2.order and folio2.mapping is folio.mapping:
                await try_folio_split_to_order(m, folio2, split_at2, 0)  # result unused
            await lk2.unlock()
        await swap.folio_put(m, folio2)
        return True
    if folio.flags & PG_dirty:
        return False
    await truncate_inode_folio(m, folio.mapping, folio)
    return True


async def _lock_get(m, mapping, index: int) -> Page | None:
    """shmem_get_partial_folio / find_lock_entries for one index: the folio there,
    locked and with a reference, still in the mapping; else None."""
    while True:
        folio = await filemap.filemap_get_folio(m, mapping, index)
        if folio is None:
            return None
        lk = m.folio_lock_of(folio)
        await lk.lock("shmem_undo_range")
        if folio.mapping is mapping and folio.index <= index < folio.index + folio.nr_pages:
            return folio
        await lk.unlock()
        await swap.folio_put(m, folio)


async def shmem_get_partial_folio(m, inode, index: int) -> Page | None:
    """shmem_get_partial_folio: the folio at index for the truncation's partial ends,
    locked and with a reference; a swapped-out one (a large swap entry only partly
    inside the range) is read back first, so it can be zeroed and split. None: a
    hole, or no memory to read the entry back into (shmem_get_folio's error: the
    partial step is skipped)."""
    from kmm import shmem
    while True:
        folio = await _lock_get(m, inode.mapping, index)
        if folio is not None or index not in inode.mapping.swapped:
            return folio
        folio = await shmem.shmem_swapin_folio(m, inode, index, None, 0)
        if isinstance(folio, str):
            return None
        if folio is not None:
            return folio  # locked, with a reference, in the page cache
        # a racing swap-in or truncation took the entry: look again


async def _unlock_put(m, folio: Page) -> None:
    await m.folio_lock_of(folio).unlock()
    await swap.folio_put(m, folio)


async def shmem_undo_range(m, inode, lstart: int, lend: int | None) -> None:
    """shmem_undo_range: drop the page cache of [lstart, lend] (lend None: to the end),
    partial folios at the ends zeroed and split."""
    mapping = inode.mapping
    if lend is None:
        lend = (1 << 62) - 1
    start = (lstart + PAGE_SIZE - 1) >> PAGE_SHIFT
    end = (lend + 1) >> PAGE_SHIFT
    from kmm import shmem
    for index in sorted(i for i in mapping.swapped if start <= i < end):
        # swapped-out pages of the range: a large entry only when all of it is inside
        # (find_lock_entries omits one that begins before start or ends beyond end; the
        # partial folio below reads it back, to be zeroed and split)
        await shmem.shmem_free_swap(m, mapping, index, start, end)
    # whole folios inside [start, end)
    for folio in filemap.folios_in_range(m, mapping, start, end):
        if folio.index < start or folio.index + folio.nr_pages > end:
            continue
        folio = await _lock_get(m, mapping, folio.index)
        if folio is None:
            continue
        if folio.index >= start and folio.index + folio.nr_pages <= end:
            await truncate_inode_folio(m, mapping, folio)
        await _unlock_put(m, folio)
    # the partial folios at either end
    same_folio = (lstart >> PAGE_SHIFT) == (lend >> PAGE_SHIFT)
    folio = await shmem_get_partial_folio(m, inode, lstart >> PAGE_SHIFT)
    if folio is not None:
        same_folio = lend < ((folio.index + folio.nr_pages) << PAGE_SHIFT)
        atomic.folio_set_flags_locked(folio, PG_dirty)  # folio_mark_dirty, folio locked
        if not await truncate_inode_partial_folio(m, folio, lstart, lend):
            start = folio.index + folio.nr_pages
            if same_folio:
                end = folio.index
        await _unlock_put(m, folio)
    if not same_folio and lend < (1 << 62) - 1:
        folio = await shmem_get_partial_folio(m, inode, lend >> PAGE_SHIFT)
        if folio is not None:
            atomic.folio_set_flags_locked(folio, PG_dirty)  # folio_mark_dirty, folio locked
            if not await truncate_inode_partial_folio(m, folio, lstart, lend):
                end = folio.index
            await _unlock_put(m, folio)
    # whole_folios: what the split left inside the range
    while start < end:
        again = False
        for folio in filemap.folios_in_range(m, mapping, start, end):
            folio = await _lock_get(m, mapping, max(folio.index, start))
            if folio is None:
                continue
            was = folio.order
            if not was:
                await truncate_inode_folio(m, mapping, folio)
            elif (await truncate_inode_partial_folio(m, folio, lstart, lend)
                  and folio.order != was):
                again = True  # split: pick up the new smaller folios
            await _unlock_put(m, folio)
            if again:
                break
        if not again:
            break


async def truncate_inode_pages_range(m, mapping, lstart: int, lend: int | None) -> None:
    """truncate_inode_pages_range (shmem_truncate_range)."""
    await shmem_undo_range(m, mapping.host, lstart, lend)


async def shmem_setattr_size(m, inode, newsize: int) -> int | str:
    """ftruncate: shmem_setattr's size change. Shrinking unmaps everything beyond the
    new end (COW copies too) and truncates the page cache there. Context: takes
    i_rwsem for write."""
    if newsize < 0:
        return "EINVAL"
    await inode.i_rwsem.down_write("shmem_setattr")
    old = inode.i_size
    inode.i_size = newsize
    if newsize < old:
        holebegin = (newsize + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        await unmap_mapping_range(m, inode.mapping, holebegin, 0, True)
        await shmem_undo_range(m, inode, newsize, None)
        await unmap_mapping_range(m, inode.mapping, holebegin, 0, True)
    await inode.i_rwsem.up_write()
    return 0


async def shmem_fallocate_punch_hole(m, inode, offset: int, length: int) -> int | str:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): shmem_fallocate's hole. Context: takes i_rwsem
    and the mapping's invalidate_lock for write."""
    if offset < 0 or length <= 0:
        return "EINVAL"
    await inode.i_rwsem.down_write("shmem_fallocate")
    await inode.mapping.invalidate_lock.down_write("shmem_fallocate")
    unmap_start = (offset + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    unmap_end = ((offset + length) & ~(PAGE_SIZE - 1)) - 1
    if unmap_end > unmap_start:
        await unmap_mapping_range(m, inode.mapping, unmap_start,
                                  1 + unmap_end - unmap_start, False)
    await shmem_undo_range(m, inode, offset, offset + length - 1)
    await inode.mapping.invalidate_lock.up_write()
    await inode.i_rwsem.up_write()
    return 0


# ------------------------------------------------------- page-cache split
def split_layout(head: int, order: int, split_at: int | None) -> list[tuple[int, int]]:
    """The (pfn, order) of the folios __split_unmapped_folio makes of a folio of this
    order: uniform (split_at None) every page alone; non-uniform the folio is halved,
    and only the half holding split_at is halved again, down to order 0, which leaves
    orders 0, 0, 1, 2, ..., order-1 around split_at. In pfn order."""
    if split_at is None:
        return [(p, 0) for p in range(head, head + (1 << order))]
    out = []
    lo = head
    for o in range(order - 1, -1, -1):
        half = 1 << o
        if split_at < lo + half:
            out.append((lo + half, o))  # the upper half stays whole
        else:
            out.append((lo, o))
            lo += half
    out.append((lo, 0))
    return sorted(out)


def non_uniform_split_supported(folio: Page) -> bool:
    """non_uniform_split_supported: not for a folio in the swap cache (shmem's swap
    cache is split uniformly); a shmem mapping takes folios of any order."""
    from kmm.mm_types import PG_swapcache
    return not folio.flags & PG_swapcache


async def try_folio_split_to_order(m, folio: Page, split_at: int, new_order: int) -> int:
    """try_folio_split_to_order: folio_split (non-uniform, at the page split_at, the
    caller's lock and reference kept on the folio of the old head) when the folio
    allows it, else a uniform split to new_order."""
    if not non_uniform_split_supported(folio):
        return await split_file_folio(m, folio, new_order)
    return await split_file_folio(m, folio, new_order, split_at)


async def split_file_folio(m, folio: Page, new_order: int,
                           split_at: int | None = None) -> int:
    """__folio_split of a page-cache folio to order 0, uniformly (split_at None) or
    non-uniformly at the page split_at: every mapping is removed first (unmap_folio:
    try_to_unmap, a PMD zapped), the references frozen (only the page cache's and the
    caller's may remain: -EAGAIN otherwise), then the new folios take the old one's
    place in the page cache and on the LRU, beside the old head, which keeps the
    caller's lock and reference. Counts the old order's mTHP split / split_failed,
    and thp_split_page / thp_split_page_failed for a PMD-size folio.
    Context: folio locked, caller's reference held; takes i_mmap_rwsem (read), the
    i_pages lock and the lru lock."""
    from kmm import huge_memory_mthp, rmap
    if new_order != 0 or not folio.order:
        return -EINVAL
    mapping = folio.mapping
    if mapping is None:
        return -EBUSY
    order = folio.order
    if rmap.folio_mapped(folio):
        await unmap_mapping_folio(m, folio)  # unmap_folio
    await mapping.i_mmap_rwsem.down_read("__folio_split")
    await mapping.i_pages_lock.lock("__folio_split")
    isolated = 1 if folio.flags & PG_isolated else 0
    ok = (not rmap.folio_mapped(folio)
          and folio.refcount == folio.nr_pages + 1 + isolated)
    if ok:
        atomic.folio_ref_freeze_locked(folio)  # folio_ref_freeze: lookups now retry
        await _split_locked(m, folio, split_layout(folio.pfn, order, split_at))
    await mapping.i_pages_lock.unlock()
    await mapping.i_mmap_rwsem.up_read()
    if order == HPAGE_PMD_ORDER:
        m.vmstat.count_vm_event("thp_split_page" if ok else "thp_split_page_failed")
    huge_memory_mthp.count_mthp_stat(m, order, "split" if ok else "split_failed")
    await m.sched.point("mm_split_huge_page", pfn=folio.pfn, ret=0 if ok else -EAGAIN)
    return 0 if ok else -EAGAIN


async def _split_locked(m, folio: Page, layout: list[tuple[int, int]]) -> None:
    """__split_unmapped_folio + the page-cache side of __folio_split: the new folios
    of the layout, each with its page-cache references (one a page; the old head's
    keeps the caller's too), at their indices; NR_SHMEM(_THPS) follow the new orders.
    Context: i_pages lock held, refs frozen."""
    head, nr, index, mapping = folio.pfn, folio.nr_pages, folio.index, folio.mapping
    filemap.shmem_stat(m, folio, -1)
    lk = m.lruvec.lru_lock
    await lk.lock("__folio_split")
    order = swap.lruvec_del_folio_for_split(m, folio)
    keep = folio.flags & (PG_dirty | PG_swapbacked | PG_active | PG_referenced
                          | PG_uptodate | PG_isolated)
    pm = m.physmem
    new = []
    for start, o in layout:  # __split_folio_to_order, on the frozen folio
        n = 1 << o
        for p in range(start + 1, start + n):  # the tails point at their new head
            atomic.init_page(pm.page(p), head=start, order=0, flags=0, refcount=0,
                             mapping=None, index=0, entire_mapcount=0, large_mapcount=0,
                             nr_pages_mapped=0, on_deferred_list=False)
        folio_ = atomic.init_page(
            pm.page(start), head=start, order=o, flags=keep | (PG_head if o else 0),
            mapping=mapping, index=index + start - head, entire_mapcount=0,
            large_mapcount=0, nr_pages_mapped=0, on_deferred_list=False,
            refcount=n + (start == head))  # the page cache's; the old head: the caller's
        for i in range(folio_.index, folio_.index + n):
            mapping.i_pages[i] = start
        new.append(folio_)
    for folio_ in new:
        filemap.shmem_stat(m, folio_, +1)
    if order is not None:  # the new folios take the old head's place
        swap.lru_add_split_folio(m, order, head, new)
    elif keep & PG_isolated:
        for folio_ in new[1:]:
            atomic.folio_clear_flags_locked(folio_, PG_isolated)
            swap.lruvec_add_folio(m, folio_)
    await lk.unlock()
    await m.sched.point("__split_unmapped_folio", pfn=head, nr=nr)
