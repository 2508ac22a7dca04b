"""The mapping check of kmm.checks: page tables against struct pages.

Emulator-only (the kernel's twins: the VM_BUG_ONs on mapcounts and page-table pages,
and check_pte_table/pgtables_bytes accounting at exit). The costliest check, so it is
incremental inside (kmm.checks' module docstring says how): it keeps a summary per leaf
table and re-reads only the tables and struct pages the Checker found changed.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress

from kmm import checks_hugetlb, mmzone, swapfile
from kmm.mm_types import PG_isolated, PG_lru, PG_swapcache, PGTY_hugetlb
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, PGDIR_SIZE, PMD_SIZE, PUD_SIZE, is_migration_entry,
    is_pmd_migration_entry, pmd_pfn, pmd_present, pmd_trans_huge, pte_pfn, pte_present,
    pte_special, table_pfn,
)


def _leaf_tables(m, task) -> tuple[list[tuple[str, int]], list[tuple[int, int]],
                                   list[tuple[int, int]]]:
    """(every table of the mm as (level, pfn), its PMD tables and its PTE tables as
    (pfn, base address)), in address order; the empty slots are skipped in C."""
    tables = m.physmem.tables
    mm = task.mm
    every = [("pgd", mm.pgd)]
    pmds: list[tuple[int, int]] = []
    ptes: list[tuple[int, int]] = []
    pgd = tables[mm.pgd]
    for i in compress(range(len(pgd)), pgd):
        pud_pfn = table_pfn(pgd[i])
        every.append(("pud", pud_pfn))
        pud = tables[pud_pfn]
        for j in compress(range(len(pud)), pud):
            pmd_pfn_ = table_pfn(pud[j])
            base_u = i * PGDIR_SIZE + j * PUD_SIZE
            every.append(("pmd", pmd_pfn_))
            pmds.append((pmd_pfn_, base_u))
            pmd = tables[pmd_pfn_]
            for n in compress(range(len(pmd)), pmd):
                e = pmd[n]
                if pmd_present(e) and not pmd_trans_huge(e):
                    every.append(("pte", table_pfn(e)))
                    if table_pfn(e) in m.physmem.tables:  # else: "not a page-table page"
                        ptes.append((table_pfn(e), base_u + n * PMD_SIZE))
    return every, pmds, ptes


def _pte_summary(m, name: str, t: int, base: int
                 ) -> tuple[Counter, int, list[str], list[tuple[int, int]]]:
    """A PTE table's leaves: PTE mappings per pfn, Rss pages, errors, and its swap
    PTEs as (address, entry). A PMD pointing to a page that is no table (reported by
    the table-page check) has no leaves."""
    tbl = m.physmem.tables.get(t, ())
    maps: Counter = Counter()
    rss = 0
    errs = []
    swaps = []
    for n in compress(range(len(tbl)), tbl):
        e = tbl[n]
        if pte_present(e):
            if not pte_special(e):
                maps[pte_pfn(e)] += 1
                rss += 1
            elif pte_pfn(e) != m.zero_pfn:
                errs.append(f"{name}: special PTE at {base + n * PAGE_SIZE:#x} is not the "
                            "zero page")
        elif is_migration_entry(e):
            rss += 1
        elif swapfile.is_swap_entry(m, e):
            swaps.append((base + n * PAGE_SIZE, e))  # MM_SWAPENTS, slots: swap_errors
        else:
            errs.append(f"{name}: unknown non-present PTE {e:#x} at "
                        f"{base + n * PAGE_SIZE:#x}")
    return maps, rss, errs, swaps


def _pmd_summary(m, t: int, base: int) -> tuple[Counter, int, list[tuple[int, int]]]:
    """A PMD table's huge leaves: PMD mappings per head pfn, Rss pages, and its
    non-present PMDs that are not migration entries, as (address, entry)."""
    tbl = m.physmem.tables[t]
    maps: Counter = Counter()
    rss = 0
    bad = []
    for n in compress(range(len(tbl)), tbl):
        e = tbl[n]
        if pmd_trans_huge(e) or not pmd_present(e):
            if checks_hugetlb.is_hugetlb_pmd(m, e):
                continue  # counted by the hugetlb check, in no RSS counter
            if not pmd_present(e) and not is_pmd_migration_entry(e):
                bad.append((base + n * PMD_SIZE, e))
            if pmd_present(e):
                pfn = pmd_pfn(e)
                if m.is_huge_zero_pfn(pfn):
                    continue
                maps[pfn] += 1
            rss += HPAGE_PMD_NR
    return maps, rss, bad


def _mapping_of(pm, pfn: int):
    """page_folio(pfn)->mapping for a page-cache folio, else None."""
    p = pm.pages.get(_head_of(pm, pfn))
    return None if p is None else p.mapping


def _folio_pages(pm, pfn: int) -> tuple[int, ...]:
    """The struct pages _head_of(pm, pfn) and _mapping_of(pm, pfn) read: the page, its
    head, or (a tail without a struct page) every head it probes."""
    p = pm.pages.get(pfn)
    if p is not None:
        return pfn, p.head
    return (pfn, *(pfn & ~((1 << order) - 1) for order in range(1, 11)))


def _file_mapped(pm, maps: Counter) -> tuple[set[int], int]:
    """(the struct pages read, the mappings in ``maps`` of page-cache folios)."""
    read: set[int] = set()
    n = 0
    for pfn, c in maps.items():
        read.update(_folio_pages(pm, pfn))
        if _mapping_of(pm, pfn) is not None:
            n += c
    return read, n


def _deposit_wanted(m, tbl: list[int]) -> tuple[set[int], int]:
    """(the struct pages read, the PMDs of a PMD table that want a deposited table:
    migration entries and huge PMDs but page-cache (shmem, none on x86) and hugetlb
    ones)."""
    pm = m.physmem
    read: set[int] = set()
    huge = 0
    for e in compress(tbl, tbl):
        if pmd_trans_huge(e):
            read.update(_folio_pages(pm, pmd_pfn(e)))
        if is_pmd_migration_entry(e) or pmd_trans_huge(e) and (
                m.is_huge_zero_pfn(pmd_pfn(e)) or _mapping_of(pm, pmd_pfn(e)) is None
        ) and not checks_hugetlb.is_hugetlb_pmd(m, e):
            huge += 1
    return read, huge


def _head_of(pm, pfn: int) -> int:
    """page_folio(pfn)'s pfn, without creating a struct page (physmem.page's rule)."""
    p = pm.pages.get(pfn)
    if p is not None:
        return p.head
    for order in range(1, 11):
        h = pfn & ~((1 << order) - 1)
        hp = pm.pages.get(h)
        if hp is not None and hp.head == h and hp.order >= order:
            return h
    return pfn


class _MapState:
    def __init__(self) -> None:
        self.sums: dict[int, tuple] = {}  # leaf table -> (key, maps, rss, errs, extra)
        self.leaves: dict[str, tuple] = {}  # live task -> (PMD tables, PTE tables)
        self.walks: dict[str, tuple] = {}   # task -> (pgd, _leaf_tables), last walked
        self.tabchk: dict[int, tuple] = {}  # table -> ((level, task), its own errors)
        self.pte_maps: Counter = Counter()   # pfn -> PTE mappings
        self.pmd_maps: Counter = Counter()   # head pfn -> PMD mappings
        self.folios: Counter = Counter()     # head pfn -> all mappings
        self.used: dict[int, tuple[int, int]] = {}  # pte-mapped pfn -> (head, n) counted
        # pfn or head -> its errors (none kept empty: every check lists them sorted)
        self.pte_err: dict[int, list[str]] = {}
        self.pmd_err: dict[int, list[str]] = {}
        self.folio_err: dict[int, list[str]] = {}
        self.stray_err: dict[int, list[str]] = {}
        self.zone: tuple[int, int] | None = None   # the buddy's untouched range
        self.free: dict[int, int] = {}              # and its free blocks, at the last check
        self.pins: dict[int, int] = {}
        self.nopage: set[int] = set()  # PTE-mapped pfns without a struct page
        # PTE-mapped pfn -> on a free list (kept while no free block around it changed)
        self.is_free: dict[int, bool] = {}
        # PMD table -> (huge zero pfn, struct pages read, PMDs wanting a deposit)
        self.huge: dict[int, tuple] = {}
        # PMD table -> (its deposited tables, those free or not empty)
        self.deposits: dict[int, tuple] = {}
        # leaf table -> (its summary, struct pages read, page-cache pages it maps)
        self.file: dict[int, tuple] = {}


def _hit(ranges: list[tuple[int, int]], keys) -> set[int]:
    """The keys (a set, dict or tuple of pfns) in one of the ranges, each range looked
    at from its smaller side."""
    out: set[int] = set()
    for lo, hi in ranges:
        if hi - lo < len(keys):
            out.update(p for p in range(lo, hi) if p in keys)
        else:
            out.update(p for p in keys if lo <= p < hi)
    return out


def _apply(st: _MapState, t: int, new: tuple | None, touched_pte: set, touched_pmd: set
           ) -> None:
    """Replace leaf table t's contribution to the mapping counts."""
    old = st.sums.pop(t, None)
    for s, sign in ((old, -1), (new, 1)):
        if s is None:
            continue
        key, maps = s[0], s[1]
        agg, touched = (st.pmd_maps, touched_pmd) if key[0] == "pmd" else (st.pte_maps,
                                                                            touched_pte)
        for pfn, n in maps.items():
            agg[pfn] += sign * n
            if not agg[pfn]:
                del agg[pfn]
            touched.add(pfn)
    if new is not None:
        st.sums[t] = new


def mapping_errors(ctx) -> list[str]:  # ctx: a kmm.checks.Checker
    """Page tables against struct pages: every table a live table page; deposits; mm
    counters; every mapping counted in the struct pages it maps, and nothing else."""
    m = ctx.m
    pm, zone = m.physmem, mmzone.all_zones(m)
    st: _MapState = ctx.state.get("mappings") or ctx.state.setdefault("mappings",
                                                                       _MapState())
    st.leaves = {}
    dt = ctx.dirty_tables
    errs: list[str] = []
    touched_pte: set[int] = set()
    touched_pmd: set[int] = set()
    live: set[int] = set()
    # "mapped but free" may change for the mapped pfns of a block that became free or
    # stopped being free (the buddy's free blocks, and its untouched tail)
    free = zone.free_order
    ranges = [(p, p + (1 << o)) for p, o in free.items() ^ st.free.items()]
    if st.zone is None:
        ranges.append((0, pm.nr_pages))
    elif st.zone != (zone.untouched, zone.untouched_end):
        if len(m.node_data) > 1:  # some node's untouched tail moved: look at it all
            ranges.append((0, pm.nr_pages))
        else:
            for a, b in zip(st.zone, (zone.untouched, zone.untouched_end)):
                ranges.append((min(a, b), max(a, b)))
    if ranges:
        st.free = dict(free)
        st.zone = (zone.untouched, zone.untouched_end)
    dp = ctx.dirty_pages
    dfp = ctx.dirty_folio_pages  # (what _head_of, _mapping_of, is_hugetlb_pmd read)
    tabchk = st.tabchk
    rehit = _hit(ranges, tabchk) if ranges else ()  # tables whose free state may change
    hugec = st.huge
    depc = st.deposits
    hz = m.huge_zero_pfn
    visited: set[int] = set()
    for task in m.tasks_with_tables():  # an exiting mm maps pages until exit_mmap
        mm = task.mm
        name = task.name
        walked = st.walks.get(name)
        if walked is None or walked[0] != mm.pgd or dt and not dt.isdisjoint(walked[4]):
            every, pmds, ptes = _leaf_tables(m, task)
            walked = st.walks[name] = (mm.pgd, every, pmds, ptes,
                                       {t for lvl, t in every if lvl != "pte"})
        _, every, pmds, ptes, _uppers = walked
        st.leaves[name] = (pmds, ptes)
        deposited = 0
        nr_pte_tables = 0
        for lvl, t in every:
            nr_pte_tables += lvl == "pte"
            visited.add(t)
            pg = pm.pages.get(t)
            # a table page's own checks, kept while its struct page and the free
            # blocks around it stay as they were
            got = tabchk.get(t)
            if got is None or got[0] != (lvl, name) or t in dp or t in rehit:
                e = []
                if zone.is_free(t):
                    e.append(f"{name}: {lvl} table {t:#x} is on a free list")
                if pg is None or pg.page_type != "table":
                    e.append(f"{name}: {lvl} table {t:#x} is not a page-table page")
                got = tabchk[t] = ((lvl, name), e)
            errs.extend(got[1])
            if lvl == "pmd":
                # the PMDs that want a deposited table, kept while the table, the
                # struct pages its huge PMDs read and the huge zero pfn stay
                got = hugec.get(t)
                if (got is None or got[0] != hz or t in dt
                        or not got[1].isdisjoint(dfp)):
                    got = hugec[t] = (hz, *_deposit_wanted(m, pm.tables[t]))
                huge = got[2]
                dep = len(pg.pt_deposit or ()) if pg else 0
                deposited += dep
                if dep != huge:
                    errs.append(f"{name}: PMD table {t:#x} has {huge} huge PMDs but "
                                f"{dep} deposited tables")
                # the deposited tables free or not empty, kept while the deposit
                # list, those tables and the free blocks around them stay
                deps = tuple(pg.pt_deposit or ()) if pg else ()
                got = depc.get(t)
                if (got is None or got[0] != deps or dt and not dt.isdisjoint(deps)
                        or ranges and _hit(ranges, deps)):
                    got = depc[t] = (deps, [d for d in deps if zone.is_free(d)
                                            or any(pm.tables.get(d, [1]))])
                for d in got[1]:
                    errs.append(f"{name}: deposited table {d:#x} free or not empty")
        if mm.nr_ptes != nr_pte_tables + deposited:
            errs.append(f"{name}: nr_ptes {mm.nr_ptes} != {nr_pte_tables} PTE tables "
                        f"+ {deposited} deposited")
        if mm.pgtables_bytes != (len(every) + deposited) * PAGE_SIZE:
            errs.append(f"{name}: pgtables_bytes {mm.pgtables_bytes} != "
                        f"{len(every) + deposited} table pages")
        rss = 0
        for lvl, lst in (("pmd", pmds), ("pte", ptes)):
            for t, base in lst:
                key = (lvl, name, base, hz if lvl == "pmd" else 0)
                s = st.sums.get(t)
                if s is None or s[0] != key or t in dt:
                    if lvl == "pmd":
                        maps, r, bad = _pmd_summary(m, t, base)
                        s = (key, maps, r, [], bad)
                    else:
                        s = (key, *_pte_summary(m, name, t, base))
                    _apply(st, t, s, touched_pte, touched_pmd)
                live.add(t)
                rss += s[2]
        for t, base in ptes:
            errs.extend(st.sums[t][3])
        # MM_SHMEMPAGES: the mapped pages of page-cache folios (a folio's mapping is a
        # struct-page field, not a table entry: each leaf table's count is kept while
        # its summary and the struct pages it read stay)
        rss_file = 0
        filec = st.file
        for lst, per in ((pmds, HPAGE_PMD_NR), (ptes, 1)):
            for t, _base in lst:
                s = st.sums[t]
                got = filec.get(t)
                if got is None or got[0] is not s or not got[1].isdisjoint(dfp):
                    got = filec[t] = (s, *_file_mapped(pm, s[1]))
                rss_file += got[2] * per
        rss -= rss_file
        if rss != mm.rss_anon:
            errs.append(f"{name}: MM_ANONPAGES {mm.rss_anon} != {rss} mapped pages")
        if rss_file != mm.rss_shmem:
            errs.append(f"{name}: MM_SHMEMPAGES {mm.rss_shmem} != {rss_file} mapped "
                        "page-cache pages")
        for vma in mm.vmas:
            if vma.start >= vma.end or vma.start & (PAGE_SIZE - 1):
                errs.append(f"{name}: bad VMA {vma!r}")
    for t in [t for t in st.sums if t not in live]:
        _apply(st, t, None, touched_pte, touched_pmd)
    # what was not looked at now missed this check's changes: forget it
    for name in st.walks.keys() - st.leaves.keys():
        del st.walks[name]
    for cache in (tabchk, hugec, depc):
        for t in cache.keys() - visited:
            del cache[t]
    for t in st.file.keys() - live:
        del st.file[t]

    # which pfns and folios to look at again
    freed = _hit(ranges, st.pte_maps) if ranges else ()  # their free state may change
    if ranges:
        touched_pte.update(freed)
        touched_pmd.update(_hit(ranges, st.pmd_maps))
    touched_pte.update(st.pte_maps.keys() & dp)
    # the mapped pfns without a struct page, looked at every time: kept as the pfns
    # whose mappings (touched) or struct page (dp) changed come and go
    for p in touched_pte | dp:
        if p in st.pte_maps and p not in pm.pages:
            st.nopage.add(p)
        else:
            st.nopage.discard(p)
    touched_pte.update(st.nopage)
    touched_pmd.update(st.pmd_maps.keys() & dp)
    heads: set[int] = set()
    for p in touched_pte:
        n = st.pte_maps.get(p, 0)
        old = st.used.pop(p, None)
        if old is not None:
            st.folios[old[0]] -= old[1]
            heads.add(old[0])
        if not n:
            st.pte_err.pop(p, None)
            st.is_free.pop(p, None)
            continue
        page = pm.pages.get(p)
        e = []
        if page is None or page.mapcount != n:
            e.append(f"pfn {p:#x}: mapcount {page.mapcount if page else None} != "
                     f"{n} PTE mappings")
        free_now = st.is_free.get(p)
        if free_now is None or p in freed:
            free_now = st.is_free[p] = zone.is_free(p)
        if free_now:
            e.append(f"pfn {p:#x}: mapped but free")
        if e:
            st.pte_err[p] = e
        else:
            st.pte_err.pop(p, None)
        h = _head_of(pm, p)
        st.used[p] = (h, n)
        st.folios[h] += n
        heads.add(h)
    for h in touched_pmd:
        st.pmd_err.pop(h, None)
        n = st.pmd_maps.get(h, 0)
        heads.add(h)  # (its PMD mappings may have changed)
        if not n:
            continue
        folio = pm.pages.get(h)
        e = []
        if folio is None or folio.entire_mapcount != n:
            e.append(f"folio {h:#x}: entire mapcount "
                     f"{folio.entire_mapcount if folio else None} != {n} PMD mappings")
        if zone.is_free(h):
            e.append(f"folio {h:#x}: PMD-mapped but free")
        if e:
            st.pmd_err[h] = e
    for p in dp:
        page = pm.pages.get(p)
        heads.add(p)
        if page is not None:
            heads.add(page.head)
    pins = {h: (m.split_scan_pins.get(h, 0), m.putback_pins.get(h, 0))
            for h in m.split_scan_pins.keys() | m.putback_pins.keys()}
    heads.update(h for h in pins.keys() | st.pins.keys() if pins.get(h) != st.pins.get(h))
    st.pins = pins
    for h in heads:
        n = st.folios.get(h, 0) + st.pmd_maps.get(h, 0)
        if not n:
            st.folio_err.pop(h, None)
            if h in st.folios and not st.folios[h]:
                del st.folios[h]
            continue
        e = _folio_errors(m, h, n)
        if e:
            st.folio_err[h] = e
        else:
            st.folio_err.pop(h, None)
    # nothing else may hold a mapcount
    for p in dp | touched_pte | touched_pmd:
        page = pm.pages.get(p)
        e = []
        if page is not None:
            if page.mapcount and p not in st.pte_maps:
                e.append(f"pfn {p:#x}: mapcount {page.mapcount} but not mapped")
            if (page.entire_mapcount and p not in st.pmd_maps
                    and page.page_type != PGTY_hugetlb):  # (the hugetlb check's)
                e.append(f"folio {p:#x}: entire mapcount {page.entire_mapcount} but "
                         f"not PMD-mapped")
        if e:
            st.stray_err[p] = e
        else:
            st.stray_err.pop(p, None)
    for part in (st.pte_err, st.pmd_err, st.folio_err, st.stray_err):
        for p in sorted(part):
            errs.extend(part[p])
    return errs


def _folio_errors(m, head: int, n: int) -> list[str]:
    """A mapped folio: its mapcounts, references and LRU membership against the n
    mappings found."""
    pm = m.physmem
    folio = pm.pages.get(head)
    if folio is None:
        return [f"folio {head:#x}: mapped but has no struct page"]
    errs = []
    total = folio.large_mapcount if folio.order else folio.mapcount
    if total != n:
        errs.append(f"folio {head:#x}: mapcount {total} != {n} mappings")
    # an isolated folio (compaction, reclaim) holds the isolation reference too
    isolated = 1 if folio.flags & PG_isolated else 0
    cache = folio.nr_pages if folio.flags & PG_swapcache else 0  # swap cache refs
    # the page cache holds one reference per page of a page-cache folio
    pcache = folio.nr_pages if folio.mapping is not None else 0
    # a deferred split scan in progress holds a reference on each folio of its batch
    isolated += m.split_scan_pins.get(head, 0)
    # an isolated folio put back on its LRU holds its reference until folio_put
    isolated += m.putback_pins.get(head, 0)
    if folio.refcount != n + isolated + cache + pcache:
        errs.append(f"folio {head:#x}: refcount {folio.refcount} != {n} mappings"
                    + (" + 1 isolation" if isolated else "")
                    + (f" + {cache} swap cache" if cache else "")
                    + (f" + {pcache} page cache" if pcache else ""))
    if folio.order:
        pages = pm.pages
        end = head + folio.nr_pages
        if len(pages) < folio.nr_pages:  # fewer struct pages than subpages: scan those
            mapped = sum(1 for p, pg in pages.items() if head <= p < end and pg.mapcount)
        else:
            mapped = sum(1 for p in range(head, end)
                         if pages.get(p) is not None and pages[p].mapcount)
        if mapped != folio.nr_pages_mapped:
            errs.append(f"folio {head:#x}: nr_pages_mapped {folio.nr_pages_mapped} "
                        f"!= {mapped}")
    if not folio.flags & (PG_lru | PG_isolated):
        errs.append(f"folio {head:#x}: mapped but on no LRU list")
    return errs
