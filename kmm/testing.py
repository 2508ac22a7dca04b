"""The invariant checker, run after every step in tests (and every point in explore).

``check_invariants(m, k)`` rebuilds, from the page tables alone, what every struct page
must say, and compares:

- every mapped pfn is allocated (not on a free list), and every page table is too;
- per page: PTE mapcount = PTE mappings; per folio: entire mapcount = PMD mappings,
  large mapcount = all mappings, refcount = mappings (no pins are modelled);
- per mm: nr_ptes = PTE tables + deposited tables; pgtables_bytes = every table page;
  Rss counter = mapped pages; per PMD table: deposited tables = huge PMDs under it;
- the buddy free lists are consistent (page_alloc.Zone.check);
- with a Kernel, every byte a workload wrote reads back (through the page tables,
  without faulting).
"""

from __future__ import annotations

from collections import Counter

from kmm import hugetlb_resv, pagewalk, swap, swapfile
from kmm.mm_types import PG_isolated, PG_lru, PG_swapcache, PGTY_hugetlb, VM_SHARED
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, TASK_SIZE, is_migration_entry, is_pmd_migration_entry,
    migration_entry_pfn, pmd_pfn, pmd_present, pmd_trans_huge, pte_pfn, pte_present,
    pte_special, table_pfn,
)


class InvariantError(AssertionError):
    """An invariant of the machine does not hold; the message lists every breach."""


def check_invariants(m, k=None) -> None:
    errs = invariant_errors(m, k)
    if errs:
        raise InvariantError("\n".join(errs[:40]))


def invariant_errors(m, k=None) -> list[str]:
    errs: list[str] = []
    pm = m.physmem
    zone = m.zone
    pte_maps: Counter = Counter()   # pfn -> PTE mappings
    pmd_maps: Counter = Counter()   # head pfn -> PMD mappings
    htlb_maps: Counter = Counter()  # hugetlb folio -> PMD mappings (hugetlb_check)
    for task in m.tasks.values():
        mm = task.mm
        if not task.alive or mm.pgd < 0:
            continue
        tables = list(pagewalk.page_tables(m, mm))
        nr_pte_tables = sum(1 for lvl, _, _ in tables if lvl == "pte")
        deposited = 0
        rss = 0
        for lvl, t, _ in tables:
            if zone.is_free(t):
                errs.append(f"{task.name}: {lvl} table {t:#x} is on a free list")
            pg = pm.pages.get(t)
            if pg is None or pg.page_type != "table":
                errs.append(f"{task.name}: {lvl} table {t:#x} is not a page-table page")
            if lvl == "pmd":
                huge = sum(1 for e in pm.tables[t]
                           if e and (pmd_trans_huge(e) or is_pmd_migration_entry(e))
                           and not _is_hugetlb_pmd(m, e))
                dep = len(pg.pt_deposit or ()) if pg else 0
                deposited += dep
                if dep != huge:
                    errs.append(f"{task.name}: PMD table {t:#x} has {huge} huge PMDs but "
                                f"{dep} deposited tables")
                for d in (pg.pt_deposit or ()) if pg else ():
                    if zone.is_free(d) or any(pm.tables.get(d, [1])):
                        errs.append(f"{task.name}: deposited table {d:#x} free or not empty")
        if mm.nr_ptes != nr_pte_tables + deposited:
            errs.append(f"{task.name}: nr_ptes {mm.nr_ptes} != {nr_pte_tables} PTE tables "
                        f"+ {deposited} deposited")
        if mm.pgtables_bytes != (len(tables) + deposited) * PAGE_SIZE:
            errs.append(f"{task.name}: pgtables_bytes {mm.pgtables_bytes} != "
                        f"{len(tables) + deposited} table pages")
        for addr, level, e in pagewalk.walk_leaves(m, mm, 0, TASK_SIZE):
            if level == "pmd":
                if _is_hugetlb_pmd(m, e):
                    htlb_maps[pmd_pfn(e)] += 1  # counts in no RSS counter
                    vma = mm.vma_lookup(addr)
                    if vma is None or vma.vm_file is None:
                        errs.append(f"{task.name}: hugetlb PMD at {addr:#x} outside a "
                                    "hugetlb VMA")
                    continue
                if pmd_present(e):
                    pfn = pmd_pfn(e)
                    if m.is_huge_zero_pfn(pfn):
                        continue
                    pmd_maps[pfn] += 1
                    rss += HPAGE_PMD_NR
                else:
                    rss += HPAGE_PMD_NR
            elif pte_present(e):
                if not pte_special(e):
                    pte_maps[pte_pfn(e)] += 1
                    rss += 1
                elif pte_pfn(e) != m.zero_pfn:
                    errs.append(f"{task.name}: special PTE at {addr:#x} is not the zero page")
            elif is_migration_entry(e):
                rss += 1
            elif swapfile.is_swap_entry(m, e):
                pass  # MM_SWAPENTS and the slot's count: swapfile.check
            else:
                errs.append(f"{task.name}: unknown non-present PTE {e:#x} at {addr:#x}")
        if rss != mm.rss_anon:
            errs.append(f"{task.name}: MM_ANONPAGES {mm.rss_anon} != {rss} mapped pages")
        for vma in mm.vmas:
            if vma.start >= vma.end or vma.start & (PAGE_SIZE - 1):
                errs.append(f"{task.name}: bad VMA {vma!r}")
    # struct pages against the mappings found
    folios: Counter = Counter()  # head -> all mappings
    for pfn, n in pte_maps.items():
        page = pm.pages.get(pfn)
        if page is None or page.mapcount != n:
            errs.append(f"pfn {pfn:#x}: mapcount {page.mapcount if page else None} != "
                        f"{n} PTE mappings")
        if zone.is_free(pfn):
            errs.append(f"pfn {pfn:#x}: mapped but free")
        folios[pm.folio(pfn).pfn] += n
    for head, n in pmd_maps.items():
        folio = pm.pages.get(head)
        if folio is None or folio.entire_mapcount != n:
            errs.append(f"folio {head:#x}: entire mapcount "
                        f"{folio.entire_mapcount if folio else None} != {n} PMD mappings")
        if zone.is_free(head):
            errs.append(f"folio {head:#x}: PMD-mapped but free")
        folios[head] += n
    for head, n in folios.items():
        folio = pm.pages[head]
        total = folio.large_mapcount if folio.order else folio.mapcount
        if total != n:
            errs.append(f"folio {head:#x}: mapcount {total} != {n} mappings")
        # an isolated folio (compaction, reclaim) holds the isolation reference too
        isolated = 1 if folio.flags & PG_isolated else 0
        cache = folio.nr_pages if folio.flags & PG_swapcache else 0  # swap cache refs
        # a deferred split scan in progress holds a reference on each folio of its batch
        isolated += m.split_scan_pins.get(head, 0)
        if folio.refcount != n + isolated + cache:
            errs.append(f"folio {head:#x}: refcount {folio.refcount} != {n} mappings"
                        + (" + 1 isolation" if isolated else "")
                        + (f" + {cache} swap cache" if cache else ""))
        if folio.order:
            mapped = sum(1 for p in range(head, head + folio.nr_pages)
                         if pm.pages.get(p) is not None and pm.pages[p].mapcount)
            if mapped != folio.nr_pages_mapped:
                errs.append(f"folio {head:#x}: nr_pages_mapped {folio.nr_pages_mapped} "
                            f"!= {mapped}")
    # nothing else may hold a mapcount
    for pfn, page in pm.pages.items():
        if page.mapcount and pfn not in pte_maps:
            errs.append(f"pfn {pfn:#x}: mapcount {page.mapcount} but not mapped")
        if page.entire_mapcount and pfn not in pmd_maps and pfn not in htlb_maps:
            errs.append(f"folio {pfn:#x}: entire mapcount {page.entire_mapcount} but "
                        f"not PMD-mapped")
    for pfn in m.deferred_split_queue:
        f = pm.pages.get(pfn)
        if f is None or not f.on_deferred_list or not f.order or zone.is_free(pfn):
            errs.append(f"deferred split queue holds {pfn:#x}, not a queued large folio")
    errs.extend(hugetlb_check(m, htlb_maps))
    errs.extend(zone.check())
    errs.extend(swap.lru_check(m))
    errs.extend(swapfile.check(m))
    for head in folios:
        if not pm.pages[head].flags & (PG_lru | PG_isolated):
            errs.append(f"folio {head:#x}: mapped but on no LRU list")
    if k is not None:
        errs.extend(_data_errors(m, k))
    return errs


def _is_hugetlb_pmd(m, e: int) -> bool:
    if not (e and pmd_trans_huge(e)):
        return False
    pg = m.physmem.pages.get(pmd_pfn(e))
    return pg is not None and pg.page_type == PGTY_hugetlb


def hugetlb_check(m, htlb_maps: Counter) -> list[str]:
    """hugetlb folios: the pool counts add up (free = the free list, every free folio
    unreferenced and unmapped, reservations within the free pages, surplus within the
    pool), each in-use folio's entire mapcount equals its PMD mappings and its refcount
    the mappings plus a page-cache reference, and none is on the LRU or the deferred
    split queue."""
    errs: list[str] = []
    pm = m.physmem
    cached: set[int] = set()
    for task in m.tasks.values():
        if not task.alive or task.mm.pgd < 0:
            continue
        for vma in task.mm.vmas:
            if vma.vm_file is not None:
                cached.update(vma.vm_file.cache.values())
    hugetlb_folios = [p for p in pm.pages.values() if p.page_type == PGTY_hugetlb]
    for h in m.hugetlb.hstates:
        mine = [f for f in hugetlb_folios if f.order == h.order]
        free = set(h.freelist)
        if len(free) != len(h.freelist) or len(free) != h.free_huge_pages:
            errs.append(f"{h.name}: free_huge_pages {h.free_huge_pages} != free list "
                        f"{len(h.freelist)}")
        if len(mine) != h.nr_huge_pages:
            errs.append(f"{h.name}: nr_huge_pages {h.nr_huge_pages} != {len(mine)} "
                        "hugetlb folios")
        # (below 0 is 6.18's own underflow: see hugetlb_report_meminfo)
        if h.resv_huge_pages > h.free_huge_pages:
            errs.append(f"{h.name}: resv_huge_pages {h.resv_huge_pages} above "
                        f"free {h.free_huge_pages}")
        if not 0 <= h.surplus_huge_pages <= h.nr_huge_pages:
            errs.append(f"{h.name}: surplus {h.surplus_huge_pages} outside the pool")
        for f in mine:
            if f.flags & (PG_lru | PG_isolated) or f.on_deferred_list:
                errs.append(f"hugetlb folio {f.pfn:#x} on the LRU or deferred split queue")
            if m.zone.is_free(f.pfn):
                errs.append(f"hugetlb folio {f.pfn:#x} is on a buddy free list")
            n = htlb_maps.get(f.pfn, 0)
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
    for pfn in htlb_maps:
        pg = pm.pages.get(pfn)
        if pg is None or pg.page_type != PGTY_hugetlb:
            errs.append(f"pfn {pfn:#x} mapped as hugetlb but not a hugetlb folio")
    return errs


def read_mapped_byte(m, mm, addr: int) -> int | None:
    """The byte at addr through mm's page tables, without faulting (None if unmapped)."""
    from kmm.memory import pmd_lookup
    from kmm.pgtable import pmd_index, pte_index
    t = pmd_lookup(m, mm, addr)
    if t < 0:
        return None
    e = m.physmem.tables[t][pmd_index(addr)]
    if not e:
        return None
    if pmd_trans_huge(e):
        pfn = pmd_pfn(e) + ((addr >> 12) & 511)
    elif is_pmd_migration_entry(e):
        pfn = migration_entry_pfn(e) + ((addr >> 12) & 511)
    else:
        p = m.physmem.tables[table_pfn(e)][pte_index(addr)]
        if not p:
            return None
        if swapfile.is_swap_entry(m, p):
            return swapfile.read_swapped_byte(m, p, addr & 4095)
        pfn = migration_entry_pfn(p) if is_migration_entry(p) else pte_pfn(p)
    return m.physmem.read(pfn, addr & 4095, 1)[0]


def _data_errors(m, k) -> list[str]:
    errs = []
    for name, shadow in k.shadow.items():
        task = m.tasks.get(name)
        if task is None or not task.alive:
            continue
        for addr, want in shadow.items():
            vma = task.mm.vma_lookup(addr)
            if vma is not None and vma.flags & VM_SHARED:
                continue  # another process may have written it since: no private shadow
            if vma is not None and hugetlb_resv.is_vma_resv_set(
                    vma, hugetlb_resv.HPAGE_RESV_UNMAPPED):
                continue  # unmap_ref_private took it: the next access is SIGBUS
            got = read_mapped_byte(m, task.mm, addr)
            if got is not None and got != want:
                errs.append(f"{name}: byte at {addr:#x} reads {got}, was written {want}")
            if got is None and want != 0:
                vma = task.mm.vma_lookup(addr)
                if vma is not None:
                    errs.append(f"{name}: written byte at {addr:#x} is no longer mapped")
        for addr, want in k.lazy.get(name, {}).items():
            got = read_mapped_byte(m, task.mm, addr)
            if got not in (None, 0, want):
                errs.append(f"{name}: MADV_FREE'd byte at {addr:#x} reads {got}, "
                            f"was written {want}")
    return errs


def check_between_ops(m, k) -> None:
    """check_invariants, unless another actor is inside an operation (holds a lock):
    the invariants hold between operations, not halfway through another CPU's fault."""
    cur = m.sched.current
    if not any(a.held for a in m.sched.actors if a is not cur):
        check_invariants(m, k)


def run_machine(fn, *, memory: int = 1 << 30, cpus: int = 1, seed: int = 1,
                mode: str = "free", knobs: dict | None = None, check=check_invariants,
                swap: int = 0):
    """Run ``await fn(m, k)`` as the driver of a fresh machine, ``check(m, k)`` after
    every workload operation and at the end. Returns (machine, fn's value)."""
    from kmm.machine import Machine, MachineConfig
    from kmm.runtime.trace import Trace
    from kmm.workload import Kernel
    m = Machine(MachineConfig(memory=memory, swap=swap, cpus=cpus, seed=seed), mode=mode,
                trace=Trace())
    for name, value in (knobs or {}).items():
        m.sysfs.write(name, value)
    k = Kernel(m)
    k.after_op = lambda: check(m, k)
    box = {}

    async def driver() -> None:
        box["value"] = await fn(m, k)
        check_invariants(m, k)

    m.run(driver)
    return m, box.get("value")


async def together(m, **fns) -> None:
    """Run each ``fns[name]()`` as its own actor named ``name`` on CPU i (mod the CPU
    count) and wait for all of them: a forced concurrency for tests."""
    await m.sched.spawn_and_join([(name, fn, i % len(m.cpus))
                                  for i, (name, fn) in enumerate(fns.items())])
