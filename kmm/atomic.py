"""The shared-state layer: the only door through which kernel code changes state that
another actor may see (the kernel's READ_ONCE / WRITE_ONCE / xchg / cmpxchg, atomic_t,
bitops and list operations).

Emulator-only in form, kernel in meaning: each *atomic* operation here is exactly one
preemption point (``await sched.point(event, ...)``, or, when the scheduler is
``quiet`` (free mode, no hook: no other actor can be chosen there), the synchronous
``sched.tick(cost, event, **fields)``: the same sequence number, clock and digest
without a coroutine), so what is atomic is what the kernel makes atomic, not whatever
code sits between two awaits.
Several field changes the kernel makes as ONE atomic step stay one point (e.g.
``folio_add_anon_rmap_ptes`` updating the per-page mapcounts, the large mapcount and
``nr_pages_mapped`` together, as the kernel does under the folio's mapcount atomics).

The *locked* operations (suffix ``_locked``) are the kernel's non-atomic variants
(``__set_bit``, ``__folio_set_*``, ``list_add`` under its spinlock, ``folio_get`` in a
step already ordered by a lock): no point of their own; the change belongs to the
caller's current step, which a lock (the lru lock, split_queue_lock, the PTE lock) or
exclusive ownership (a frozen refcount, a page fresh from the allocator) makes
unobservable in between. ``init_page`` is the allocator's and the splitter's door: it
writes struct-page fields of a page no other actor can reach yet.

Operations (name; kernel primitive; point event, "-" for none, "step": a recorded
step without a scheduling choice, docs/points.md):

=============================  ========================================  ======================
name                           kernel primitive                          point event
=============================  ========================================  ======================
entry_read                     READ_ONCE(*ptep), pmdp_get                <level>_read
entry_set                      WRITE_ONCE, set_pte_at, set_pmd_at        set_<level>
entry_get_and_clear            xchg: ptep/pmdp_get_and_clear             <level>p_get_and_clear
entry_cmpxchg                  cmpxchg on an entry                       <level>_cmpxchg
entry_read/cmpxchg_quiet       the same, scheduler quiet (no coroutine)  the same
set_ptes                       set_ptes of an mTHP, PTE lock held        set_ptes
set_ptes_table                 set_ptes into a withdrawn table           step set_ptes
entry_set_unwalked             set_pte_at, a table no walker reaches     step set_<level>
step, step_owned, step_locked  tracepoint; owned page; op before unlock  step <event>
folio_ref_add                  folio_ref_add, folio_get                  page_ref_mod
folio_try_get                  folio_try_get (add unless zero)           page_ref_mod
folio_put_testzero             folio_put_testzero (swap.folio_put's)     page_ref_mod
folio_ref_freeze               folio_ref_freeze (cmpxchg to 0)           page_ref_freeze
folio_ref_unfreeze             folio_ref_unfreeze (atomic_set)           page_ref_unfreeze
folio_ref_add_locked           folio_get/try_get in a locked step        -
folio_ref_sub_locked           folio_put_testzero, not the last          -
folio_ref_freeze_locked        folio_ref_freeze, count checked           -
mapcount_new_anon              __folio_add_new_anon_rmap                 mapcount
mapcount_add_ptes, _add_pmd    __folio_add_rmap                          mapcount
mapcount_remove_ptes, _pmd     __folio_remove_rmap                       mapcount
mapcount_dup_ptes, _dup_pmd    __folio_try_dup_anon_rmap                 mapcount
folio_set_flags                set_bit (folio_set_*)                     set_bit
folio_clear_flags              clear_bit (folio_clear_*)                 clear_bit
folio_test_set_flags           test_and_set_bit                          test_and_set_bit
folio_set/clear_flags_locked   __set_bit, __folio_set_* in a step        -
folio_test_set_flags_locked    folio_test_set_* in a locked step         -
pages_clear_flags_locked       clear_bit on each page of a folio         -
folio_set_field_locked         folio->swap, ->mapping under a lock       -
ds_queue_add/del_locked        list_add_tail/list_del_init, ds lock      -
lru_add/del/splice_locked      lruvec_add/del_folio under lru_lock       -
waitqueue_add/remove/pop       add/remove_wait_queue, __wake_up          -
pt_deposit/withdraw_locked     pmd_huge_pte list, PMD lock held          -
ptdesc_pmd_pts_inc/dec         ptdesc_pmd_pts_inc/dec (atomic_inc/dec)   pt_share_count_mod
prep_new_page                  prep_new_page, prep_compound_page         -
init_page                      __split_folio_to_order, ctor, migration   -
=============================  ========================================  ======================

Strict mode (``Machine(strict=True)``, ``KMM_STRICT=1``, on in the tests): struct pages
are of the guarded class ``StrictPage``, page-table frames ``StrictTable`` and the queues
``StrictQueue``: an attribute write, entry store or queue change made by code outside
this module raises ``StrictError`` naming the field and the caller. Off, nothing is
guarded and nothing costs.
"""

from __future__ import annotations

import os
import sys

from kmm.cost import COST_ENTRY
from kmm.mm_types import PG_anon_exclusive, PG_head, PG_lru, Page
from kmm.mmdebug import KernelBug, StrictError
from kmm.pgtable import _PAGE_PSE, table_pfn
from kmm.runtime.sched import Scheduler

__all__ = [
    "StrictError", "KernelBug", "ticked", "point", "strict_default",
    "entry_read", "entry_set", "entry_get_and_clear", "entry_cmpxchg", "set_ptes",
    "entry_read_quiet", "entry_cmpxchg_quiet",
    "set_ptes_table",
    "entry_set_unwalked", "step", "step_owned", "step_locked",
    "folio_ref_add", "folio_put_testzero", "folio_ref_add_locked", "folio_ref_freeze",
    "folio_try_get", "folio_ref_unfreeze",
    "folio_ref_freeze_locked",
    "folio_ref_sub_locked",
    "mapcount_new_anon", "mapcount_add_ptes", "mapcount_remove_ptes", "mapcount_add_pmd",
    "mapcount_remove_pmd", "mapcount_dup_ptes", "mapcount_dup_pmd",
    "folio_set_flags", "folio_clear_flags", "folio_test_set_flags",
    "folio_set_flags_locked", "folio_clear_flags_locked", "folio_test_set_flags_locked",
    "pages_clear_flags_locked",
    "ds_queue_add_locked", "ds_queue_del_locked", "lru_add_locked", "lru_del_locked",
    "lru_splice_locked", "waitqueue_add", "waitqueue_remove", "waitqueue_pop",
    "pt_deposit_locked", "pt_withdraw_locked", "ptdesc_pmd_pts_inc", "ptdesc_pmd_pts_dec",
    "prep_new_page", "init_page",
    "folio_set_field_locked",
]


# ------------------------------------------------------------------ the point, once
# The fast path of a point: when the scheduler is quiet (free mode, no hook, at most
# the digest) no other actor can be chosen at a point, so the operations below write
# ``if sched.quiet: sched.tick(cost, event, **fields) else: await sched.point(...)``:
# the tick folds the event into the digest (if there is one) with no coroutine frame.
# ``ticked(sched, cost)`` is the older, narrower fast path (fast mode: no trace at
# all), still used by the recorded steps, which are synchronous anyway.
ticked = Scheduler.ticked


async def point(sched, event: str, cost: int = 1, **fields) -> None:
    """One point of an operation that is not itself a shared-state change (an
    allocator reply, a scanner step, a user access): the same fast path."""
    if sched.quiet:
        sched.tick(cost, event, **fields)
    else:
        await sched.point(event, cost, **fields)


# ------------------------------------------- points no one can tell (docs/points.md)
# A recorded step without a scheduling choice: same sequence number, clock, trace line
# and checker hook as a point, so traces and emulated time are unchanged; only the
# interleavings that no actor could tell apart are gone. Each kind carries the
# assumption that makes it unobservable, checked in strict mode.
def step(sched, event: str, cost: int = 1, **fields) -> None:
    """A pure tracepoint, or an operation whose next step up to the actor's next point
    touches only what it owns (docs/points.md, class 1)."""
    if not ticked(sched, cost):
        sched.step(event, cost, **fields)


def step_owned(m, event: str, cost: int, pfn: int, **fields) -> None:
    """An operation on a page the actor alone holds (clear_page of a page fresh from
    the allocator, before any mapping): class 2. Strict: the page's folio has one
    reference, no mapping, and is on no list."""
    sched = m.sched
    if not ticked(sched, cost):
        sched.step(event, cost, pfn=pfn, **fields)
    if m.strict:
        f = m.physmem.folio(pfn)
        if (f.refcount != 1 or f.mapcount or f.large_mapcount or f.entire_mapcount
                or f.flags & PG_lru or f.on_deferred_list):
            raise StrictError(f"strict: {event} without a point assumed page {pfn:#x} "
                              f"owned, but its folio is reachable: {f!r} ({_caller()})")


def step_locked(m, lock, event: str, cost: int = 1, **fields) -> None:
    """An operation under a lock, followed by nothing but that lock's release (the
    unlock is a point of its own): class 3. Strict: the actor holds the lock."""
    sched = m.sched
    if not ticked(sched, cost):
        sched.step(event, cost, **fields)
    if m.strict and lock.owner is not sched.current:
        raise StrictError(f"strict: {event} without a point assumed {lock.name} held by "
                          f"{sched.current.name} ({_caller()})")


def entry_set_unwalked(m, level: str, table: int, idx: int, val: int) -> None:
    """set_pte_at into a table no lockless walker reaches (a child's tables during
    fork: its mm never ran on a CPU, and every other reader takes the table lock,
    which the actor holds): class 4, a recorded step, no choice. Strict: both
    assumptions hold."""
    sched = m.sched
    if not ticked(sched, COST_ENTRY):
        sched.step("set_" + level, COST_ENTRY, pt=table, i=idx, val=val)
    m.physmem.tables[table][idx] = val
    if m.strict:
        pg = m.physmem.pages[table]
        owner = pg.ptl.owner if pg.ptl is not None else None
        if owner is not m.sched.current or (pg.mm is not None and pg.mm.cpumask):
            raise StrictError(f"strict: unpointed write to {level} {table:#x}[{idx}]: "
                              f"its lock is not held by {m.sched.current.name} or its mm "
                              f"runs on CPUs {sorted(pg.mm.cpumask) if pg.mm else []} "
                              f"({_caller()})")


# ------------------------------------------------------------- page-table slots
async def entry_read(m, level: str, table: int, idx: int) -> int:
    """READ_ONCE of a page-table entry (ptep_get, pmdp_get_lockless)."""
    sched = m.sched
    if sched.fast:  # no trace at all: the tick alone, not even the fields
        sched.ticked(COST_ENTRY)
    elif sched.quiet:
        sched.tick(COST_ENTRY, level + "_read", pt=table, i=idx)
    else:
        await sched.point(level + "_read", COST_ENTRY, pt=table, i=idx)
    return m.tables[table][idx]


def entry_read_quiet(m, level: str, table: int, idx: int) -> int:
    """entry_read when the scheduler is quiet (no actor can be chosen at the point):
    the same point, as a tick, with no coroutine (the hardware walker's fast path)."""
    sched = m.sched
    if sched.fast:
        sched.ticked(COST_ENTRY)
    else:
        sched.tick(COST_ENTRY, level + "_read", pt=table, i=idx)
    return m.tables[table][idx]


async def entry_set(m, level: str, table: int, idx: int, val: int) -> None:
    """WRITE_ONCE of a page-table entry (set_pte_at, set_pmd_at, pmd_populate)."""
    sched = m.sched
    if sched.fast:  # no trace at all: the tick alone, not even the fields
        sched.ticked(COST_ENTRY)
    elif sched.quiet:
        sched.tick(COST_ENTRY, "set_" + level, pt=table, i=idx, val=val)
    else:
        await sched.point("set_" + level, COST_ENTRY, pt=table, i=idx, val=val)
    m.tables[table][idx] = val


async def entry_get_and_clear(m, level: str, table: int, idx: int) -> int:
    """xchg(entry, 0): ptep_get_and_clear / pmdp_huge_get_and_clear."""
    sched = m.sched
    if sched.quiet:
        sched.tick(COST_ENTRY, level + "p_get_and_clear", pt=table, i=idx)
    else:
        await sched.point(level + "p_get_and_clear", COST_ENTRY, pt=table, i=idx)
    t = m.tables[table]
    old = t[idx]
    t[idx] = 0
    return old


async def entry_cmpxchg(m, level: str, table: int, idx: int, old: int, new: int) -> bool:
    """cmpxchg on an entry (ptep_set_access_flags' try_cmpxchg, the hardware A/D update)."""
    sched = m.sched
    if sched.quiet:
        sched.tick(COST_ENTRY, level + "_cmpxchg", pt=table, i=idx, val=new)
    else:
        await sched.point(level + "_cmpxchg", COST_ENTRY, pt=table, i=idx, val=new)
    t = m.tables[table]
    if t[idx] != old:
        return False
    t[idx] = new
    return True


def entry_cmpxchg_quiet(m, level: str, table: int, idx: int, old: int, new: int) -> bool:
    """entry_cmpxchg when the scheduler is quiet: the same point, as a tick."""
    m.sched.tick(COST_ENTRY, level + "_cmpxchg", pt=table, i=idx, val=new)
    t = m.tables[table]
    if t[idx] != old:
        return False
    t[idx] = new
    return True


async def set_ptes(m, table: int, idx: int, entry: int, nr: int) -> None:
    """set_ptes: nr consecutive PTEs from idx mapping consecutive pfns from ``entry``
    (an mTHP mapped whole: do_anonymous_page, a large swap-in), PTE lock held. One
    point: the PTE lock keeps faults out, and a hardware walk sees each PTE either none
    or set, which is all the kernel promises."""
    sched = m.sched
    if sched.quiet:
        sched.tick(COST_ENTRY, "set_ptes", pt=table, i=idx, nr=nr)
    else:
        await sched.point("set_ptes", COST_ENTRY, pt=table, i=idx, nr=nr)
    t = m.tables[table]
    for i in range(nr):
        t[idx + i] = entry + (i << 12)


def set_ptes_table(m, table: int, entries, pmd_tbl: int) -> None:
    """set_ptes over a whole table withdrawn from behind a PMD (the split): no walker
    reaches it until pmd_populate links it, so the fill is a recorded step, not a
    point (docs/points.md, class 4). Strict: the actor holds the PMD lock and no entry
    of the PMD table points to the table yet."""
    t = m.physmem.tables[table]
    for i, e in enumerate(entries):
        t[i] = e
    sched = m.sched
    if not ticked(sched, 1):
        sched.step("set_ptes", 1, pt=table, nr=len(t))
    if m.strict:
        pg = m.physmem.pages[pmd_tbl]
        linked = any(e and table_pfn(e) == table and not e & _PAGE_PSE
                     for e in m.physmem.tables[pmd_tbl])
        if pg.ptl.owner is not sched.current or linked:
            raise StrictError(f"strict: set_ptes into table {table:#x} without a point "
                              f"assumed it unreachable under PMD table {pmd_tbl:#x}'s "
                              f"lock ({_caller()})")


# ------------------------------------------------------------------ refcounts
async def folio_ref_add(m, folio: Page, n: int) -> None:
    """folio_ref_add / folio_get: an atomic_add on the refcount."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "page_ref_mod", pfn=folio.pfn, nr=n)
    else:
        await sched.point("page_ref_mod", pfn=folio.pfn, nr=n)
    folio.refcount += n


async def folio_put_testzero(m, folio: Page, n: int = 1, dropped=None) -> bool:
    """folio_put_testzero / folio_ref_sub_and_test: an atomic_sub_and_test of n
    references; True if they were the last (the caller frees the folio: swap.folio_put
    at once, or a batch after dropping its lock). ``dropped()`` runs with the
    decrement: bookkeeping of who held the reference (the invariant checker's) changes
    at that instant, not at the point before."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "page_ref_mod", pfn=folio.pfn, nr=-n)
    else:
        await sched.point("page_ref_mod", pfn=folio.pfn, nr=-n)
    folio.refcount -= n
    if dropped is not None:
        dropped()
    if folio.refcount < 0:
        raise KernelBug(f"folio_put: refcount underflow {folio!r}")
    return folio.refcount == 0


def folio_ref_add_locked(folio: Page, n: int = 1) -> None:
    """folio_try_get / folio_get inside a step a lock already orders (the LRU isolation
    under lru_lock, the swap-cache lookup, the split queue scan)."""
    folio.refcount += n


def folio_ref_sub_locked(folio: Page, n: int = 1) -> None:
    """folio_put_testzero that cannot reach zero (the caller holds another reference),
    inside a locked step."""
    folio.refcount -= n
    if folio.refcount <= 0:
        raise KernelBug(f"folio_ref_sub_locked: dropped the last reference {folio!r}")


async def folio_ref_freeze(m, folio: Page, count: int) -> bool:
    """folio_ref_freeze: atomic_cmpxchg(refcount, count, 0); True if it held exactly
    ``count`` and is now frozen (the caller owns the folio)."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "page_ref_freeze", pfn=folio.pfn)
    else:
        await sched.point("page_ref_freeze", pfn=folio.pfn)
    if folio.refcount != count:
        return False
    folio.refcount = 0
    return True


async def folio_try_get(m, folio: Page) -> bool:
    """folio_try_get: atomic_add_unless(refcount, 1, 0); False for a folio being freed
    or frozen."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "page_ref_mod", pfn=folio.pfn, nr=1)
    else:
        await sched.point("page_ref_mod", pfn=folio.pfn, nr=1)
    if folio.refcount <= 0:
        return False
    folio.refcount += 1
    return True


async def folio_ref_unfreeze(m, folio: Page, count: int) -> None:
    """folio_ref_unfreeze: atomic_set(refcount, count) on a frozen folio."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "page_ref_unfreeze", pfn=folio.pfn, nr=count)
    else:
        await sched.point("page_ref_unfreeze", pfn=folio.pfn, nr=count)
    if folio.refcount:
        raise KernelBug(f"folio_ref_unfreeze of a folio not frozen: {folio!r}")
    folio.refcount = count


def folio_ref_freeze_locked(folio: Page) -> None:
    """folio_ref_freeze: refcount to 0 once the caller checked it held the expected
    count; from here the folio is the caller's alone."""
    folio.refcount = 0


# ------------------------------------------------------------------ mapcounts
async def mapcount_new_anon(m, folio: Page, anon_vma, index: int, pmd: bool) -> None:
    """__folio_add_new_anon_rmap: first mapping of a folio no one else can see, with
    its NR_ANON_MAPPED / NR_ANON_THPS accounting (__lruvec_stat_mod_folio)."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=folio.pfn, how="new_anon_pmd" if pmd else "new_anon")
    else:
        await sched.point("mapcount", pfn=folio.pfn, how="new_anon_pmd" if pmd else "new_anon")
    folio.anon_vma = anon_vma
    folio.index = index
    folio.flags |= PG_anon_exclusive
    if pmd:
        folio.entire_mapcount = 1
        folio.large_mapcount = 1
        m.vmstat.mod_node_page_state("nr_anon_transparent_hugepages", 1)
        m.vmstat.mod_node_page_state("nr_anon_pages", folio.nr_pages)
    elif folio.order:
        # an mTHP mapped whole by nr PTEs (do_anonymous_page, a large swap-in): every
        # page mapped once and exclusive, in the same step
        nr = folio.nr_pages
        pm = m.physmem
        for p in range(folio.pfn, folio.pfn + nr):
            page = pm.page(p)
            page.mapcount = 1
            page.flags |= PG_anon_exclusive
        folio.large_mapcount = nr
        folio.nr_pages_mapped = nr
        m.vmstat.mod_node_page_state("nr_anon_pages", nr)
    else:
        folio.mapcount = 1
        m.vmstat.mod_node_page_state("nr_anon_pages", 1)
    if folio.order and folio.page_type != "hugetlb":  # hugepages-<size>kB/stats/nr_anon
        m.vmstat.mod_mthp_stat(folio.order, "nr_anon", 1)  # (hugetlb_add_new_anon_rmap: not)


async def mapcount_add_ptes(m, folio: Page, pfn: int, nr: int, exclusive: bool) -> int:
    """__folio_add_rmap for nr PTEs of pages pfn..: returns how many pages became mapped."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=pfn, nr=nr, how="add_ptes")
    else:
        await sched.point("mapcount", pfn=pfn, nr=nr, how="add_ptes")
    if not folio.order:
        folio.mapcount += 1
        if exclusive:
            folio.flags |= PG_anon_exclusive
        return 1 if folio.mapcount == 1 else 0
    pm = m.physmem
    newly = 0
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount += 1
        if page.mapcount == 1:
            newly += 1
        if exclusive:
            page.flags |= PG_anon_exclusive
    folio.large_mapcount += nr
    folio.nr_pages_mapped += newly
    return newly


async def mapcount_remove_ptes(m, folio: Page, pfn: int, nr: int) -> int:
    """__folio_remove_rmap for nr PTEs: returns how many pages became unmapped."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=pfn, nr=-nr, how="remove_ptes")
    else:
        await sched.point("mapcount", pfn=pfn, nr=-nr, how="remove_ptes")
    if not folio.order:
        folio.mapcount -= 1
        if folio.mapcount < 0:
            raise KernelBug(f"mapcount underflow {folio!r}")
        if folio.mapcount == 0:
            folio.flags &= ~PG_anon_exclusive
            return 1
        return 0
    pm = m.physmem
    unmapped = 0
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount -= 1
        if page.mapcount < 0:
            raise KernelBug(f"mapcount underflow {page!r}")
        if page.mapcount == 0:
            unmapped += 1
            page.flags &= ~PG_anon_exclusive
    folio.large_mapcount -= nr
    folio.nr_pages_mapped -= unmapped
    return unmapped


async def mapcount_add_pmd(m, folio: Page, exclusive: bool) -> None:
    """__folio_add_rmap for one PMD mapping."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=folio.pfn, how="add_pmd")
    else:
        await sched.point("mapcount", pfn=folio.pfn, how="add_pmd")
    folio.entire_mapcount += 1
    folio.large_mapcount += 1
    if exclusive:
        folio.flags |= PG_anon_exclusive


async def mapcount_remove_pmd(m, folio: Page) -> int:
    """__folio_remove_rmap for one PMD mapping: returns the entire mapcount left; the
    last PMD mapping of a folio no PTE maps any more clears its exclusivity."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=folio.pfn, how="remove_pmd")
    else:
        await sched.point("mapcount", pfn=folio.pfn, how="remove_pmd")
    folio.entire_mapcount -= 1
    folio.large_mapcount -= 1
    if folio.entire_mapcount < 0:
        raise KernelBug(f"entire mapcount underflow {folio!r}")
    if folio.entire_mapcount == 0 and not folio.nr_pages_mapped:
        folio.flags &= ~PG_anon_exclusive
    return folio.entire_mapcount


async def mapcount_dup_ptes(m, folio: Page, pfn: int, nr: int) -> None:
    """__folio_try_dup_anon_rmap for nr PTEs (fork): the pages become shared."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=pfn, nr=nr, how="dup_ptes")
    else:
        await sched.point("mapcount", pfn=pfn, nr=nr, how="dup_ptes")
    if not folio.order:
        folio.mapcount += 1
        folio.flags &= ~PG_anon_exclusive
        return
    pm = m.physmem
    for p in range(pfn, pfn + nr):
        page = pm.page(p)
        page.mapcount += 1
        page.flags &= ~PG_anon_exclusive
    folio.large_mapcount += nr


async def mapcount_dup_pmd(m, folio: Page) -> None:
    """__folio_try_dup_anon_rmap for a PMD (fork of a PMD-mapped THP)."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "mapcount", pfn=folio.pfn, how="dup_pmd")
    else:
        await sched.point("mapcount", pfn=folio.pfn, how="dup_pmd")
    folio.entire_mapcount += 1
    folio.large_mapcount += 1
    folio.flags &= ~PG_anon_exclusive
    for p in range(folio.pfn + 1, folio.pfn + folio.nr_pages):
        pg = m.physmem.pages.get(p)
        if pg is not None:
            pg.flags &= ~PG_anon_exclusive


# ---------------------------------------------------------------------- flags
async def folio_set_flags(m, folio: Page, bits: int) -> None:
    """set_bit on folio->flags (folio_set_*), where another actor may race: one point."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "set_bit", pfn=folio.pfn, bits=bits)
    else:
        await sched.point("set_bit", pfn=folio.pfn, bits=bits)
    folio.flags |= bits


async def folio_clear_flags(m, folio: Page, bits: int) -> None:
    """clear_bit on folio->flags (folio_clear_*): one point."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "clear_bit", pfn=folio.pfn, bits=bits)
    else:
        await sched.point("clear_bit", pfn=folio.pfn, bits=bits)
    folio.flags &= ~bits


async def folio_test_set_flags(m, folio: Page, bits: int) -> bool:
    """test_and_set_bit (folio_test_set_*): True if every bit was set already."""
    sched = m.sched
    if sched.quiet:
        sched.tick(1, "test_and_set_bit", pfn=folio.pfn, bits=bits)
    else:
        await sched.point("test_and_set_bit", pfn=folio.pfn, bits=bits)
    old = folio.flags
    folio.flags = old | bits
    return old & bits == bits


def folio_set_flags_locked(folio: Page, bits: int) -> None:
    """__folio_set_* / set_bit inside the caller's step (lock held or folio owned)."""
    folio.flags |= bits


def folio_clear_flags_locked(folio: Page, bits: int) -> None:
    """__folio_clear_* / clear_bit inside the caller's step."""
    folio.flags &= ~bits


def folio_test_set_flags_locked(folio: Page, bits: int) -> bool:
    """folio_test_set_*: True if every bit was already set; sets them."""
    old = folio.flags
    folio.flags = old | bits
    return old & bits == bits


def pages_clear_flags_locked(m, pfn: int, nr: int, bits: int) -> None:
    """clear_bit on pages pfn..pfn+nr-1 (those with a struct page: the others hold no
    bit), inside the caller's step."""
    pages = m.physmem.pages
    for p in range(pfn, pfn + nr):
        pg = pages.get(p)
        if pg is not None:
            pg.flags &= ~bits


def folio_set_field_locked(folio: Page, name: str, value) -> None:
    """A struct-folio field other than the counts and flags (folio->swap,
    folio->mapping/index, the page-table page's deposit list), set in a step a lock
    orders (the swap cluster lock, the PMD lock)."""
    setattr(folio, name, value)


# ---------------------------------------------------------------------- queues
def ds_queue_add_locked(m, folio: Page) -> bool:
    """list_add_tail on the deferred split queue; split_queue_lock held. True if the
    folio was not queued yet."""
    if folio.on_deferred_list:
        return False
    folio.on_deferred_list = True
    m.deferred_split_queue[folio.pfn] = None
    return True


def ds_queue_del_locked(m, folio: Page) -> None:
    """list_del_init(&folio->_deferred_list); split_queue_lock held."""
    m.deferred_split_queue.pop(folio.pfn, None)
    folio.on_deferred_list = False


def lru_add_locked(m, lst: dict, folio: Page, tail: bool, bits: int = 0) -> None:
    """list_add (or list_add_tail) of the folio on an LRU list, and PG_lru (with
    ``bits``, other flags the caller sets in the same step); lru_lock held."""
    folio.flags |= PG_lru | bits
    if tail:  # rebuild with the folio first (rare: rotations)
        items = list(lst)
        lst.clear()
        lst[folio.pfn] = None
        lst.update(dict.fromkeys(items))
    else:
        lst[folio.pfn] = None


def lru_del_locked(lst: dict, folio: Page) -> bool:
    """list_del of the folio's LRU entry, and PG_lru cleared; lru_lock held. False if
    it was not on the list."""
    folio.flags &= ~PG_lru
    return lst.pop(folio.pfn, 0) is None


def lru_splice_locked(lst: dict, order: list) -> None:
    """Rewrite an LRU list in a given order (lru_add_split_folio: the tails follow the
    head); lru_lock held."""
    lst.clear()
    lst.update(dict.fromkeys(order))


# a wait queue is a tuple of actors (immutable: only these three replace it)
def waitqueue_add(m, queue: str, actor) -> None:
    """add_wait_queue: the actor waits on the named wait_queue_head."""
    wq = m.waitqueues
    wq[queue] = wq.get(queue, ()) + (actor,)


def waitqueue_remove(m, queue: str, actor) -> bool:
    """remove_wait_queue: False if a waker had already taken the actor off."""
    wq = m.waitqueues
    waiters = wq.get(queue, ())
    if actor not in waiters:
        return False
    wq[queue] = tuple(a for a in waiters if a is not actor)
    return True


def waitqueue_pop(m, queue: str) -> tuple:
    """__wake_up's walk: take every waiter off the named queue."""
    return m.waitqueues.pop(queue, ())


def pt_deposit_locked(page: Page, pgtable: int) -> None:
    """The pmd_huge_pte list: park a table; PMD lock held."""
    if page.pt_deposit is None:
        page.pt_deposit = []
    page.pt_deposit.append(pgtable)


def pt_withdraw_locked(page: Page) -> int:
    """The pmd_huge_pte list: take a table back; PMD lock held."""
    return page.pt_deposit.pop()


async def ptdesc_pmd_pts_inc(m, page: Page) -> None:
    """ptdesc_pmd_pts_inc: one more mm's PUD entry maps this hugetlb PMD table
    (huge_pmd_share). A table that is no page table any more (freed meanwhile) is a
    use-after-free: KernelBug."""
    await m.sched.point("pt_share_count_mod", pfn=page.pfn, nr=1)
    if page.page_type != "table" or page.pt_level != "pmd":
        raise KernelBug(f"ptdesc_pmd_pts_inc: page {page.pfn:#x} is no PMD table "
                        f"(freed while being shared): {page!r}")
    page.pt_share_count += 1


async def ptdesc_pmd_pts_dec(m, page: Page) -> None:
    """ptdesc_pmd_pts_dec: one sharer's PUD entry no longer maps the table
    (huge_pmd_unshare, or huge_pmd_share losing the race to populate)."""
    await m.sched.point("pt_share_count_mod", pfn=page.pfn, nr=-1)
    if page.pt_share_count <= 0:
        raise KernelBug(f"ptdesc_pmd_pts_dec: PMD table {page.pfn:#x} is not shared")
    page.pt_share_count -= 1


# ----------------------------------------------------------- the owner's door
def prep_new_page(page: Page, order: int) -> None:
    """prep_new_page / prep_compound_page: the allocator hands out a page it alone
    holds: refcount 1, and a head with its order for a large folio (the tails are made
    lazily, pointing at it)."""
    page.refcount = 1
    if order:
        page.flags = PG_head
        page.order = order


def init_page(page: Page, **fields) -> Page:
    """Struct-page initialisation by the code that owns the page: the allocator
    (prep_new_page, prep_compound_page, freeing), a page-table constructor, the
    splitter on a frozen folio (__split_folio_to_order), migration on its new folio.
    No other actor can reach the page, so there is no point."""
    for k, v in fields.items():
        setattr(page, k, v)
    return page


# ---------------------------------------------------------------- strict mode
def strict_default() -> bool:
    """Strict mode unless asked otherwise: the KMM_STRICT environment variable."""
    return os.environ.get("KMM_STRICT", "") not in ("", "0")


_THIS = __name__
_PAGE_INIT = Page.__init__.__code__


def _caller(depth: int = 2) -> str:
    f = sys._getframe(depth)
    return f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})"


class StrictPage(Page):
    """A struct page that only kmm.atomic (and its own constructor) may write."""

    __slots__ = ()

    def __setattr__(self, name: str, value) -> None:
        f = sys._getframe(1)
        if f.f_globals.get("__name__") != _THIS and f.f_code is not _PAGE_INIT:
            raise StrictError(f"strict: {name} of page {self.pfn:#x} written outside "
                              f"kmm.atomic by {_caller()}")
        object.__setattr__(self, name, value)


class StrictTable(list):
    """A page-table frame's entries that only kmm.atomic may store to."""

    __slots__ = ()

    def __setitem__(self, i, v) -> None:
        if sys._getframe(1).f_globals.get("__name__") != _THIS:
            raise StrictError(f"strict: page-table entry {i} stored outside kmm.atomic "
                              f"by {_caller()}")
        list.__setitem__(self, i, v)


def _guard(name):
    meth = getattr(dict, name)

    def guarded(self, *a, **k):
        if sys._getframe(1).f_globals.get("__name__") != _THIS:
            raise StrictError(f"strict: queue {self.name} changed ({name}) outside "
                              f"kmm.atomic by {_caller()}")
        return meth(self, *a, **k)
    guarded.__name__ = name
    return guarded


class StrictQueue(dict):
    """A queue (the deferred split queue, an LRU list, the waitqueue table) that only
    kmm.atomic may change."""

    __slots__ = ("name",)

    def __init__(self, name: str, *a) -> None:
        dict.__init__(self, *a)
        self.name = name

    for _n in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update",
               "setdefault"):
        locals()[_n] = _guard(_n)
    del _n


def make_strict(m) -> None:
    """Guard a machine's shared state (called by the assembly before any actor runs)."""
    pm = m.physmem
    pm.page_cls = StrictPage
    pm.table_cls = StrictTable
    for pfn, pg in list(pm.pages.items()):
        object.__setattr__(pg, "__class__", StrictPage)
    for pfn, t in list(pm.tables.items()):
        pm.tables[pfn] = StrictTable(t)
    m.deferred_split_queue = StrictQueue("deferred_split_queue", m.deferred_split_queue)
    m.waitqueues = StrictQueue("waitqueues", m.waitqueues)
    lists = m.lruvec.lists
    for name in list(lists):
        lists[name] = StrictQueue("lru:" + name, lists[name])
