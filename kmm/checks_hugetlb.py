"""The hugetlb check of kmm.checks: pools, mappings and references of hugetlb folios.

Emulator-only (CONFIG_DEBUG_VM's twin). The mapping check leaves hugetlb PMD leaves
out (they count in no RSS counter, have no deposited table and are never on the LRU);
this check counts them from the hugetlb VMAs and compares:

- per hstate: free_huge_pages is the free list's length; nr_huge_pages the hugetlb
  folios that exist; resv_huge_pages at most the free pages (6.18 can take it below
  zero, see hugetlb_report_meminfo); surplus within the pool;
- per hugetlb folio: not on the LRU, the deferred split queue or a buddy free list; a
  free one unreferenced and unmapped; a mapped one with entire (and large) mapcount
  equal to its PMD mappings and refcount equal to them plus its page-cache reference
  (an entry of a shared PMD table is one mapping, however many mms reach it);
- per PMD table of a hugetlb VMA (PMD sharing, kmm.hugetlb_pmd_share): its
  pt_share_count is the number of live mms whose PUD entry points at it, less one; a
  table with a share count is a live PMD table (not freed, not on a free list), and a
  shared table is only reached through shared hugetlb VMAs.
"""

from __future__ import annotations

from collections import Counter

from kmm import hugetlb_pmd_share, mmzone
from kmm.memory import pmd_lookup
from kmm.mm_types import PG_isolated, PG_lru, PGTY_hugetlb
from kmm.pgtable import PUD_SIZE, pmd_index, pmd_pfn, pmd_trans_huge


def is_hugetlb_pmd(m, e: int) -> bool:
    """A PMD leaf mapping a hugetlb folio."""
    if not (e and pmd_trans_huge(e)):
        return False
    pg = m.physmem.pages.get(pmd_pfn(e))
    return pg is not None and pg.page_type == PGTY_hugetlb


def hugetlb_errors(ctx) -> list[str]:
    m = ctx.m
    pm = m.physmem
    errs: list[str] = []
    maps: Counter = Counter()
    cached: set[int] = set()
    slots: set[tuple[int, int]] = set()  # (PMD table, index): a shared entry counts once
    for task in m.tasks_with_tables():  # an exiting mm's tables count until exit_mmap
        mm = task.mm
        for vma in mm.vmas:
            if vma.hugetlb_file is None:
                continue
            cached.update(vma.hugetlb_file.cache.values())
            size = vma.hugetlb_file.hstate.size
            for addr in range(vma.start, vma.end, size):
                t = pmd_lookup(m, mm, addr)
                if t < 0:
                    continue
                e = pm.tables[t][pmd_index(addr)]
                if not e:
                    continue
                if not is_hugetlb_pmd(m, e):
                    errs.append(f"{task.name}: hugetlb VMA entry {e:#x} at {addr:#x} maps "
                                "no hugetlb folio")
                    continue
                if (t, pmd_index(addr)) not in slots:
                    slots.add((t, pmd_index(addr)))
                    maps[pmd_pfn(e)] += 1
    hugetlb, shared = _typed_pages(ctx)
    errs.extend(shared_pmd_errors(m, shared))
    # (in the order of the struct pages, as the errors are listed)
    folios = [pg for p, pg in pm.pages.items() if p in hugetlb] if hugetlb else []
    for h in m.hugetlb.hstates:
        mine = [f for f in folios if f.order == h.order]
        free = set(h.freelist)
        if len(free) != len(h.freelist) or len(free) != h.free_huge_pages:
            errs.append(f"{h.name}: free_huge_pages {h.free_huge_pages} != free list "
                        f"{len(h.freelist)}")
        if len(mine) != h.nr_huge_pages:
            errs.append(f"{h.name}: nr_huge_pages {h.nr_huge_pages} != {len(mine)} "
                        "hugetlb folios")
        if h.resv_huge_pages > h.free_huge_pages:
            errs.append(f"{h.name}: resv_huge_pages {h.resv_huge_pages} above "
                        f"free {h.free_huge_pages}")
        if not 0 <= h.surplus_huge_pages <= h.nr_huge_pages:
            errs.append(f"{h.name}: surplus {h.surplus_huge_pages} outside the pool")
        for f in mine:
            if f.flags & (PG_lru | PG_isolated) or f.on_deferred_list:
                errs.append(f"hugetlb folio {f.pfn:#x} on the LRU or deferred split queue")
            if mmzone.all_zones(m).is_free(f.pfn):
                errs.append(f"hugetlb folio {f.pfn:#x} is on a buddy free list")
            n = maps.get(f.pfn, 0)
            if f.pfn in free:
                if f.refcount or f.entire_mapcount or n:
                    errs.append(f"free hugetlb folio {f.pfn:#x} in use: {f!r}")
                continue
            if f.entire_mapcount != n or f.large_mapcount != n:
                errs.append(f"hugetlb folio {f.pfn:#x}: mapcount {f.entire_mapcount} != "
                            f"{n} mappings")
            want = n + (1 if f.pfn in cached else 0)
            if want and f.refcount != want:  # (an unmapped one is being allocated or freed)
                errs.append(f"hugetlb folio {f.pfn:#x}: refcount {f.refcount} != {n} "
                            f"mappings + {want - n} page cache")
    return errs


def _typed_pages(ctx) -> tuple[set[int], set[int]]:
    """The pfns of hugetlb folios and of pages with a pt_share_count, kept from check
    to check by the struct pages that changed (ctx.dirty_pages)."""
    st = ctx.state.get("hugetlb_pages")
    if st is None:
        st = ctx.state["hugetlb_pages"] = (set(), set())
    hugetlb, shared = st
    pages = ctx.m.physmem.pages
    for p in ctx.dirty_pages:
        pg = pages.get(p)
        if pg is not None and pg.page_type == PGTY_hugetlb:
            hugetlb.add(p)
        else:
            hugetlb.discard(p)
        if pg is not None and pg.pt_share_count:
            shared.add(p)
        else:
            shared.discard(p)
    return st


def shared_pmd_errors(m, shared: set[int] | None = None) -> list[str]:
    """pt_share_count against the PUD entries that reach each PMD table; a table
    shared must be alive (never freed while shared) and reached only through shared
    hugetlb VMAs. ``shared``: the pfns whose struct page has a pt_share_count, if the
    caller keeps them (else every struct page is looked at)."""
    from kmm.mm_types import VM_MAYSHARE
    errs = []
    refs = hugetlb_pmd_share.shared_pmd_tables(m)
    pm = m.physmem
    for t, n in refs.items():
        pg = pm.pages.get(t)
        cnt = pg.pt_share_count if pg is not None else 0
        if cnt != n - 1:
            errs.append(f"PMD table {t:#x}: pt_share_count {cnt} but {n} PUD entries "
                        "map it")
    for task in m.tasks_with_tables():  # an exiting mm's tables count until exit_mmap
        mm = task.mm
        for vma in mm.vmas:
            if vma.hugetlb_file is None or vma.flags & VM_MAYSHARE:
                continue
            for base in range(vma.start & ~(PUD_SIZE - 1), vma.end, PUD_SIZE):
                t = pmd_lookup(m, mm, base)
                if t >= 0 and t in refs and refs[t] > 1:
                    errs.append(f"{task.name}: private hugetlb VMA at {vma.start:#x} "
                                f"reaches shared PMD table {t:#x}")
    if shared is None:
        looked = pm.pages.items()
    else:  # (in the order of the struct pages, as the errors are listed)
        looked = [(p, pg) for p, pg in pm.pages.items() if p in shared] if shared else ()
    for pfn, pg in looked:
        if pg.pt_share_count and (pg.page_type != "table" or pg.pt_level != "pmd"
                                  or mmzone.all_zones(m).is_free(pfn) or pfn not in refs):
            errs.append(f"page {pfn:#x} has pt_share_count {pg.pt_share_count} but is "
                        "no live PMD table (freed while shared)")
    return errs


def unchecked_ranges(task) -> list[tuple[int, int]]:
    """The data check's exceptions: a shared hugetlb mapping (another process may have
    written the byte since: no private shadow holds it) and a private one whose page a
    parent's COW took (unmap_ref_private: the next access is SIGBUS)."""
    from kmm import hugetlb_resv
    from kmm.mm_types import VM_SHARED
    return [(v.start, v.end) for v in task.mm.vmas
            if v.hugetlb_file is not None and (v.flags & VM_SHARED or hugetlb_resv.is_vma_resv_set(
                v, hugetlb_resv.HPAGE_RESV_UNMAPPED))]
