"""The invariant checks of large anonymous folios (mTHP): registered with
kmm.checks like every other check, and run by kmm.testing's checker.

A large folio, mapped by PTEs (an mTHP, a PTE-mapped THP) or by a PMD, mapped or not:
every page's compound head; large mapcount = entire mapcount + the pages' PTE
mapcounts; nr_pages_mapped = the pages with a PTE mapping; PG_partially_mapped only on
a queued folio (or one in a shrinker's batch); queue membership both ways; and the
gauges hugepages-<size>kB/stats/nr_anon and nr_anon_partially_mapped equal to the live
anonymous folios of each order.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from kmm import mmzone
from kmm.checks import Checker, FINGERPRINTS, check
from kmm.mm_types import PG_partially_mapped

# the per-size gauges are state this check reads (kmm.checks fingerprints)
FINGERPRINTS["mthp_gauges"] = lambda m, k: tuple(sorted(
    (o, s.get("nr_anon", 0), s.get("nr_anon_partially_mapped", 0))
    for o, s in m.vmstat.mthp.items()))


@check("large_folios", "pages", "queue", "pins", "zone", "mthp_gauges")
def large_folio_check(ctx: Checker) -> list[str]:
    """large_folio_errors, with the large-folio heads and each folio's walk over its
    pages (PTE mapcounts, compound heads) kept while none of its struct pages changed
    (ctx.dirty_pages); the folio's own fields, queue, pins and zone are read afresh."""
    m = ctx.m
    pm = m.physmem
    pages = pm.pages
    zone = mmzone.all_zones(m)
    st = ctx.state.get("large_folios")
    if st is None:
        st = ctx.state["large_folios"] = ({}, {})
    heads, walks = st   # the pfns that are a large folio's head; head -> its walk
    dp = ctx.dirty_pages
    for p in dp:
        f = pages.get(p)
        if f is not None and f.order and f.head == p:
            heads[p] = None
        else:
            heads.pop(p, None)
            walks.pop(p, None)
    changed = sorted(dp)
    nr_anon: Counter = Counter()
    partial: Counter = Counter()
    bad: dict[int, list[str]] = {}
    for head in heads:
        walk = walks.get(head)
        if walk is not None and changed:  # a struct page of its range changed
            i = bisect_left(changed, head)
            if i < len(changed) and changed[i] < head + walk[0]:
                del walks[head]
                walk = None
        folio = pages[head]
        if folio.page_type or zone.is_free(head):
            continue
        if folio.anon_vma is None or not folio.refcount:
            continue  # not anonymous, or frozen by a split (no longer counted)
        if walk is None:
            walk = walks[head] = _walk(pages, head, folio.nr_pages)
        errs = _folio_errors(m, head, folio, walk, partial)
        if errs:
            bad[head] = errs
        nr_anon[folio.order] += 1
    errs = []
    if bad:  # in the order of the struct pages, as large_folio_errors lists them
        for head in pages:
            errs.extend(bad.get(head, ()))
    return errs + _gauge_errors(m, nr_anon, partial)


def _walk(pages: dict, head: int, nr: int) -> tuple[int, int, int, list[str]]:
    """(nr pages, PTE mappings of the folio's pages, pages with one, pages whose
    compound head is not ``head``)."""
    errs = []
    ptes = mapped = 0
    for p in range(head, head + nr):
        page = pages.get(p)
        if page is None:
            continue
        if p != head and page.head != head:
            errs.append(f"folio {head:#x}: page {p:#x} has head {page.head:#x}")
        ptes += page.mapcount
        mapped += 1 if page.mapcount else 0
    return nr, ptes, mapped, errs


def _folio_errors(m, head: int, folio, walk: tuple, partial: Counter) -> list[str]:
    """One live anonymous large folio against its pages' walk (counting it in
    ``partial`` if flagged partially mapped)."""
    _, ptes, mapped, errs = walk
    errs = list(errs)
    if folio.large_mapcount != folio.entire_mapcount + ptes:
        errs.append(f"folio {head:#x} order {folio.order}: large mapcount "
                    f"{folio.large_mapcount} != entire {folio.entire_mapcount} + "
                    f"{ptes} PTE mappings")
    if folio.nr_pages_mapped != mapped:
        errs.append(f"folio {head:#x} order {folio.order}: nr_pages_mapped "
                    f"{folio.nr_pages_mapped} != {mapped} pages with a PTE mapping")
    queued = head in m.deferred_split_queue
    if queued != folio.on_deferred_list:
        errs.append(f"folio {head:#x}: on_deferred_list {folio.on_deferred_list} but "
                    f"{'in' if queued else 'not in'} the deferred split queue")
    if folio.flags & PG_partially_mapped:
        partial[folio.order] += 1
        if not queued and head not in m.split_scan_pins:
            errs.append(f"folio {head:#x}: partially mapped but not queued")
    return errs


def _gauge_errors(m, nr_anon: Counter, partial: Counter) -> list[str]:
    """The mTHP gauges against the anonymous folios counted per order."""
    errs = []
    for order in range(2, 10):
        got = m.vmstat.mthp.get(order, {})
        if got.get("nr_anon", 0) != nr_anon[order]:
            errs.append(f"hugepages-{4 << order}kB/stats/nr_anon {got.get('nr_anon', 0)} "
                        f"!= {nr_anon[order]} anonymous folios of order {order}")
        if got.get("nr_anon_partially_mapped", 0) != partial[order]:
            errs.append(f"hugepages-{4 << order}kB/stats/nr_anon_partially_mapped "
                        f"{got.get('nr_anon_partially_mapped', 0)} != {partial[order]} "
                        f"partially mapped folios of order {order}")
    return errs


def large_folio_errors(m) -> list[str]:
    """Large (PTE-mapped or PMD-mapped) anonymous folios, mapped or not:
    every page's compound head; large mapcount = entire mapcount + the pages' PTE
    mapcounts; nr_pages_mapped = pages with a PTE mapping; PG_partially_mapped only on
    a folio queued for deferred split (or in a shrinker's batch); queue membership
    both ways; and the mTHP gauges (nr_anon, nr_anon_partially_mapped) per order equal
    to the live anonymous folios counted."""
    errs: list[str] = []
    pm = m.physmem
    zone = mmzone.all_zones(m)
    nr_anon: Counter = Counter()
    partial: Counter = Counter()
    for head, folio in list(pm.pages.items()):
        if not folio.order or folio.head != head or folio.page_type or zone.is_free(head):
            continue
        if folio.anon_vma is None or not folio.refcount:
            continue  # not anonymous, or frozen by a split (no longer counted)
        errs.extend(_folio_errors(m, head, folio, _walk(pm.pages, head, folio.nr_pages),
                                  partial))
        nr_anon[folio.order] += 1
    return errs + _gauge_errors(m, nr_anon, partial)
