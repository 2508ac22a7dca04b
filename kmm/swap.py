"""The LRU lists: mm/swap.c (folio_add_lru, folio_mark_accessed, the deactivations)
with include/linux/mm_inline.h (lruvec_add_folio, lruvec_del_folio).

One lruvec (one node, no memcg) holds four lists in the kernel's names. A list is an
insertion-ordered dict of head pfns: the first key is the list's tail (the oldest
folio, which reclaim takes first), the last key its head. A large folio is one entry
and counts its pages, as ``lruvec->nr_pages`` does. New anonymous folios start on the
inactive list (workingset protection, since 5.9); ``PG_referenced``/``PG_active``
follow mark_page_accessed's two-step promotion. MADV_FREE moves a clean anonymous
folio to the inactive *file* list without PG_swapbacked (lazyfree), so reclaim can
drop it without swap. The per-CPU folio batches are left out: every change reaches the
lists at once, which the kernel's lru_add_drain gives too.
"""

from __future__ import annotations

from kmm import atomic, huge_memory_mthp, hugetlb, page_alloc
from kmm.atomic import folio_clear_flags_locked as _clear, folio_set_flags_locked as _set
from kmm.mm_types import (
    PG_active, PG_isolated, PG_lru, PG_referenced, PG_swapbacked, PG_unevictable, Page,
)

LRU_LISTS = ("inactive_anon", "active_anon", "inactive_file", "active_file")


class Lruvec:
    """struct lruvec: the four LRU lists and their page counts (NR_LRU_BASE + lru)."""

    __slots__ = ("lists", "nr_pages", "lru_lock")

    def __init__(self, locks) -> None:
        self.lists: dict[str, dict[int, None]] = {name: {} for name in LRU_LISTS}
        self.nr_pages: dict[str, int] = dict.fromkeys(LRU_LISTS, 0)
        self.lru_lock = locks.spinlock("lru_lock", "lruvec.lru_lock")


def folio_lru_list(folio: Page) -> str:
    """folio_lru_list: which list the folio's flags put it on."""
    kind = "anon" if folio.flags & PG_swapbacked else "file"
    return ("active_" if folio.flags & PG_active else "inactive_") + kind


def lruvec_add_folio(m, folio: Page, tail: bool = False, bits: int = 0) -> None:
    """lruvec_add_folio (tail: lruvec_add_folio_tail); ``bits``: flags set with it."""
    lv = m.lruvec
    flags = folio.flags | bits
    name = (("active_" if flags & PG_active else "inactive_")
            + ("anon" if flags & PG_swapbacked else "file"))  # folio_lru_list
    atomic.lru_add_locked(m, lv.lists[name], folio, tail, bits)
    lv.nr_pages[name] += folio.nr_pages


def lruvec_del_folio(m, folio: Page) -> None:
    lv = m.lruvec
    name = folio_lru_list(folio)
    if not atomic.lru_del_locked(lv.lists[name], folio):
        m.bug(f"lruvec_del_folio: {folio!r} not on {name}")
    lv.nr_pages[name] -= folio.nr_pages


def lruvec_del_folio_for_split(m, folio: Page) -> list[int] | None:
    """The first half of lru_add_split_folio's bargain: a folio about to be split
    leaves its LRU list, and the list's order is kept so the new folios can take its
    place; None when it was on no LRU. Context: lru_lock held."""
    if not folio.flags & PG_lru:
        return None
    order = list(m.lruvec.lists[folio_lru_list(folio)])
    lruvec_del_folio(m, folio)
    return order


def lru_add_split_folio(m, order: list[int], head: int, new: list[Page]) -> None:
    """lru_add_split_folio (mm/huge_memory.c): the folios a split made of the folio at
    ``head`` take its place on its list, in pfn order (``order`` from
    lruvec_del_folio_for_split). Context: lru_lock held."""
    name = folio_lru_list(new[0])
    at = order.index(head)
    atomic.lru_splice_locked(m.lruvec.lists[name],
                             order[:at] + [f.pfn for f in new] + order[at + 1:])
    for f in new:
        _set(f, PG_lru)
    m.lruvec.nr_pages[name] += sum(f.nr_pages for f in new)


async def folio_add_lru(m, folio: Page) -> None:
    """folio_add_lru / folio_add_lru_vma: a new anonymous folio joins the inactive list
    (PG_swapbacked: it can only be reclaimed through swap)."""
    if folio.flags & PG_lru:
        m.bug(f"folio_add_lru: {folio!r} already on an LRU")
    lk = m.lruvec.lru_lock
    await lk.lock("folio_add_lru")
    # __folio_set_swapbacked: the folio is not mapped yet, so no one sees it before
    lruvec_add_folio(m, folio, bits=PG_swapbacked)
    await lk.unlock()


async def folio_isolate_lru(m, folio: Page) -> bool:
    """folio_isolate_lru: take the folio off its list with a reference of its own (for
    migration or reclaim). False if another path isolated it first."""
    lk = m.lruvec.lru_lock
    await lk.lock("folio_isolate_lru")
    ok = bool(folio.flags & PG_lru)
    if ok:
        lruvec_del_folio(m, folio)
        _set(folio, PG_isolated)
        atomic.folio_ref_add_locked(folio)  # folio_get, under the lru lock like the kernel's
    await lk.unlock()
    return ok


async def folio_putback_lru(m, folio: Page) -> None:
    """folio_putback_lru: back on the list its flags name (folio_add_lru), then drop the
    isolation reference (folio_put). Between the two the folio is on its list (another
    path may isolate it again) and still holds that reference: the invariant checker
    counts it (``m.putback_pins``) until the decrement itself."""
    lk = m.lruvec.lru_lock
    await lk.lock("folio_putback_lru")
    _clear(folio, PG_isolated)
    lruvec_add_folio(m, folio)
    pins = m.putback_pins
    pins[folio.pfn] = pins.get(folio.pfn, 0) + 1
    await lk.unlock()
    await folio_put(m, folio, dropped=lambda: _unpin(pins, folio.pfn))


def _unpin(pins: dict, pfn: int) -> None:
    n = pins.pop(pfn) - 1
    if n:
        pins[pfn] = n


def folio_mark_accessed(m, folio: Page) -> None:
    """folio_mark_accessed: inactive,unreferenced -> inactive,referenced -> active."""
    if folio.flags & PG_unevictable:
        return
    if not folio.flags & PG_referenced:
        _set(folio, PG_referenced)
    elif not folio.flags & PG_active:
        folio_activate_locked(m, folio)
        _clear(folio, PG_referenced)


def folio_activate_locked(m, folio: Page) -> None:
    """folio_activate (lru_activate): move an inactive folio to the active list."""
    if folio.flags & PG_lru and not folio.flags & PG_active:
        lruvec_del_folio(m, folio)
        _set(folio, PG_active)
        lruvec_add_folio(m, folio)
    elif not folio.flags & PG_lru:
        _set(folio, PG_active)


async def folio_deactivate(m, folio: Page) -> None:
    """folio_deactivate (lru_deactivate, MADV_COLD): to the inactive list's head,
    forgetting the reference, so it goes before anything still referenced."""
    lk = m.lruvec.lru_lock
    await lk.lock("folio_deactivate")
    if folio.flags & PG_lru and folio.flags & (PG_active | PG_referenced):
        lruvec_del_folio(m, folio)
        _clear(folio, PG_active | PG_referenced)
        lruvec_add_folio(m, folio)
    await lk.unlock()


async def folio_mark_lazyfree(m, folio: Page) -> None:
    """folio_mark_lazyfree (lru_lazyfree, MADV_FREE): a clean swap-backed folio moves to
    the inactive file list without PG_swapbacked, so reclaim may just drop it."""
    lk = m.lruvec.lru_lock
    await lk.lock("folio_mark_lazyfree")
    if folio.flags & PG_lru and folio.flags & PG_swapbacked:
        lruvec_del_folio(m, folio)
        _clear(folio, PG_active | PG_referenced | PG_swapbacked)
        lruvec_add_folio(m, folio)
        m.vmstat.count_vm_event("pglazyfree", folio.nr_pages)
    await lk.unlock()


async def folio_put(m, folio: Page, n: int = 1, dropped=None) -> None:
    """folio_put / folio_put_refs (include/linux/mm.h): drop n references (one point,
    kmm.atomic); the last frees the folio. ``dropped()``: see atomic.folio_put_testzero."""
    if await atomic.folio_put_testzero(m, folio, n, dropped):
        await __folio_put(m, folio)


async def __folio_put(m, folio: Page) -> None:
    """__folio_put: the last reference is gone: off the LRU, off the deferred split
    queue, then back to the buddy allocator.

    From the refcount reaching 0 until the buddy has the pages, the folio is
    half-freed (still on the LRU or the deferred list, as in the kernel, whose LRU
    walkers skip it with folio_try_get): the actor is inside an update no lock covers,
    so it is in ``m.freeing`` meanwhile and the invariant checker, which runs only
    between updates (kmm.testing.quiescent), waits for it to finish."""
    if folio.pfn == m.huge_zero_pfn:
        m.bug("freeing the huge zero folio")
    me = m.sched.current
    m.freeing[me] = m.freeing.get(me, 0) + 1
    try:
        await _free_folio(m, folio)
    finally:
        n = m.freeing.pop(me) - 1
        if n:
            m.freeing[me] = n


async def _free_folio(m, folio: Page) -> None:
    if hugetlb.folio_test_hugetlb(folio):  # a hugetlb folio goes back to its pool
        return await hugetlb.free_huge_folio(m, folio)
    if folio.flags & PG_lru:  # page_cache_release / __page_cache_release
        lk = m.lruvec.lru_lock
        await lk.lock("__page_cache_release")
        lruvec_del_folio(m, folio)
        await lk.unlock()
    if folio.on_deferred_list:
        await m.split_queue_lock.lock("__folio_unqueue_deferred_split")
        atomic.ds_queue_del_locked(m, folio)
        huge_memory_mthp.folio_clear_partially_mapped(m, folio)
        await m.split_queue_lock.unlock()
    if folio.order and folio.anon_vma is not None:  # free_pages_prepare: PageAnon
        huge_memory_mthp.mod_mthp_stat(m, folio.order, "nr_anon", -1)
    await page_alloc.free_pages(m, folio.pfn, folio.order)


def lru_check(m) -> list[str]:
    """Invariant: each list holds live large-or-small folio heads flagged PG_lru, on the
    list their flags name, and the page counts add up."""
    errs = []
    pm = m.physmem
    for name, lst in m.lruvec.lists.items():
        n = 0
        for pfn in lst:
            f = pm.pages.get(pfn)
            if f is None or f.head != pfn or not f.flags & PG_lru or f.refcount <= 0:
                errs.append(f"LRU {name} holds {pfn:#x}, not a live folio on an LRU: {f!r}")
                continue
            if folio_lru_list(f) != name:
                errs.append(f"LRU {name} holds {pfn:#x} whose flags name {folio_lru_list(f)}")
            n += f.nr_pages
        if n != m.lruvec.nr_pages[name]:
            errs.append(f"LRU {name}: nr_pages {m.lruvec.nr_pages[name]} != {n}")
    return errs
