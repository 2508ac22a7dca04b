"""The page cache: an address_space's index -> folio map. mm/filemap.c.

``AddressSpace`` is struct address_space reduced to what shmem needs: ``i_pages`` (the
xarray, modelled as a dict holding one entry per page index, so a large folio occupies
every index it covers, as a multi-index xarray entry does), ``nrpages``, ``i_mmap``
(the VMAs mapping the file: the rmap of page-cache folios) with its ``i_mmap_rwsem``,
and the ``invalidate_lock``.

The page cache holds one reference per page of each folio it contains
(``filemap_add_folio`` adds ``folio_nr_pages``, as 6.18 does); a page-cache folio has
``folio.mapping`` set and ``folio.index`` its first page offset in the file.
Changes of ``i_pages`` happen between two points under the ``i_pages`` lock (the
xa_lock), so a lookup never sees half a folio.
"""

from __future__ import annotations

from kmm import atomic, swap
from kmm.mm_types import PG_dirty, PG_lru, PG_swapbacked, PG_uptodate, Page


class AddressSpace:
    """struct address_space of one inode."""

    __slots__ = ("id", "host", "i_pages", "nrpages", "i_mmap", "i_mmap_rwsem",
                 "invalidate_lock", "i_pages_lock", "swapped")

    def __init__(self, m, id: int, host) -> None:
        self.id = id
        self.host = host                      # the inode (shmem.ShmemInode)
        self.i_pages: dict[int, int] = {}     # page index -> head pfn of the folio there
        self.nrpages = 0
        # shmem swap entries (xa_is_value in i_pages): index -> (first slot's entry,
        # order written at, first index); kept apart from the folios for clarity
        self.swapped: dict[int, tuple[int, int, int]] = {}
        self.i_mmap: list = []                # VMAs mapping this file (interval tree)
        self.i_mmap_rwsem = m.locks.rwsem("i_mmap_rwsem", f"i_mmap_rwsem:{id}")
        self.invalidate_lock = m.locks.rwsem("invalidate_lock", f"invalidate_lock:{id}")
        self.i_pages_lock = m.locks.spinlock("i_pages", f"i_pages:{id}")

    def __repr__(self) -> str:
        return f"<mapping {self.id} nrpages={self.nrpages}>"


def filemap_get_entry(m, mapping: AddressSpace, index: int) -> Page | None:
    """filemap_get_entry without the reference: the folio covering index, or None
    (a lockless xarray walk; callers that keep the folio take a reference next)."""
    pfn = mapping.i_pages.get(index)
    return None if pfn is None else m.physmem.page(pfn)


async def folio_try_get(m, folio: Page) -> bool:
    """folio_try_get (kmm.atomic): a reference unless the count is frozen at zero."""
    return await atomic.folio_try_get(m, folio)


async def filemap_get_folio(m, mapping: AddressSpace, index: int) -> Page | None:
    """filemap_get_entry: the folio at index with a reference, or None. Lockless: a
    frozen folio (being split) is looked up again, and so is one that left the index
    between the lookup and the reference (xas_reload)."""
    while True:
        pfn = mapping.i_pages.get(index)
        if pfn is None:
            return None
        folio = m.physmem.page(pfn)
        if not await folio_try_get(m, folio):
            continue
        if mapping.i_pages.get(index) == folio.pfn:
            return folio
        await swap.folio_put(m, folio)


def range_has_entry(mapping: AddressSpace, start: int, end: int) -> bool:
    """xa_find(i_pages, start..end-1, XA_PRESENT): anything (a folio or a swap entry)
    in [start, end)?"""
    if mapping.swapped and any(start <= i < end for i in mapping.swapped):
        return True
    pages = mapping.i_pages
    if end - start > len(pages):
        return any(start <= i < end for i in pages)
    return any(i in pages for i in range(start, end))


def folios_in_range(m, mapping: AddressSpace, start: int, end: int) -> list[Page]:
    """find_get_entries / filemap_get_folios: the folios overlapping [start, end), in
    index order, each once (no references taken: the caller takes what it keeps)."""
    pages = mapping.i_pages
    seen: dict[int, None] = {}
    if end - start > len(pages):
        idx = sorted(i for i in pages if start <= i < end)
    else:
        idx = [i for i in range(start, end) if i in pages]
    for i in idx:
        seen.setdefault(pages[i], None)
    return [m.physmem.page(pfn) for pfn in seen]


async def filemap_add_folio(m, mapping: AddressSpace, folio: Page, index: int,
                            expected: tuple | None = None) -> bool:
    """__filemap_add_folio (shmem_add_to_page_cache): insert a locked new folio at
    index, taking nr_pages references; False (-EEXIST) if any index it would cover is
    taken. With ``expected`` (a swapped-in folio: the swap entry it replaces), every
    index must still hold that entry instead, and the entries go in the same section
    (xas_find_conflict): a truncation or another swap-in that took one meanwhile makes
    it False. Counts NR_SHMEM (and NR_SHMEM_THPS for a PMD-size folio)."""
    nr = folio.nr_pages
    await mapping.i_pages_lock.lock("filemap_add_folio")
    if expected is None:
        taken = range_has_entry(mapping, index, index + nr)
    else:
        taken = any(mapping.swapped.get(i) != expected or i in mapping.i_pages
                    for i in range(index, index + nr))
    if taken:
        await mapping.i_pages_lock.unlock()
        return False
    await atomic.folio_ref_add(m, folio, nr)
    atomic.folio_set_field_locked(folio, "mapping", mapping)  # i_pages lock held
    atomic.folio_set_field_locked(folio, "index", index)
    atomic.folio_set_flags_locked(folio, PG_swapbacked)
    for i in range(index, index + nr):
        # one store per index (xas_store): a lockless lookup sees the swap entry or
        # the folio, never neither
        if expected is not None:
            del mapping.swapped[i]
        mapping.i_pages[i] = folio.pfn
    mapping.nrpages += nr
    shmem_stat(m, folio, +1)
    await mapping.i_pages_lock.unlock()
    return True


def shmem_stat(m, folio: Page, sign: int) -> None:
    """NR_SHMEM and NR_SHMEM_THPS (meminfo Shmem, ShmemHugePages) for one folio."""
    from kmm.pgtable import HPAGE_PMD_ORDER
    m.vmstat.mod_node_page_state("nr_shmem", sign * folio.nr_pages)
    if folio.order == HPAGE_PMD_ORDER:
        m.vmstat.mod_node_page_state("nr_shmem_hugepages", sign * folio.nr_pages)


async def filemap_remove_folio(m, folio: Page) -> None:
    """filemap_remove_folio: take an unmapped, locked folio out of its mapping and drop
    the page cache's references (the caller still holds its own)."""
    mapping = folio.mapping
    await mapping.i_pages_lock.lock("__filemap_remove_folio")
    __filemap_remove_folio(m, folio)
    await mapping.i_pages_lock.unlock()
    await swap.folio_put(m, folio, folio.nr_pages)  # filemap_free_folio: the cache's refs


def __filemap_remove_folio(m, folio: Page) -> None:
    """page_cache_delete: clear the folio's indices. Context: i_pages lock held."""
    mapping = folio.mapping
    for i in range(folio.index, folio.index + folio.nr_pages):
        if mapping.i_pages.get(i) == folio.pfn:
            del mapping.i_pages[i]
    mapping.nrpages -= folio.nr_pages
    shmem_stat(m, folio, -1)
    atomic.folio_set_field_locked(folio, "mapping", None)
    atomic.folio_clear_flags_locked(folio, PG_dirty | PG_uptodate)


def folio_on_lru(folio: Page) -> bool:
    return bool(folio.flags & PG_lru)
