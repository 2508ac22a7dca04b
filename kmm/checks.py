"""The invariant checks behind kmm.testing, each registered with the state it reads.

Emulator-only (the kernel's twin is CONFIG_DEBUG_VM's VM_BUG_ONs, spread over mm/).
A check is a function ``fn(ctx) -> list[str]`` registered with ``@check(name, *deps)``;
``deps`` name the state it reads, each with a fingerprint below (``FINGERPRINTS``). The
:class:`Checker` runs every check in registration order:

- in full mode (``incremental=False``, what ``kmm.testing.invariant_errors`` does), every
  check runs over everything;
- in incremental mode (one Checker kept for a whole run, as ``kmm explore`` does), a
  check runs again only if the fingerprint of one of its deps changed since its last
  run, and otherwise its last errors stand. A dep without a fingerprint (or the dep
  ``"always"``) makes the check run every time: a new check is exact by default.

The mapping check (page tables against struct pages, the costly one) is incremental
inside: the Checker finds the page-table pages whose entries changed and the struct
pages whose fields changed since the last check (``ctx.dirty_tables``,
``ctx.dirty_pages``: snapshots compared in C, so no write can be missed; only the
tables that changed are copied, and ``ctx.changed_slots(t)`` names their entries that
did), re-reads only those tables' leaves and re-checks only the pages and folios they
touch. What it derives per table from struct pages (the page-cache pages a leaf table
maps, the PMDs that want a deposited table) is kept with the struct pages it read and
taken again when one of them is dirty. The two modes run the same code on the same
inputs and list the same errors in the same order (tests/test_checker.py runs both at
every check of several race programs, and makes each kept result go stale once).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import compress, count
from operator import attrgetter, itemgetter, ne
from typing import Any, Callable

from kmm import (
    checks_cross, checks_data, checks_hugetlb, checks_mapping, mmzone, swap, swapfile,
)
from kmm.mm_types import PG_isolated, PG_lru
from kmm.pgtable import swp_offset, swp_type


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[["Checker"], list[str]]
    deps: tuple[str, ...]


CHECKS: list[Check] = []


def check(name: str, *deps: str):
    """Register ``fn(ctx) -> list[str]`` as an invariant check reading ``deps``."""
    def register(fn):
        CHECKS[:] = [c for c in CHECKS if c.name != name]
        CHECKS.append(Check(name, fn, deps or ("always",)))
        return fn
    return register


# --------------------------------------------------------------- fingerprints
def _fp_zone(m, k) -> Any:
    if len(m.node_data) > 1:
        return tuple(_fp_one_zone(pg.zone) for pg in m.node_data)
    return _fp_one_zone(m.zone)


def _fp_one_zone(z) -> Any:
    return (z.untouched, z.untouched_end, z.nr_free,
            tuple(tuple(a) for a in z.free_area), tuple(z.free_order.items()))


def _fp_lru(m, k) -> Any:
    lv = m.lruvec
    return (tuple(tuple(lst) for lst in lv.lists.values()), tuple(lv.nr_pages.values()))


def _fp_mms(m, k) -> Any:
    return tuple((t.name, t.alive, t.mm.pgd, t.mm.nr_ptes, t.mm.pgtables_bytes,
                  t.mm.rss_anon, t.mm.swapents,
                  tuple((v.start, v.end, v.flags) for v in t.mm.vmas))
                 for t in m.tasks.values())


FINGERPRINTS: dict[str, Callable[[Any, Any], Any]] = {
    "zone": _fp_zone,
    "lru": _fp_lru,
    "mms": _fp_mms,
    "queue": lambda m, k: tuple(m.deferred_split_queue),
    "pins": lambda m, k: (tuple(m.split_scan_pins.items()), tuple(m.putback_pins.items())),
    # "tables" and "pages" are the Checker's own generation counters
}

# the struct page fields any check reads (pt_deposit, a list, is read from the table
# pages themselves at every check)
_PAGE_FIELD_NAMES = ("flags", "refcount", "mapcount", "head", "order", "entire_mapcount",
                     "large_mapcount", "nr_pages_mapped", "page_type", "on_deferred_list",
                     "swap", "index", "anon_vma", "mm", "pt_level", "mapping",
                     "pt_share_count")
_PAGE_FIELDS = attrgetter(*_PAGE_FIELD_NAMES)
# of those, the ones page_folio, folio->mapping and the hugetlb test read
_FOLIO_FIELDS = itemgetter(*(_PAGE_FIELD_NAMES.index(f)
                             for f in ("head", "order", "page_type", "mapping")))


class Checker:
    """Runs the registered checks on one machine (and its Kernel, for the data check)."""

    def __init__(self, m, k=None, incremental: bool = True) -> None:
        self.m, self.k = m, k
        self.incremental = incremental
        self._tables: dict[int, list[int]] = {}
        self._pages: dict[int, tuple] = {}
        self._gen = {"tables": 0, "pages": 0}
        self._fps: dict[str, Any] = {}       # dep -> its fingerprint at the last call
        self._errs: dict[str, list[str]] = {}
        self.state: dict[str, Any] = {}      # a check's own memory between runs
        self.first = True
        self.dirty_tables: set[int] = set()
        self.dirty_pages: set[int] = set()
        self.dirty_folio_pages: set[int] = set()  # head, order, page_type or mapping
        self.runs: Counter = Counter()       # check name -> times it ran (for tests)
        self._checks: tuple = ()             # CHECKS as _fingerprints last saw them
        self._deps: list[str] = []
        self._was: dict[int, list[int] | None] = {}  # dirty table -> its last snapshot
        self._slots: dict[int, set[int] | None] = {}  # dirty table -> changed_slots

    # ------------------------------------------------------------- changes
    def _diff(self) -> None:
        """The tables and struct pages that changed since the last check."""
        pm = self.m.physmem
        old_t = self._tables
        now_t = pm.tables
        self._was, self._slots = {}, {}
        if self.first:
            dt = set(now_t)  # (against no snapshot: every table changed)
            self._tables = {t: e.copy() for t, e in now_t.items()}
            self._gen["tables"] += 1
        elif now_t == old_t:  # (most checks: every list compared in C, nothing copied)
            dt = set()
        else:
            dt = {t for t, e in now_t.items() if old_t.get(t) != e}
            dt.update(old_t.keys() - now_t.keys())
            for t in dt:  # copy only the tables that changed
                e = now_t.get(t)
                self._was[t] = old_t.pop(t, None)
                if e is not None:
                    old_t[t] = e.copy()
            self._gen["tables"] += 1
        old_p = self._pages
        now_p = dict(zip(pm.pages.keys(), map(_PAGE_FIELDS, pm.pages.values())))
        if now_p != old_p or self.first:
            dp = {p for p, _ in now_p.items() - old_p.items()}
            dp.update(old_p.keys() - now_p.keys())
            self._pages = now_p
            self._gen["pages"] += 1
        else:
            dp = set()
        # of those, the struct pages that came, went or changed a folio field
        self.dirty_folio_pages = {
            p for p in dp if p not in old_p or p not in now_p
            or _FOLIO_FIELDS(old_p[p]) != _FOLIO_FIELDS(now_p[p])}
        self.dirty_tables, self.dirty_pages = dt, dp

    def changed_slots(self, t: int) -> set[int] | None:
        """The indices of the entries of table t (one of dirty_tables) that changed
        since the last check; None for all of them (the table came or went)."""
        got = self._slots.get(t, False)
        if got is False:
            old, new = self._was.get(t), self._tables.get(t)
            got = self._slots[t] = (
                None if old is None or new is None or len(old) != len(new)
                else set(compress(count(), map(ne, old, new))))
        return got

    def _fingerprints(self) -> dict[str, Any]:
        """Every dep's fingerprint (of the registered checks), taken once per call."""
        now = tuple(CHECKS)
        if now != self._checks:  # (a check registered since: the deps again)
            self._checks = now
            self._deps = list(dict.fromkeys(d for c in now for d in c.deps
                                            if d not in self._gen))
        fps: dict[str, Any] = dict(self._gen)
        for d in self._deps:
            fp = FINGERPRINTS.get(d)
            # an unknown dep (or "always"): a new object, never equal to the last one
            fps[d] = object() if fp is None else fp(self.m, self.k)
        return fps

    def errors(self) -> list[str]:
        """Every breached invariant, check by check (registration order)."""
        if not self.incremental:
            self.__init__(self.m, self.k, incremental=False)
        self._diff()
        out: list[str] = []
        fps = self._fingerprints()
        # each dep's fingerprint compared once, with the last call's: a check that did
        # not run then had seen that one too, so it runs again iff one of its deps
        # changed since (or it never ran)
        last = self._fps
        changed = {d for d, fp in fps.items() if d not in last or last[d] != fp}
        for c in self._checks:
            if self.first or c.name not in self._errs or not changed.isdisjoint(c.deps):
                self._errs[c.name] = c.fn(self)
                self.runs[c.name] += 1
            out.extend(self._errs[c.name])
        self._fps = fps  # (only once every check ran: one that raised runs again)
        self.first = False
        return out


# the mapping check lives in kmm/checks_mapping.py (registered first: the VMA and
# anon-exclusive checks read its leaf tables)
check("mappings", "always")(checks_mapping.mapping_errors)


# ------------------------------------------------------------ the other checks
@check("deferred_split_queue", "queue", "pages", "zone")
def deferred_split_queue_errors(ctx: Checker) -> list[str]:
    m = ctx.m
    errs = []
    for pfn in m.deferred_split_queue:
        f = m.physmem.pages.get(pfn)
        if f is None or not f.on_deferred_list or not f.order or \
                mmzone.all_zones(m).is_free(pfn):
            errs.append(f"deferred split queue holds {pfn:#x}, not a queued large folio")
    return errs


@check("buddy", "zone", "pages")
def buddy_errors(ctx: Checker) -> list[str]:
    return mmzone.all_zones(ctx.m).check()


@check("lru", "lru", "pages")
def lru_errors(ctx: Checker) -> list[str]:
    return swap.lru_check(ctx.m)


@check("swap", "always")
def swap_errors(ctx: Checker) -> list[str]:
    """swapfile.check; without a swap device, its walk's part from the mapping
    check's leaf summaries (no swap PTE may exist then, and no non-present PMD but a
    migration entry), in the walk's address order."""
    m = ctx.m
    st = ctx.state.get("mappings")
    if st is None:
        return swapfile.check(m)
    si = m.swap_info
    errs = []
    refs: dict[int, int] = {}
    for task in m.tasks_with_tables():
        if task.name not in st.leaves:
            continue
        pmds, ptes = st.leaves[task.name]
        found = [(a, 0, e) for t, _ in pmds for a, e in st.sums[t][4]]
        swaps = [(a, 1, e) for t, _ in ptes for a, e in st.sums[t][4]]
        for a, kind, e in sorted(found + swaps):
            if kind == 0:
                errs.append(f"{task.name}: non-present PMD {e:#x} at {a:#x} is not a "
                            "migration entry (swap is never mapped at PMD level)")
            elif si is None or swp_type(e) != si.type or not 0 < swp_offset(e) < si.max:
                errs.append(f"{task.name}: swap PTE {e:#x} at {a:#x} names no slot")
            else:
                refs[swp_offset(e)] = refs.get(swp_offset(e), 0) + 1
        if len(swaps) != task.mm.swapents:
            errs.append(f"{task.name}: MM_SWAPENTS {task.mm.swapents} != {len(swaps)} "
                        "swap PTEs")
    return errs + swapfile.slot_errors(m, refs)


# hugetlb folios and pools: kmm/checks_hugetlb.py
check("hugetlb", "always")(checks_hugetlb.hugetlb_errors)

@check("page_cache", "always")
def page_cache_errors(ctx: Checker) -> list[str]:
    """Every shmem inode's page cache: each index names a live folio of that mapping
    covering it; nrpages adds up; an unmapped page-cache folio holds exactly the
    cache's references and is on an LRU list."""
    m = ctx.m
    st = m.__dict__.get("shmem")
    if st is None:
        return []
    ms = ctx.state.get("mappings")
    mapped = set(ms.folios) | set(ms.pmd_maps) if ms is not None else set()
    pm, zone = m.physmem, mmzone.all_zones(m)
    errs = []
    memo = ctx.state.setdefault("page_cache", {})  # inode -> its indices' last verdict
    for inode in st.inodes.values():
        mapping = inode.mapping
        # a THP fills 512 indices with one pfn: judge each folio once, then each index
        # against its folio's range in one comprehension (this check runs every step)
        lo: dict[int, int] = {}
        hi: dict[int, int] = {}
        for pfn in set(mapping.i_pages.values()):
            folio = pm.pages.get(pfn)
            if folio is not None and not zone.is_free(pfn) and folio.mapping is mapping:
                lo[pfn], hi[pfn] = folio.index, folio.index + folio.nr_pages
        items = tuple(mapping.i_pages.items())
        last = memo.get(inode.id)
        if last is not None and last[:3] == (items, lo, hi):
            bad = last[3]
        else:
            bad = [(i, p) for i, p in items if not lo.get(p, 1) <= i < hi.get(p, 0)]
            memo[inode.id] = (items, lo, hi, bad)
        for index, pfn in bad:
            errs.append(f"shmem inode {inode.id}: index {index} -> {pfn:#x}, not a "
                        "page-cache folio of it")
        seen = lo.keys()
        if index_clash := set(mapping.i_pages) & set(mapping.swapped):
            errs.append(f"shmem inode {inode.id}: indices {sorted(index_clash)[:4]} hold "
                        "a folio and a swap entry")
        cached = sum(pm.pages[p].nr_pages for p in seen)
        if cached != mapping.nrpages:
            errs.append(f"shmem inode {inode.id}: nrpages {mapping.nrpages} != {cached} "
                        "cached pages")
        for pfn in sorted(seen):
            if pfn in mapped and (ms.folios.get(pfn) or ms.pmd_maps.get(pfn)):
                continue
            folio = pm.pages[pfn]
            extra = 1 if folio.flags & PG_isolated else 0
            if folio.refcount != folio.nr_pages + extra:
                errs.append(f"shmem folio {pfn:#x} (inode {inode.id} index "
                            f"{folio.index}): refcount {folio.refcount} != "
                            f"{folio.nr_pages} page-cache refs")
            if not folio.flags & (PG_lru | PG_isolated):
                errs.append(f"shmem folio {pfn:#x}: in the page cache but on no LRU list")
    return errs


# the data check (and kmm.testing's read_mapped_byte) live in kmm/checks_data.py
check("data", "always")(checks_data.data_errors)


# the checks across structures and processes live in kmm/checks_cross.py, as fn(m, k)
def _mk(fn):
    def run(ctx: Checker) -> list[str]:
        return fn(ctx.m, ctx.k)
    run.__name__ = run.__qualname__ = fn.__name__
    return run


check("vmas", "tables", "mms")(checks_cross.vma_check)
check("anon_exclusive", "tables", "pages", "mms")(checks_cross.anon_exclusive_check)
check("rcu", "always")(_mk(checks_cross.rcu_errors))
check("cross_process", "always")(_mk(checks_cross.cross_process_errors))
