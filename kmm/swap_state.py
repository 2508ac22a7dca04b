"""The swap cache and swap-in: mm/swap_state.c (with the swap-in steps of do_swap_page).

The swap cache maps a swap slot to the folio whose contents it holds while the folio is
being written out, or was read in for a slot other page tables still reference (after
fork). A cached folio has PG_swapcache, ``folio.swap`` = its first slot as a PTE-format
swap entry, and one reference per page held by the cache (6.18 keeps nr_pages refs).
The slots carry SWAP_HAS_CACHE in swap_map. Lookups are by slot; the folio's pages are
its slots in order.

Swap-in comes in two ways, as in 6.18's do_swap_page: a synchronous device (zram) and a
slot only this PTE references skips the cache (``swapin_direct``: a new order-0 folio,
the slot claimed with SWAP_HAS_CACHE meanwhile); otherwise ``swapin_readahead`` reads
the slot into the cache, where every other page table referencing it finds it.
Left out: readahead of neighbouring slots (page_cluster is treated as 0), workingset
shadow entries, memcg charging, large-folio swap-in (6.18 swaps in only order 0 with
the default mTHP settings).
"""

from __future__ import annotations

from errno import EEXIST  # the host is Linux: the kernel's numbers

from kmm import atomic, page_alloc, page_io, swap, swapfile
from kmm.mm_types import PG_swapbacked, PG_swapcache, Page
from kmm.pgtable import swp_entry, swp_offset

JIFFY_NS = 1_000_000  # schedule_timeout_uninterruptible(1) at HZ=1000


# -------------------------------------------------------------- the cache
def __swap_cache_add_folio(m, si, folio: Page, offset: int) -> None:
    """__swap_cache_add_folio: the folio now caches slots offset.. (one per page) and
    the cache holds one reference per page. Context: cluster lock held, slots carry
    SWAP_HAS_CACHE."""
    for i in range(folio.nr_pages):
        si.cache[offset + i] = folio.pfn
    atomic.folio_set_field_locked(folio, "swap", swp_entry(si.type, offset))
    atomic.folio_set_flags_locked(folio, PG_swapcache | PG_swapbacked)
    atomic.folio_ref_add_locked(folio, folio.nr_pages)  # folio_ref_add(folio, nr), under the lock


def __swap_cache_del_folio(m, si, folio: Page) -> None:
    """__swap_cache_del_folio: forget the folio's slots (the cache's references are the
    caller's to drop). Context: cluster lock held."""
    off = swp_offset(folio.swap)
    for i in range(folio.nr_pages):
        if si.cache.pop(off + i, None) != folio.pfn:
            m.bug(f"swap cache slot {off + i} does not hold {folio!r}")
    atomic.folio_clear_flags_locked(folio, PG_swapcache)


async def swap_cache_add_folio(m, folio: Page, entry: int) -> None:
    """swap_cache_add_folio: a folio read in for ``entry`` joins the cache. Context:
    folio locked; the slot was claimed with swapcache_prepare."""
    si = m.swap_info
    off = swp_offset(entry)
    ci = si.clusters[off // swapfile.SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("swap_cache_add_folio")
    __swap_cache_add_folio(m, si, folio, off)
    await lk.unlock()


async def swap_cache_del_folio(m, folio: Page) -> None:
    """swap_cache_del_folio: the folio leaves the swap cache, its slots lose
    SWAP_HAS_CACHE (free ones go back to the device) and the cache's references are
    dropped. Context: folio locked; the caller holds a reference of its own."""
    si = m.swap_info
    entry = folio.swap
    off = swp_offset(entry)
    ci = si.clusters[off // swapfile.SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("swap_cache_del_folio")
    __swap_cache_del_folio(m, si, folio)
    await lk.unlock()
    await swapfile.put_swap_folio(m, folio, entry)
    atomic.folio_set_field_locked(folio, "swap", 0)
    await swap.folio_put(m, folio, folio.nr_pages)


async def swap_cache_get_folio(m, entry: int) -> Page | None:
    """swap_cache_get_folio: the folio caching the slot, with a reference taken
    (folio_try_get), or None."""
    si = m.swap_info
    if si is None:
        return None
    await m.sched.point("swap_cache_get_folio", entry=entry)
    pfn = si.cache.get(swp_offset(entry))
    if pfn is None:
        return None
    folio = m.physmem.page(pfn)
    if folio.refcount <= 0:
        return None
    atomic.folio_ref_add_locked(folio)  # folio_try_get, atomic with the lookup
    return folio


def folio_matches_swap_entry(folio: Page, entry: int) -> bool:
    """folio_matches_swap_entry: the folio still caches ``entry``'s slot."""
    if not folio.flags & PG_swapcache:
        return False
    off = swp_offset(folio.swap)
    return off <= swp_offset(entry) < off + folio.nr_pages


async def split_swap_cache(m, new: list[Page]) -> None:
    """__folio_split's swap cache update: each page that was part of a split swap-cache
    folio now caches its own slot. Context: cluster lock taken here; the folios are
    frozen (the split holds them)."""
    si = m.swap_info
    off = swp_offset(new[0].swap)
    ci = si.clusters[off // swapfile.SWAPFILE_CLUSTER]
    lk = si.cluster_lock(ci)
    await lk.lock("__folio_split")
    for page in new:
        si.cache[swp_offset(page.swap)] = page.pfn
    await lk.unlock()


async def free_swap_cache(m, folio: Page) -> None:
    """free_swap_cache: drop an unmapped folio from the swap cache if no page table
    references its slots (used by free_folio_and_swap_cache)."""
    from kmm import rmap
    if not folio.flags & PG_swapcache or rmap.folio_mapped(folio):
        return
    lk = m.folio_lock_of(folio)
    if await lk.trylock("free_swap_cache"):
        await swapfile.folio_free_swap(m, folio)
        await lk.unlock()


# --------------------------------------------------------------- swap-in
async def _alloc_swap_folio(m) -> Page | None:
    """alloc_swap_folio / folio_alloc_mpol: an order-0 folio for a swap-in."""
    pfn = await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "anon")
    if pfn < 0:
        return None
    return m.physmem.page(pfn)


async def swapin_direct(m, entry: int) -> Page | None | int:
    """do_swap_page's SWP_SYNCHRONOUS_IO path: read the slot into a new order-0 folio
    that never enters the swap cache. The slot is claimed (swapcache_prepare) until
    swapcache_clear, so a racing fault on the same entry backs off. Returns the folio
    (on the LRU, read, unlocked, one reference), None when out of memory, or -EEXIST
    when another swap-in holds the slot."""
    folio = await _alloc_swap_folio(m)
    if folio is None:
        return None
    lk = m.folio_lock_of(folio)
    await lk.lock("do_swap_page")  # __folio_set_locked: a new folio, uncontended
    atomic.folio_set_flags_locked(folio, PG_swapbacked)
    if await swapfile.swapcache_prepare(m, entry) < 0:
        await lk.unlock()
        await swap.folio_put(m, folio)
        return -EEXIST
    await swap.folio_add_lru(m, folio)
    atomic.folio_set_field_locked(folio, "swap", entry)  # to give swap_read_folio its slot
    await page_io.swap_read_folio(m, folio)
    atomic.folio_set_field_locked(folio, "swap", 0)
    return folio


async def __read_swap_cache_async(m, entry: int) -> Page | None:
    """__read_swap_cache_async: the folio caching ``entry``, read in if it was not
    (a new folio is added to the cache and the LRU, then read). Returns it with a
    reference for the caller, or None if the slot was freed or memory ran out."""
    while True:
        folio = await swap_cache_get_folio(m, entry)
        if folio is not None:
            return folio
        if not swapfile.__swap_count(m, entry):
            return None  # the slot was freed under us: the caller rechecks its PTE
        new = await _alloc_swap_folio(m)
        if new is None:
            return None
        lk = m.folio_lock_of(new)
        await lk.lock("__read_swap_cache_async")
        atomic.folio_set_flags_locked(new, PG_swapbacked)
        err = await swapfile.swapcache_prepare(m, entry)
        if err == 0:
            await swap_cache_add_folio(m, new, entry)
            await swap.folio_add_lru(m, new)
            await page_io.swap_read_folio(m, new)  # unlocks when read
            return new
        await lk.unlock()
        await swap.folio_put(m, new)
        if err != -EEXIST:
            return None
        # another swap-in claimed the slot and has not added its folio yet: let it
        await m.sched.sleep(JIFFY_NS)


async def swapin_readahead(m, entry: int) -> Page | None:
    """swapin_readahead: read the slot into the swap cache (no neighbours: the model's
    readahead window is one page)."""
    return await __read_swap_cache_async(m, entry)


def should_try_to_free_swap(m, folio: Page, vma, write: bool) -> bool:
    """should_try_to_free_swap: after a swap-in, drop the swap cache copy? Always for a
    SWP_SYNCHRONOUS_IO device (6.18), or when swap is half full, or for a write fault
    by what is likely the folio's only user."""
    from kmm.mm_types import VM_LOCKED
    if not folio.flags & PG_swapcache:
        return False
    if m.swap_info.flags & swapfile.SWP_SYNCHRONOUS_IO:
        return True
    if swapfile.vm_swap_full(m) or vma.flags & VM_LOCKED:
        return True
    return write and folio.refcount == 1 + folio.nr_pages

