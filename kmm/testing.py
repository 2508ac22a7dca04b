"""The invariant checker, run after every step in tests (and every point in explore).

``check_invariants(m, k)`` rebuilds, from the page tables alone, what every struct page
must say, and compares:

- every mapped pfn is allocated (not on a free list), and every page table is too;
- per page: PTE mapcount = PTE mappings; per folio: entire mapcount = PMD mappings,
  large mapcount = all mappings, refcount = mappings (no pins are modelled);
- per mm: nr_ptes = PTE tables + deposited tables; pgtables_bytes = every table page;
  Rss counter = mapped pages; per PMD table: deposited tables = huge PMDs under it;
- the buddy free lists are consistent (page_alloc.Zone.check);
- every mapping (present PTE or PMD, swap or migration entry) lies inside a VMA of its
  mm (``vma_errors``);
- a page marked PG_anon_exclusive, and a page named by an exclusive migration or swap
  entry, is mapped by one mm, once (``anon_exclusive_errors``);
- no RCU callback outlives its grace period (rcupdate.rcu_errors);
- with a Kernel, every byte a workload wrote reads back (through the page tables,
  without faulting), and every process reads what it wrote itself or zero: a byte
  another process wrote, after a fork or anywhere, never shows through
  (``cross_process_errors``).

Each check is a function ``(m, k) -> list of error strings``; ``CHECKS`` lists the
ones ``invariant_errors`` runs after its own scan.
"""

from __future__ import annotations

from collections import Counter

from kmm import pagewalk, rcupdate, swap, swapfile
from kmm.mm_types import PG_anon_exclusive, PG_isolated, PG_lru, PG_swapcache
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE, SWP_MIGRATION_READ_EXCLUSIVE, TASK_SIZE,
    _PAGE_SWP_EXCLUSIVE, is_migration_entry, is_pmd_migration_entry,
    is_writable_migration_entry, migration_entry_pfn, pmd_pfn, pmd_present,
    pmd_trans_huge, pte_pfn, pte_present, pte_special, swp_entry, swp_offset, swp_type,
    table_pfn,
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
                           if e and (pmd_trans_huge(e) or is_pmd_migration_entry(e)))
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
        if page.entire_mapcount and pfn not in pmd_maps:
            errs.append(f"folio {pfn:#x}: entire mapcount {page.entire_mapcount} but "
                        f"not PMD-mapped")
    for pfn in m.deferred_split_queue:
        f = pm.pages.get(pfn)
        if f is None or not f.on_deferred_list or not f.order or zone.is_free(pfn):
            errs.append(f"deferred split queue holds {pfn:#x}, not a queued large folio")
    errs.extend(zone.check())
    errs.extend(swap.lru_check(m))
    errs.extend(swapfile.check(m))
    for head in folios:
        if not pm.pages[head].flags & (PG_lru | PG_isolated):
            errs.append(f"folio {head:#x}: mapped but on no LRU list")
    for check in CHECKS:
        errs.extend(check(m, k))
    if k is not None:
        errs.extend(_data_errors(m, k))
    return errs


def _live_tasks(m):
    for task in m.tasks.values():
        if task.alive and task.mm.pgd >= 0:
            yield task


def vma_errors(m, k=None) -> list[str]:
    """Every mapping lies inside a VMA of its mm: a present PTE, a swap or migration
    entry in a VMA; a huge PMD (or PMD migration entry) with its whole 2 MiB in one.
    A mapping left behind by munmap, mremap or a VMA split is reachable by no fault,
    zap or rmap walk that goes by VMAs, so its page leaks or is read by the wrong
    process later."""
    errs = []
    for task in _live_tasks(m):
        mm = task.mm
        for addr, level, e in pagewalk.walk_leaves(m, mm, 0, TASK_SIZE):
            vma = mm.vma_lookup(addr)
            if vma is None:
                errs.append(f"{task.name}: {level.upper()} {e:#x} at {addr:#x} lies in no VMA")
            elif level == "pmd" and vma.end < addr + PMD_SIZE:
                errs.append(f"{task.name}: huge PMD {e:#x} at {addr:#x} runs past the end "
                            f"of its VMA [{vma.start:#x}, {vma.end:#x})")
    return errs


def _exclusive_migration(e: int) -> bool:
    return is_writable_migration_entry(e) or swp_type(e) == SWP_MIGRATION_READ_EXCLUSIVE


def anon_exclusive_errors(m, k=None) -> list[str]:
    """Anon-exclusive ownership (mm/rmap.c, PageAnonExclusive): a page marked
    PG_anon_exclusive is mapped by one mm, by one mapping (a PTE of the page or a PMD
    of its folio, or a migration entry standing for either), so a write there may
    reuse it in place without COW; an exclusive migration entry likewise stands for
    the page's only mapping; an exclusive swap PTE is its slot's only PTE, and a
    page swapped in as exclusive leaves no other PTE on its slot. After fork shares a
    page, neither process may hold it exclusively, or one's write shows in the
    other."""
    errs: list[str] = []
    pm = m.physmem
    pte_mms: dict[int, set] = {}
    pte_n: Counter = Counter()
    pmd_mms: dict[int, set] = {}
    pmd_n: Counter = Counter()
    claims = []  # exclusive migration entries: (task, addr, pfn, is_pmd)
    slots: dict[int, list] = {}  # swap entry -> [(task, exclusive bit)]
    for task in _live_tasks(m):
        name = task.name
        for addr, level, e in pagewalk.walk_leaves(m, task.mm, 0, TASK_SIZE):
            if level == "pmd":
                if pmd_present(e):
                    pfn = pmd_pfn(e)
                    if m.is_huge_zero_pfn(pfn):
                        continue
                elif is_pmd_migration_entry(e):
                    pfn = migration_entry_pfn(e)
                    if _exclusive_migration(e):
                        claims.append((name, addr, pfn, True))
                else:
                    continue
                pmd_mms.setdefault(pfn, set()).add(name)
                pmd_n[pfn] += 1
                continue
            if pte_present(e):
                if pte_special(e):
                    continue
                pfn = pte_pfn(e)
            elif is_migration_entry(e):
                pfn = migration_entry_pfn(e)
                if _exclusive_migration(e):
                    claims.append((name, addr, pfn, False))
            elif swapfile.is_swap_entry(m, e):
                slots.setdefault(swapfile.pte_to_swp_entry(e), []).append(
                    (name, bool(e & _PAGE_SWP_EXCLUSIVE)))
                continue
            else:
                continue
            pte_mms.setdefault(pfn, set()).add(name)
            pte_n[pfn] += 1

    def owners(pfn: int) -> tuple[set, int]:
        head = pm.pages[pfn].head if pfn in pm.pages else pfn
        return (pte_mms.get(pfn, set()) | pmd_mms.get(head, set()),
                pte_n[pfn] + pmd_n[head])

    def claim(what: str, pfn: int) -> None:
        mms, n = owners(pfn)
        if len(mms) > 1:
            errs.append(f"pfn {pfn:#x}: {what} but mapped by {len(mms)} mms "
                        f"({', '.join(sorted(mms))})")
        elif n > 1:
            errs.append(f"pfn {pfn:#x}: {what} but mapped {n} times")

    for pfn, page in pm.pages.items():
        if page.flags & PG_anon_exclusive:
            claim("PG_anon_exclusive", pfn)
            folio = pm.folio(pfn)
            if folio.flags & PG_swapcache and slots:
                slot = swp_entry(swp_type(folio.swap), swp_offset(folio.swap) + pfn - folio.pfn)
                if slots.get(slot):
                    errs.append(f"pfn {pfn:#x}: PG_anon_exclusive in the swap cache but "
                                f"{len(slots[slot])} swap PTEs still name its slot")
    for name, addr, pfn, is_pmd in claims:
        for p in range(pfn, pfn + (HPAGE_PMD_NR if is_pmd else 1)):
            claim(f"exclusive migration entry of {name} at {addr:#x}", p)
    for slot, ptes in slots.items():
        if len(ptes) > 1 and any(ex for _, ex in ptes):
            errs.append(f"swap entry {slot:#x}: an exclusive swap PTE but {len(ptes)} PTEs "
                        f"({', '.join(sorted(n for n, _ in ptes))})")
    return errs


def rcu_errors(m, k=None) -> list[str]:
    return rcupdate.rcu_errors(m)


def cross_process_errors(m, k) -> list[str]:
    """The cross-process view: what each process reads is what it wrote itself (its
    shadow, forked with it) or zero. A byte another process wrote, in its own memory
    or after a fork in memory they shared, never shows through: a COW that wrote into
    a shared page, or a page still shared after one side broke COW, shows here as a
    byte the process never wrote."""
    if k is None:
        return []
    errs: list[str] = []
    writer: dict[int, str] = {}
    for name in sorted(k.shadow):
        for table in (k.shadow[name], k.lazy.get(name, {})):
            for addr in table:
                writer.setdefault(addr, name)
    for name, shadow in sorted(k.shadow.items()):
        task = m.tasks.get(name)
        if task is None or not task.alive:
            continue
        lazy = k.lazy.get(name, {})
        unknown = k.unknown.get(name, ())
        for addr, other in writer.items():
            if addr in shadow or addr in lazy or addr in unknown:
                continue
            got = read_mapped_byte(m, task.mm, addr)
            if got not in (None, 0):
                errs.append(f"{name}: byte at {addr:#x} reads {got}, but {name} never "
                            f"wrote it (it was written by {other})")
    return errs


CHECKS = (vma_errors, anon_exclusive_errors, rcu_errors, cross_process_errors)


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
        unknown = k.unknown.get(name, ())
        for addr, want in shadow.items():
            if addr in unknown:
                continue
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


def inside_update(m, actor) -> bool:
    """The actor is halfway through an update of shared state: it holds a lock (every
    multi-step update but one is made under a lock), a server actor is handling a
    request, or it is inside __folio_put (refcount 0, the folio not yet off the LRU
    and back in the buddy: Machine.free_folio)."""
    return bool(actor.held or actor.busy or actor in m.freeing)


def quiescent(m, but=None) -> bool:
    """No actor (other than ``but``) is inside an update: the invariants must hold."""
    return not any(inside_update(m, a) for a in m.sched.actors if a is not but)


def check_between_ops(m, k) -> None:
    """check_invariants, unless another actor is inside an operation (holds a lock,
    or is freeing a folio): the invariants hold between operations, not halfway
    through another CPU's fault."""
    if quiescent(m, but=m.sched.current):
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
