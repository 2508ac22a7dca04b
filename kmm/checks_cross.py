"""Checks across structures and processes, for kmm.checks (which registers them):
every mapping inside a VMA, anon-exclusive ownership, RCU grace periods, and the
cross-process view of the bytes the workload wrote.

Emulator-only (the kernel's twins: VM_BUG_ONs on the rmap and COW paths, and the
COW selftests). Each check is ``fn(m, k) -> list of error strings``; a breach found
nowhere else by the mapping check: a mapping with no VMA to reach it by, a page two
processes share although marked exclusive (the next write reuses it in place), a byte
one process wrote showing in another after a fork. The VMA and anon-exclusive checks
also have an incremental form, ``fn(ctx)`` (vma_check, anon_exclusive_check: what
kmm.checks registers), with the full form's verdicts in the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import compress

from kmm import checks_data, checks_hugetlb, pagewalk, rcupdate, swapfile
from kmm.mm_types import PG_anon_exclusive, PG_swapcache
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE, PUD_SIZE, SWP_MIGRATION_READ_EXCLUSIVE, TASK_SIZE,
    _PAGE_SWP_EXCLUSIVE, is_migration_entry, is_pmd_migration_entry,
    is_writable_migration_entry, migration_entry_pfn, pmd_pfn, pmd_present, pmd_trans_huge,
    pte_pfn, pte_present, pte_special, swp_entry, swp_offset, swp_type,
)


def _mapped_tasks(m):
    """Every mm with page tables, an exiting one too (Machine.tasks_with_tables)."""
    return m.tasks_with_tables()


# The incremental variants (``*_check(ctx)``, what kmm.checks registers) keep one
# summary per leaf table, as the mapping check does, and recompute it only when the
# table's entries changed (``ctx.dirty_tables``) or what the summary read changed;
# they take each mm's leaf tables from the mapping check, which runs first at every
# check ("always"). A full Checker (``ctx.incremental`` false) runs the full
# functions. Both read leaves through the same helpers, so a verdict is written once.
def _table_leaves(m, lvl: str, t: int, base: int) -> Iterator[tuple[int, str, int]]:
    """(address, level, entry) of one leaf table's leaves, as pagewalk.walk_leaves
    yields them: a PMD table's huge or non-present PMDs, a PTE table's non-empty PTEs."""
    tbl = m.physmem.tables[t]
    if lvl == "pmd":
        for n in compress(range(len(tbl)), tbl):
            e = tbl[n]
            if pmd_trans_huge(e) or not pmd_present(e):
                yield base + n * PMD_SIZE, "pmd", e
    else:
        for n in compress(range(len(tbl)), tbl):
            yield base + n * PAGE_SIZE, "pte", tbl[n]


def _mm_leaf_tables(ctx, tasks) -> list[tuple] | None:
    """Each task's leaf tables as (level, pfn, base, span), its PMD tables then its
    PTE tables, each in address order, from the mapping check's walk at this check;
    None if it has none for a task."""
    st = ctx.state.get("mappings")
    if st is None or any(t.name not in st.leaves for t in tasks):
        return None
    out = []
    for task in tasks:
        pmds, ptes = st.leaves[task.name]
        # walk_leaves stops at TASK_SIZE (TASK_SIZE is PGDIR-aligned)
        out.append([("pmd", t, b, PUD_SIZE) for t, b in pmds if b < TASK_SIZE]
                   + [("pte", t, b, PMD_SIZE) for t, b in ptes if b < TASK_SIZE])
    return out


# ------------------------------------------------------------------- VMAs
def _vma_leaf_errors(mm, name: str, leaves) -> list[tuple[int, str]]:
    """(address, error) for each leaf outside a VMA of mm, or a huge PMD running past
    the end of its VMA."""
    errs = []
    for addr, level, e in leaves:
        vma = mm.vma_lookup(addr)
        if vma is None:
            errs.append((addr, f"{name}: {level.upper()} {e:#x} at {addr:#x} lies in no VMA"))
        elif level == "pmd" and vma.end < addr + PMD_SIZE:
            errs.append((addr, f"{name}: huge PMD {e:#x} at {addr:#x} runs past the end "
                               f"of its VMA [{vma.start:#x}, {vma.end:#x})"))
    return errs


def vma_errors(m, k=None) -> list[str]:
    """Every mapping lies inside a VMA of its mm: a present PTE, a swap or migration
    entry in a VMA; a huge PMD (or PMD migration entry) with its whole 2 MiB in one.
    A mapping left behind by munmap, mremap or a VMA split is reachable by no fault,
    zap or rmap walk that goes by VMAs, so its page leaks or is read by the wrong
    process later."""
    errs = []
    for task in _mapped_tasks(m):
        leaves = pagewalk.walk_leaves(m, task.mm, 0, TASK_SIZE)
        errs.extend(err for _, err in _vma_leaf_errors(task.mm, task.name, leaves))
    return errs


def _vmas_changed(old: tuple | None, new: tuple) -> list[tuple[int, int]]:
    """The address ranges where vma_lookup may answer differently under VMAs ``new``
    than under ``old`` (each a tuple of (start, end)): the VMAs in one and not the
    other, while both are sorted and disjoint (as vma_lookup's search assumes);
    everything otherwise."""
    def sane(v):
        return all(s < e for s, e in v) and all(a[1] <= b[0] for a, b in zip(v, v[1:]))
    if old is None or not sane(old) or not sane(new):
        return [(0, 1 << 64)]
    return list(set(old) ^ set(new))


class _VmaState:
    def __init__(self) -> None:
        # (leaf table, task, base) -> (level, errors): a table may be in two mms, or
        # twice in one (a shared hugetlb PMD table)
        self.sums: dict[tuple[int, str, int], tuple] = {}
        self.vmas: dict[str, tuple] = {}  # task -> its VMAs' (start, end) at the last run


def vma_check(ctx) -> list[str]:
    """vma_errors, a leaf table's verdicts kept while its entries and the VMAs over
    its range stay as they were."""
    m = ctx.m
    tasks = _mapped_tasks(m)
    leaf_tables = _mm_leaf_tables(ctx, tasks) if ctx.incremental else None
    if leaf_tables is None:
        ctx.state.pop("vmas", None)
        return vma_errors(m, ctx.k)
    st: _VmaState = ctx.state.get("vmas") or ctx.state.setdefault("vmas", _VmaState())
    dt = ctx.dirty_tables
    errs: list[str] = []
    live: set[tuple[int, str, int]] = set()
    for task, tables in zip(tasks, leaf_tables):
        mm, name = task.mm, task.name
        vmas = tuple((v.start, v.end) for v in mm.vmas)
        old = st.vmas.get(name)
        changed = _vmas_changed(old, vmas) if old != vmas else ()
        st.vmas[name] = vmas
        found = []
        for lvl, t, base, span in tables:
            key = (t, name, base)
            s = st.sums.get(key)
            if (s is None or s[0] != lvl or t in dt
                    or any(lo < base + span and base < hi for lo, hi in changed)):
                s = st.sums[key] = (lvl, _vma_leaf_errors(mm, name,
                                                          _table_leaves(m, lvl, t, base)))
            live.add(key)
            found.extend(s[1])
        found.sort()  # walk order: by address (one leaf per address)
        errs.extend(err for _, err in found)
    for key in [key for key in st.sums if key not in live]:
        del st.sums[key]
    names = {t.name for t in tasks}
    for name in [n for n in st.vmas if n not in names]:
        del st.vmas[name]
    return errs


# ------------------------------------------------------ anon-exclusive ownership
def _exclusive_migration(e: int) -> bool:
    return is_writable_migration_entry(e) or swp_type(e) == SWP_MIGRATION_READ_EXCLUSIVE


def _anon_leaf_summary(m, leaves) -> tuple[Counter, Counter, list, list]:
    """Leaves as anon-exclusive ownership sees them: (PTE mappings per pfn, PMD
    mappings per pfn, exclusive migration entries as (address, pfn, is_pmd), swap PTEs
    as (address, swap entry, exclusive bit)). A migration entry maps its page too."""
    pte_n: Counter = Counter()
    pmd_n: Counter = Counter()
    claims = []
    swaps = []
    for addr, level, e in leaves:
        if level == "pmd":
            if pmd_present(e):
                pfn = pmd_pfn(e)
                if m.is_huge_zero_pfn(pfn):
                    continue
            elif is_pmd_migration_entry(e):
                pfn = migration_entry_pfn(e)
                if _exclusive_migration(e):
                    claims.append((addr, pfn, True))
            else:
                continue
            pmd_n[pfn] += 1
            continue
        if pte_present(e):
            if pte_special(e):
                continue
            pfn = pte_pfn(e)
        elif is_migration_entry(e):
            pfn = migration_entry_pfn(e)
            if _exclusive_migration(e):
                claims.append((addr, pfn, False))
        elif swapfile.is_swap_entry(m, e):
            swaps.append((addr, swapfile.pte_to_swp_entry(e), bool(e & _PAGE_SWP_EXCLUSIVE)))
            continue
        else:
            continue
        pte_n[pfn] += 1
    return pte_n, pmd_n, claims, swaps


class _AnonState:
    """The mappings summed over every leaf summary, and the verdicts on them."""

    def __init__(self) -> None:
        # (leaf table, mm, base) -> ((level, huge zero pfn), its _anon_leaf_summary)
        self.sums: dict[tuple[int, str, int], tuple] = {}
        self.pte: dict[int, dict[str, int]] = {}   # pfn -> {mm: PTE mappings}
        self.pmd: dict[int, dict[str, int]] = {}   # pfn -> {mm: PMD mappings}
        self.claims: dict[tuple[str, int], tuple[int, bool]] = {}  # (mm, addr) -> entry
        self.slots: dict[int, dict[tuple[str, int], bool]] = {}  # swap entry -> PTEs
        self.judged: dict[int, tuple[int, int | None]] = {}  # exclusive pfn -> (head, slot)
        self.by_head: dict[int, set[int]] = {}  # head -> exclusive pfns judged with it
        self.by_slot: dict[int, set[int]] = {}  # swap entry -> exclusive pfns judged with it
        self.page_err: dict[int, list[str]] = {}
        self.slot_err: dict[int, str] = {}


_NO_LEAVES: tuple = ({}, {}, (), ())


def _anon_apply(st: _AnonState, name: str, old: tuple, new: tuple, touched: tuple) -> None:
    """Replace one mm's leaf summary ``old`` by ``new`` in the sums (_NO_LEAVES to add
    or take away a table), noting the pfns and swap entries whose sums changed."""
    for i, agg, seen in ((0, st.pte, touched[0]), (1, st.pmd, touched[1])):
        was, now = old[i], new[i]
        for pfn in {p for p, _ in was.items() ^ now.items()}:
            per = agg.setdefault(pfn, {})
            n = per.get(name, 0) + now.get(pfn, 0) - was.get(pfn, 0)
            if n:
                per[name] = n
            else:
                per.pop(name, None)
                if not per:
                    del agg[pfn]
            seen.add(pfn)
    if old[2] or new[2]:
        was, now = set(old[2]), set(new[2])
        for addr, _pfn, _is_pmd in was - now:
            st.claims.pop((name, addr), None)
        for addr, pfn, is_pmd in now - was:
            st.claims[(name, addr)] = (pfn, is_pmd)
    if old[3] or new[3]:
        was, now = set(old[3]), set(new[3])
        for addr, slot, _excl in was - now:
            ptes = st.slots[slot]
            del ptes[(name, addr)]
            if not ptes:
                del st.slots[slot]
            touched[2].add(slot)
        for addr, slot, excl in now - was:
            st.slots.setdefault(slot, {})[(name, addr)] = excl
            touched[2].add(slot)


def _claim_error(st: _AnonState, pm, what: str, pfn: int) -> str | None:
    """A claim of exclusive ownership of pfn against its mappings: the PTEs of the
    page and the PMDs of its folio."""
    page = pm.pages.get(pfn)
    head = page.head if page is not None else pfn
    a, b = st.pte.get(pfn, {}), st.pmd.get(head, {})
    mms = set(a) | set(b)
    if len(mms) > 1:
        return f"pfn {pfn:#x}: {what} but mapped by {len(mms)} mms ({', '.join(sorted(mms))})"
    n = sum(a.values()) + sum(b.values())
    if n > 1:
        return f"pfn {pfn:#x}: {what} but mapped {n} times"
    return None


def _judge_page(st: _AnonState, pm, pfn: int) -> None:
    """pfn's PG_anon_exclusive verdict, noting the head and swap slot it read."""
    old = st.judged.pop(pfn, None)
    if old is not None:
        for index, key in ((st.by_head, old[0]), (st.by_slot, old[1])):
            if key is not None:
                index[key].discard(pfn)
                if not index[key]:
                    del index[key]
    page = pm.pages.get(pfn)
    if page is None or not page.flags & PG_anon_exclusive:
        st.page_err.pop(pfn, None)
        return
    errs = []
    if (err := _claim_error(st, pm, "PG_anon_exclusive", pfn)) is not None:
        errs.append(err)
    # page_folio: the head (a missing head struct page has no flags: no swap cache)
    folio = page if page.head == pfn else pm.pages.get(page.head)
    slot = None
    if folio is not None and folio.flags & PG_swapcache:
        slot = swp_entry(swp_type(folio.swap), swp_offset(folio.swap) + pfn - folio.pfn)
        if ptes := st.slots.get(slot):
            errs.append(f"pfn {pfn:#x}: PG_anon_exclusive in the swap cache but "
                        f"{len(ptes)} swap PTEs still name its slot")
        st.by_slot.setdefault(slot, set()).add(pfn)
    st.judged[pfn] = (page.head, slot)
    st.by_head.setdefault(page.head, set()).add(pfn)
    if errs:
        st.page_err[pfn] = errs
    else:
        st.page_err.pop(pfn, None)


def _judge_slot(st: _AnonState, slot: int) -> None:
    ptes = st.slots.get(slot)
    if ptes and len(ptes) > 1 and any(ptes.values()):
        st.slot_err[slot] = (f"swap entry {slot:#x}: an exclusive swap PTE but {len(ptes)} "
                             f"PTEs ({', '.join(sorted(n for n, _ in ptes))})")
    else:
        st.slot_err.pop(slot, None)


def _anon_verdicts(m, st: _AnonState, tasks) -> list[str]:
    """The errors in the full walk's order: exclusive pages in struct-page order, then
    exclusive migration entries, then swap slots, each in walk order (by mm, then
    address)."""
    pm = m.physmem
    errs: list[str] = []
    if st.page_err:
        pfns = list(st.page_err) if len(st.page_err) == 1 else [
            p for p in pm.pages if p in st.page_err]
        for p in pfns:
            errs.extend(st.page_err[p])
    order = {t.name: i for i, t in enumerate(tasks)}
    for (name, addr), (pfn, is_pmd) in sorted(st.claims.items(),
                                              key=lambda c: (order[c[0][0]], c[0][1])):
        for p in range(pfn, pfn + (HPAGE_PMD_NR if is_pmd else 1)):
            err = _claim_error(st, pm, f"exclusive migration entry of {name} at {addr:#x}",
                               p)
            if err is not None:
                errs.append(err)
    for slot in sorted(st.slot_err, key=lambda s: min((order[n], a) for n, a in st.slots[s])):
        errs.append(st.slot_err[slot])
    return errs


def anon_exclusive_errors(m, k=None) -> list[str]:
    """Anon-exclusive ownership (mm/rmap.c, PageAnonExclusive): a page marked
    PG_anon_exclusive is mapped by one mm, by one mapping (a PTE of the page or a PMD
    of its folio, or a migration entry standing for either), so a write there may
    reuse it in place without COW; an exclusive migration entry likewise stands for
    the page's only mapping; an exclusive swap PTE is its slot's only PTE, and a
    page swapped in as exclusive leaves no other PTE on its slot. After fork shares a
    page, neither process may hold it exclusively, or one's write shows in the
    other."""
    st = _AnonState()
    touched: tuple = (set(), set(), set())
    tasks = _mapped_tasks(m)
    for task in tasks:
        leaves = pagewalk.walk_leaves(m, task.mm, 0, TASK_SIZE)
        _anon_apply(st, task.name, _NO_LEAVES, _anon_leaf_summary(m, leaves), touched)
    pm = m.physmem
    for pfn in [p for p, page in pm.pages.items() if page.flags & PG_anon_exclusive]:
        _judge_page(st, pm, pfn)
    for slot in st.slots:
        _judge_slot(st, slot)
    return _anon_verdicts(m, st, tasks)


def anon_exclusive_check(ctx) -> list[str]:
    """anon_exclusive_errors, a leaf table's summary kept while its entries stay, and
    a page's verdict while its struct page, its folio's head, its mappings and its
    swap slot's PTEs stay."""
    m = ctx.m
    tasks = _mapped_tasks(m)
    leaf_tables = _mm_leaf_tables(ctx, tasks) if ctx.incremental else None
    if leaf_tables is None:
        ctx.state.pop("anon_exclusive", None)
        return anon_exclusive_errors(m, ctx.k)
    pm = m.physmem
    st: _AnonState | None = ctx.state.get("anon_exclusive")
    fresh = st is None
    if st is None:
        st = ctx.state["anon_exclusive"] = _AnonState()
    dt = ctx.dirty_tables
    touched: tuple = (set(), set(), set())
    hz = m.huge_zero_pfn
    live: set[tuple[int, str, int]] = set()
    for task, tables in zip(tasks, leaf_tables):
        name = task.name
        for lvl, t, base, _span in tables:
            key = (t, name, base)
            how = (lvl, hz if lvl == "pmd" else 0)
            old = st.sums.get(key)
            if old is None or old[0] != how or t in dt:
                new = _anon_leaf_summary(m, _table_leaves(m, lvl, t, base))
                _anon_apply(st, name, _NO_LEAVES if old is None else old[1], new, touched)
                st.sums[key] = (how, new)
            live.add(key)
    for key in [key for key in st.sums if key not in live]:
        _anon_apply(st, key[1], st.sums.pop(key)[1], _NO_LEAVES, touched)
    # the pages whose verdict may have changed
    again = set(touched[0])
    for p in (pm.pages.keys() if fresh else ctx.dirty_pages):
        again.add(p)
        again.update(st.by_head.get(p, ()))
    for h in touched[1]:
        again.update(st.by_head.get(h, ()))
    for slot in touched[2]:
        again.update(st.by_slot.get(slot, ()))
    for p in again:
        _judge_page(st, pm, p)
    for slot in touched[2]:
        _judge_slot(st, slot)
    return _anon_verdicts(m, st, tasks)


def rcu_errors(m, k=None) -> list[str]:
    """No RCU callback outlives its grace period (kmm.rcupdate)."""
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
        # shared hugetlb mappings show other processes' bytes by design
        skip = checks_hugetlb.unchecked_ranges(task)
        for addr, other in writer.items():
            if addr in shadow or addr in lazy or addr in unknown:
                continue
            if skip and any(lo <= addr < hi for lo, hi in skip):
                continue
            got = checks_data.read_mapped_byte(m, task.mm, addr)
            if got not in (None, 0):
                errs.append(f"{name}: byte at {addr:#x} reads {got}, but {name} never "
                            f"wrote it (it was written by {other})")
    return errs
