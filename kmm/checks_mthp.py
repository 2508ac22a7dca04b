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
    return large_folio_errors(ctx.m)


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
        nr = folio.nr_pages
        ptes = mapped = 0
        for p in range(head, head + nr):
            page = pm.pages.get(p)
            if page is None:
                continue
            if p != head and page.head != head:
                errs.append(f"folio {head:#x}: page {p:#x} has head {page.head:#x}")
            ptes += page.mapcount
            mapped += 1 if page.mapcount else 0
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
        nr_anon[folio.order] += 1
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
