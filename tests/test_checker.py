"""The incremental invariant checker (kmm/checks.py) gives the full checker's verdicts.

Both run on the same machine at every check of several race programs under random
schedules (and with injected bugs, so that verdicts with errors are compared too), and
under the hypothesis stateful test's scenarios; the lists of errors must be equal, in
order, every time. The incremental one must also skip work: its mapping check re-reads
only the tables that changed.
"""

from __future__ import annotations

import pathlib

import pytest

from kmm import (
    atomic, checks, checks_mapping, checks_mthp, memory, memory_zap, rmap, swapfile, testing,
)
from kmm.mm_types import PG_anon_exclusive, PG_swapcache
from kmm.pgtable import (
    _PAGE_SWP_EXCLUSIVE, pmd_index, pmd_pfn, pmd_trans_huge, pte_index, pte_pfn, swp_entry,
    table_pfn,
)
from kmm.tools import explore, runner
from kmm.workload import Kernel

WORKLOADS = pathlib.Path(__file__).resolve().parents[1] / "workloads"


class Twin:
    """Both checkers on one machine, compared at every check."""

    def __init__(self, m, k, every_point: int = 0) -> None:
        self.m, self.k = m, k
        self.inc = testing.incremental_checker(m, k)
        self.checks = 0
        self.failing = 0
        self.seen: set[str] = set()  # every error reported at some check
        self.every_point = every_point

    def compare(self) -> None:
        full = testing.invariant_errors(self.m, self.k)
        inc = self.inc.errors()
        assert inc == full, f"check {self.checks}: incremental {inc} != full {full}"
        # the swap check's walk, taken from the mapping check's leaf summaries
        assert self.inc._errs["swap"] == swapfile.check(self.m)
        # the data check, its places kept: testing's reading through the tables
        assert self.inc._errs["data"] == testing._data_errors(self.m, self.k)
        # the large folios' check, its walks kept: the straight one over every page
        assert self.inc._errs["large_folios"] == checks_mthp.large_folio_errors(self.m)
        self.checks += 1
        self.failing += bool(full)
        self.seen.update(full)

    def at_point(self) -> None:
        if self.every_point and self.m.sched.seq % self.every_point == 0:
            if not any(a.held or a.busy for a in self.m.sched.actors):
                self.compare()


def twin_run(program: str, seed: int, inject=(), every_point: int = 0) -> Twin:
    """A program under the random schedule of ``seed``, both checkers after every
    operation (and at every ``every_point``-th point with no lock held)."""
    mod = runner.load_program(str(WORKLOADS / program))
    spec = runner.program_machine(mod, program)
    cpus = spec.get("cpus", 2)
    cfg = runner.MachineConfig(memory=spec.get("memory", 1 << 30), swap=spec.get("swap", 0),
                               cpus=cpus, seed=seed)
    m = runner.build_machine(cfg, seed=seed, mode="random", cpus=cpus, inject=inject)
    k = Kernel(m)
    twin = Twin(m, k, every_point)
    k.after_op = twin.compare
    if every_point:
        m.sched.on_point = twin.at_point

    async def driver() -> None:
        await runner.start_daemons(k)
        await mod.main(k)

    try:
        runner.run_machine(m, driver)
    except AssertionError as e:
        if "incremental" in str(e):
            raise
    except Exception:  # noqa: BLE001 - an injected bug may crash the run: compare there
        pass
    twin.compare()
    return twin


@pytest.mark.parametrize("program,seeds,every", [
    ("race_fault_fault.py", range(1, 7), 7),
    ("race_fault_collapse.py", range(1, 4), 0),
    ("race_reclaim_split.py", range(1, 3), 0),
    ("race_cow_split.py", range(1, 3), 0),
    ("race_dontneed_fault.py", range(1, 3), 0),
    # MM_SHMEMPAGES and deposits (page-cache folios), swap slots, large folios
    ("race_shmem_punch_read.py", range(1, 3), 0),
    ("race_shmem_collapse_fault.py", range(1, 3), 0),
    ("race_shmem_fork_write.py", range(1, 3), 0),
    ("race_shmem_punch_fault.py", range(1, 3), 0),
    ("race_swapin_shared.py", range(1, 4), 0),
    ("race_mthp_cow_split.py", range(1, 4), 0),
    ("race_mthp_fault.py", range(1, 3), 0),
    ("race_mthp_reclaim.py", range(1, 3), 0),
    ("race_collapse_range_munmap.py", range(1, 3), 0),
    ("race_hugetlb_pmd_share.py", range(1, 3), 0),   # pt_share_count, hugetlb folios
    ("race_hugetlb_fork_cow.py", range(1, 3), 0),
    # anon-exclusive pages, swap PTEs and the swap cache, migration entries, forks
    ("race_fork_reuse.py", range(1, 3), 5),
    ("race_collapse_rmap.py", range(1, 3), 0),
    # collapse_file's holes, shared PMD tables of one mm, NUMA hinting on PTEs
    ("race_shmem_punch_collapse.py", range(1, 3), 0),
    ("race_shmem_fault_fault.py", range(1, 3), 0),
    ("race_hugetlb_share_fault_fault.py", range(1, 3), 0),
    ("race_numa_fault_dontneed.py", range(1, 4), 0),
    ("race_shmem_swapin_punch.py", range(1, 3), 0),   # shmem swap entries, truncated
    ("race_lazyfree_reclaim.py", range(1, 3), 0),
    ("race_mremap_migrate.py", range(1, 3), 0),   # migration entries moved by mremap
    ("race_mthp_swapin_dontneed.py", range(1, 3), 0),
    ("race_huge_zero_write.py", range(1, 3), 0),   # the huge zero PMD and its deposit
    ("race_shmem_thp_swapin_punch.py", range(1, 2), 0),   # a large shmem swap entry
    ("race_shmem_swapout_fault.py", range(1, 3), 0),   # shmem folios in the swap cache
    ("race_shmem_collapse_swapin.py", range(1, 3), 0),   # collapse_file's swap-ins
    ("race_shmem_mthp_swapin_punch.py", range(1, 3), 0),   # 64 KiB shmem swap entries
])
def test_incremental_and_full_checkers_agree_on_race_programs(program, seeds, every):
    total = 0
    for seed in seeds:
        total += twin_run(program, seed, every_point=every).checks
    assert total > 10


@pytest.mark.parametrize("bug", ["huge_fault_no_pmd_none_recheck",
                                 "huge_wp_no_pmd_same_recheck", "split_pmd_no_tlb_flush"])
def test_they_agree_on_broken_invariants_too(bug):
    """With an injected bug the verdicts have errors; they must still be equal."""
    from kmm import bugs
    prog = bugs.BUGS[bug].program
    failing = 0
    for seed in range(1, 25):
        failing += twin_run(prog, seed, inject=[bug], every_point=0).failing
        if failing >= 2:
            break
    assert failing >= 1


def _fork_keeps_exclusive(monkeypatch):
    """fork leaves the pages it shares PG_anon_exclusive (folio_try_dup_anon_rmap_ptes
    without its clearing)."""
    real = rmap.folio_try_dup_anon_rmap_ptes

    async def dup(m, folio, pfn, nr):
        was = folio.flags & PG_anon_exclusive
        await real(m, folio, pfn, nr)
        if was:
            atomic.folio_set_flags_locked(folio, PG_anon_exclusive)
    monkeypatch.setattr(rmap, "folio_try_dup_anon_rmap_ptes", dup)


def _fork_keeps_swap_exclusive(monkeypatch):
    """fork copies an exclusive swap PTE with its exclusive bit, in both mms
    (copy_nonpresent_pte without "mark the swap entry as shared")."""
    real = memory.copy_nonpresent_pte

    async def copy(m, dst_mm, src_mm, entry, stbl, i):
        got = await real(m, dst_mm, src_mm, entry, stbl, i)
        if entry & _PAGE_SWP_EXCLUSIVE:
            await atomic.entry_set(m, "pte", stbl, i, entry)
            return got | _PAGE_SWP_EXCLUSIVE
        return got
    monkeypatch.setattr(memory, "copy_nonpresent_pte", copy)


def _migration_always_exclusive(monkeypatch):
    """try_to_migrate makes every PTE migration entry exclusive, shared pages too."""
    real = rmap.make_migration_entry
    monkeypatch.setattr(rmap, "make_migration_entry",
                        lambda pfn, write, excl, young, dirty: real(pfn, write, True, young,
                                                                    dirty))


@pytest.mark.parametrize("program,breach,kind", [
    ("race_fork_reuse.py", _fork_keeps_exclusive, "PG_anon_exclusive but mapped by 2"),
    ("race_swapin_shared.py", _fork_keeps_exclusive, "PG_anon_exclusive but mapped by 2"),
    ("race_swapin_shared.py", _fork_keeps_swap_exclusive, "an exclusive swap PTE but 2"),
    ("race_mthp_cow_split.py", _migration_always_exclusive, "exclusive migration entry of"),
])
def test_they_agree_on_anon_exclusive_breaches(monkeypatch, program, breach, kind):
    """Ownership breaches (kmm.checks_cross.anon_exclusive_errors: a shared page or
    slot claimed exclusive) come and go as the race runs; the incremental check,
    which keeps per-table sums and re-judges only the pages they touch, gives the
    full verdicts at every check."""
    breach(monkeypatch)
    seen = checks_run = 0
    for seed in range(1, 4):
        twin = twin_run(program, seed)
        seen += sum(kind in e for e in twin.seen)
        checks_run += twin.checks
    assert checks_run > 10 and seen >= 1


def _both(c, m, k, name: str | None = None) -> list[str]:
    """The incremental checker's errors (of one check, if named), after asserting that
    all its verdicts are the full checker's."""
    inc = c.errors()
    assert inc == testing.invariant_errors(m, k)
    return inc if name is None else c._errs[name]


async def _anon_range(m, k, size: int, advice: str = "nohugepage", **touch):
    """A process with a 2 MiB range (4 KiB pages, or a THP with advice="hugepage")
    written from its start, and an incremental checker that found nothing: (process,
    address, checker)."""
    p = await k.process("p")
    a = await p.mmap(2 << 20)
    await p.madvise(a, 2 << 20, advice)
    await p.touch(a, size, **touch)
    c = testing.incremental_checker(m, k)
    assert _both(c, m, k) == []
    return p, a, c


def _no_check(m, k) -> None:
    """No check after each operation: the test compares the checkers itself."""


def _pte_table(m, mm, addr: int) -> int:
    return table_pfn(m.physmem.tables[memory.pmd_lookup(m, mm, addr)][pmd_index(addr)])


def test_the_vma_check_follows_vmas_that_come_and_go(monkeypatch):
    """A PTE outside every VMA (a zap that skipped it) is an error while no VMA covers
    it; a VMA mapped over it and unmapped again (no write to its table) turns the
    error off and on: the incremental check re-reads a table when its mm's VMAs over
    the table's range changed, not only when the table did."""
    async def fn(m, k):
        p = await k.process("p")
        a = await p.mmap(64 << 10)
        await p.load(a, 1)  # the zero page's special PTE: counted by nothing else
        t = _pte_table(m, p.task.mm, a)
        c = testing.incremental_checker(m, k)
        assert _both(c, m, k, "vmas") == []
        await atomic.entry_set(m, "pte", t, 20, m.physmem.tables[t][0])  # a + 80 KiB
        out = [_both(c, m, k, "vmas")]
        assert await p.mmap(4096, a + (80 << 10)) == a + (80 << 10)
        out.append(_both(c, m, k, "vmas"))

        async def no_zap(m, tlbg, vma, start, end):
            pass
        with monkeypatch.context() as patch:  # munmap leaves the PTE behind
            patch.setattr(memory_zap, "unmap_page_range", no_zap)
            assert await p.munmap(a + (80 << 10), 4096) == 0
        out.append(_both(c, m, k, "vmas"))
        await atomic.entry_set(m, "pte", t, 20, 0)
        return out

    _, out = testing.run_machine(fn, check=_no_check)
    stray = out[0]
    assert len(stray) == 1 and stray[0].endswith("lies in no VMA")
    assert out == [stray, [], stray]


def test_the_anon_exclusive_check_follows_tables_pages_and_slots():
    """Each input of a PG_anon_exclusive verdict changed alone, and back: a second PTE
    of an exclusive page (a table write; the struct page stays), the flag itself (a
    struct page write), a swap PTE naming the slot of an exclusive page in the swap
    cache (a table write), and an exclusive swap PTE's twin. Every verdict is
    reported again after the state returns: no incremental summary goes stale."""
    async def fn(m, k):
        p = await k.process("p")
        a = await p.mmap(64 << 10)
        await p.touch(a, 16 << 10, value=5)
        assert await p.madvise(a + (8 << 10), 8 << 10, "pageout") == 0
        child = await p.fork("child")  # shares the pages and the two swapped-out slots
        await p.load(a + (8 << 10), 1)  # swapped in, shared: stays in the swap cache
        await p.store(a, b"\x06")  # a COW copy: exclusive to p
        t = _pte_table(m, p.task.mm, a)
        ct = _pte_table(m, child.task.mm, a)
        tbl = m.physmem.tables[t]
        page = m.physmem.pages[pte_pfn(tbl[0])]
        cached = m.physmem.pages[pte_pfn(tbl[2])]
        assert page.flags & PG_anon_exclusive and cached.flags & PG_swapcache
        c = testing.incremental_checker(m, k)
        out = [_both(c, m, k, "anon_exclusive")]

        async def step(fn, *args):
            if fn is atomic.entry_set:
                await fn(m, "pte", *args)
            else:
                fn(*args)
            out.append([e.split(": ", 1)[1] for e in _both(c, m, k, "anon_exclusive")])
        for _ in range(2):
            await step(atomic.entry_set, t, 8, tbl[0])       # page mapped twice
            await step(atomic.entry_set, t, 8, 0)
        await step(atomic.entry_set, t, 8, tbl[0])
        await step(atomic.folio_clear_flags_locked, page, PG_anon_exclusive)
        await step(atomic.folio_set_flags_locked, page, PG_anon_exclusive)
        await step(atomic.entry_set, t, 8, 0)
        swp = m.physmem.tables[ct][2]  # the child's swap PTE of the cached page
        await step(atomic.folio_set_flags_locked, cached, PG_anon_exclusive)
        for _ in range(2):
            await step(atomic.entry_set, t, 9, swp)          # a second PTE on its slot
            await step(atomic.entry_set, t, 9, 0)
        await step(atomic.folio_clear_flags_locked, cached, PG_anon_exclusive)
        for _ in range(2):
            await step(atomic.entry_set, t, 9, swp | _PAGE_SWP_EXCLUSIVE)
            await step(atomic.entry_set, t, 9, 0)
        return out

    _, out = testing.run_machine(fn, swap=64 << 20, check=_no_check)
    twice = ["PG_anon_exclusive but mapped 2 times"]
    slot1 = ["PG_anon_exclusive in the swap cache but 1 swap PTEs still name its slot"]
    slot2 = ["PG_anon_exclusive in the swap cache but 2 swap PTEs still name its slot"]
    shared = ["an exclusive swap PTE but 2 PTEs (child, p)"]
    assert out == [[], twice, [], twice, [], twice, [], twice, [],
                   slot1, slot2, slot1, slot2, slot1, [], shared, [], shared, []]


def test_the_anon_exclusive_check_follows_a_folios_head():
    """A verdict on a page read from its folio's head changes with the head alone: a
    second PMD of an exclusive THP (the head's PMD mappings; no struct page changes),
    and PG_swapcache set and cleared on the head of a PTE-mapped THP whose tail is
    exclusive while a swap PTE names the tail's slot (the head's struct page changes,
    the tail's does not)."""
    async def fn(m, k):
        p = await k.process("p")
        a = await p.mmap(4 << 20)
        a = (a + (2 << 20) - 1) & ~((2 << 20) - 1)
        await p.madvise(a, 2 << 20, "hugepage")
        await p.touch(a, 2 << 20, value=5, stride=1 << 20)
        pt = memory.pmd_lookup(m, p.task.mm, a)
        i = pmd_index(a)
        huge = m.physmem.tables[pt][i]
        assert pmd_trans_huge(huge)
        c = testing.incremental_checker(m, k)
        out = [_both(c, m, k, "anon_exclusive")]

        async def step(level, t, idx, val):
            if level == "head":
                (atomic.folio_set_flags_locked if val else atomic.folio_clear_flags_locked)(
                    t, PG_swapcache)
            else:
                await atomic.entry_set(m, level, t, idx, val)
            out.append([e.split(": ", 1)[1] for e in _both(c, m, k, "anon_exclusive")])
        for _ in range(2):
            await step("pmd", pt, i + 1, huge)
            await step("pmd", pt, i + 1, 0)
        assert await p.mprotect(a, 4096, "r") == 0  # the PMD split: PTE-mapped, exclusive
        t = _pte_table(m, p.task.mm, a)
        head = m.physmem.pages[pte_pfn(m.physmem.tables[t][0])]
        assert m.physmem.pages[head.pfn + 1].flags & PG_anon_exclusive
        small = await p.mmap(64 << 10)
        await p.touch(small, 4096)
        t2 = _pte_table(m, p.task.mm, small)
        atomic.folio_set_field_locked(head, "swap", swp_entry(0, 100))
        await step("pte", t2, 5, swp_entry(0, 101))  # names the slot of head.pfn + 1
        for _ in range(2):
            await step("head", head, 0, True)
            await step("head", head, 0, False)
        await step("pte", t2, 5, 0)
        atomic.folio_set_field_locked(head, "swap", 0)
        return out

    _, out = testing.run_machine(fn, check=_no_check)
    twice = ["PG_anon_exclusive but mapped 2 times"]
    cached = ["PG_anon_exclusive in the swap cache but 1 swap PTEs still name its slot"]
    assert out == [[], twice, [], twice, [], [], cached, [], cached, [], []]


def test_a_table_two_mms_share_counts_in_both():
    """A PMD table shared by two mms (hugetlb huge_pmd_share: the child's PUD entry
    points at the parent's table) is a leaf table of each: its mappings count once per
    mm, in every check, not once for whichever mm walked it last. A hugetlb folio
    marked PG_anon_exclusive there is mapped by two mms."""
    async def fn(m, k):
        await k.set_hugetlb_pool(4)
        p = await k.process("main")
        a = await p.mmap(1 << 30, addr=0x2000_0000_0000, backing="hugetlb_shared",
                         noreserve=True)
        await p.store(a, b"\xa1")
        child = await p.fork("child")
        await child.store(a + (2 << 20), b"\xc2")  # huge_pmd_share: the parent's table
        pt = memory.pmd_lookup(m, p.task.mm, a)
        assert memory.pmd_lookup(m, child.task.mm, a) == pt
        folio = m.physmem.pages[pmd_pfn(m.physmem.tables[pt][pmd_index(a)])]
        c = testing.incremental_checker(m, k)
        out = [_both(c, m, k, "anon_exclusive")]
        for _ in range(2):
            atomic.folio_set_flags_locked(folio, PG_anon_exclusive)
            out.append([e.split(": ", 1)[1] for e in _both(c, m, k, "anon_exclusive")])
            atomic.folio_clear_flags_locked(folio, PG_anon_exclusive)
            out.append(_both(c, m, k, "anon_exclusive"))
        return out

    _, out = testing.run_machine(fn, check=_no_check)
    both = ["PG_anon_exclusive but mapped by 2 mms (child, main)"]
    assert out == [[], both, [], both, []]


def test_the_incremental_checker_rereads_only_changed_tables():
    """After a check, a run that changes nothing re-reads no leaf table; a change to
    one PTE table re-reads that one alone."""
    seen = []
    real = checks_mapping._pte_summary

    def spy(m, name, t, base):
        seen.append(t)
        return real(m, name, t, base)

    async def fn(m, k):
        p = await k.process("p")
        a = await p.mmap(8 << 20)
        await p.madvise(a, 8 << 20, "nohugepage")
        await p.touch(a, 8 << 20, stride=1 << 20)  # 8 pages, 4 PTE tables
        c = testing.incremental_checker(m, k)
        checks_mapping._pte_summary = spy
        try:
            assert c.errors() == testing.invariant_errors(m, k) == []
            seen.clear()
            assert c.errors() == []
            quiet = list(seen)
            await p.touch(a + (4 << 20) + 4096, 4096, value=3)  # a new PTE in one table
            seen.clear()
            assert c.errors() == []
            changed = list(seen)
            assert testing.invariant_errors(m, k) == []
            return quiet, changed
        finally:
            checks_mapping._pte_summary = real

    _, (quiet, changed) = testing.run_machine(fn)
    assert quiet == []
    assert len(changed) == 1


def test_explore_uses_the_incremental_checker(monkeypatch):
    """kmm explore --check op keeps one incremental checker per run."""
    made = []
    real = testing.incremental_checker

    def spy(m, k=None):
        c = real(m, k)
        made.append(c)
        return c

    monkeypatch.setattr(testing, "incremental_checker", spy)
    cfg = explore.Config(program=str(WORKLOADS / "race_fault_fault.py"))
    out = explore.run_schedule(cfg, "random", 1, {})
    assert out.kind is None
    assert len(made) == 1 and made[0].runs["mappings"] > 3


# ----------------------------------------- the incremental checker's caches go stale
def _leaf(m, mm, addr):
    """(PTE table or None, index) of addr's PTE, or (PMD table, index) of a huge PMD."""
    t = memory.pmd_lookup(m, mm, addr)
    e = m.physmem.tables[t][pmd_index(addr)]
    if pmd_trans_huge(e):
        return t, pmd_index(addr)
    return table_pfn(e), pte_index(addr)


def test_the_shmem_page_count_is_read_again_when_a_folio_changes():
    """MM_SHMEMPAGES counts the mapped pages of page-cache folios (mm_counter_file):
    a folio's ``mapping`` is a struct-page field, so the count kept per PTE table must
    be taken again when a folio it maps changes, its table unchanged."""
    async def fn(m, k):
        p = await k.process("p")
        a = await p.mmap(64 << 10, backing="memfd")
        await p.touch(a, 64 << 10, value=5)
        c = testing.incremental_checker(m, k)
        assert _both(c, m, k) == []
        t, i = _leaf(m, p.task.mm, a)
        folio = m.physmem.folio(pte_pfn(m.physmem.tables[t][i]))
        mapping = folio.mapping
        object.__setattr__(folio, "mapping", None)  # no longer a page-cache folio
        gone = _both(c, m, k)
        object.__setattr__(folio, "mapping", mapping)
        back = _both(c, m, k)
        return gone, back

    _, (gone, back) = testing.run_machine(fn)
    assert any("MM_SHMEMPAGES" in e and "!= 15 mapped page-cache pages" in e for e in gone)
    assert back == []


def test_the_deposit_count_is_read_again_when_a_folio_changes():
    """An anonymous THP mapped by a PMD has a deposited PTE table (pgtable_trans_huge_
    deposit), a page-cache one none: the count of PMDs wanting a deposit, kept per PMD
    table, must be taken again when the mapped folio changes, its table unchanged."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 2 << 20, "hugepage", stride=1 << 20, value=1)
        t, i = _leaf(m, p.task.mm, a)
        folio = m.physmem.folio(pmd_pfn(m.physmem.tables[t][i]))
        object.__setattr__(folio, "mapping", object())  # a page-cache folio now
        bad = _both(c, m, k)
        object.__setattr__(folio, "mapping", None)
        back = _both(c, m, k)
        d = m.physmem.pages[t].pt_deposit[0]
        list.__setitem__(m.physmem.tables[d], 3, 0x2000)  # the deposit no longer empty
        full = _both(c, m, k)
        list.__setitem__(m.physmem.tables[d], 3, 0)
        return bad, back, full, _both(c, m, k), d

    _, (bad, back, full, again, d) = testing.run_machine(fn)
    assert any("has 0 huge PMDs but 1 deposited tables" in e for e in bad)
    assert back == [] and again == []
    assert full == [f"p: deposited table {d:#x} free or not empty"]


def test_a_table_changed_back_is_seen_changed_back():
    """The Checker's snapshot of the page tables is updated for every table that
    changed (only those are copied): a PTE made bad and restored is reported once."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 16 << 10, value=2)
        t, i = _leaf(m, p.task.mm, a + (64 << 10))
        tbl = m.physmem.tables[t]
        list.__setitem__(tbl, i, 0x2000)  # a swap PTE, and no swap device
        bad = _both(c, m, k)
        list.__setitem__(tbl, i, 0)
        back = _both(c, m, k)
        list.__setitem__(tbl, i, 0x2000)
        again = _both(c, m, k)
        list.__setitem__(tbl, i, 0)
        return bad, back, again

    _, (bad, back, again) = testing.run_machine(fn)
    assert any("swap PTE 0x2000" in e and "names no slot" in e for e in bad)
    assert back == []
    assert again == bad


def test_the_data_check_reads_every_byte_again():
    """The data check groups a task's written bytes by page while its shadow stays:
    a byte changed in memory, or a write the shadow learns of, is seen at the next
    check, and a page read through a changed table reads the new page."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 16 << 10, stride=1024, value=9)
        t, i = _leaf(m, p.task.mm, a + 4096)
        pfn = pte_pfn(m.physmem.tables[t][i])
        m.physmem.data[pfn][1024] = 4   # the second page's second byte written
        flipped = _both(c, m, k)
        m.physmem.data[pfn][1024] = 9
        healed = _both(c, m, k)
        k.shadow["p"][a + 8192 + 7] = 6  # a byte the shadow holds and memory does not
        unwritten = _both(c, m, k)
        del k.shadow["p"][a + 8192 + 7]
        back = _both(c, m, k)
        # one PTE of the table pointed at another page: that address reads it
        await p.touch(a + (64 << 10), 4096, value=5)
        assert _both(c, m, k) == []
        other = m.physmem.tables[t][i + 15]
        was = m.physmem.tables[t][i]
        list.__setitem__(m.physmem.tables[t], i, other)
        _both(c, m, k)
        moved = list(c._errs["data"])
        list.__setitem__(m.physmem.tables[t], i, was)
        return flipped, healed, unwritten, back, moved, _both(c, m, k), a

    _, (flipped, healed, unwritten, back, moved, again, a) = testing.run_machine(fn)
    assert flipped and all("reads 4, was written 9" in e for e in flipped)
    assert healed == [] and back == [] and again == []
    assert unwritten and all("reads 0, was written 6" in e for e in unwritten)
    assert moved == [f"p: byte at {a + 4096 + o:#x} reads {0 if o else 5}, was written 9"
                     for o in (0, 1024, 2048, 3072)]  # (the touch wrote one byte)


def test_a_large_folio_is_walked_again_when_a_page_of_it_changes():
    """large mapcount = entire mapcount + the pages' PTE mapcounts (folio_large_
    mapcount): the walk over a THP's pages, kept per folio, must be taken again when a
    tail page changes, the folio's head unchanged."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 2 << 20, "hugepage", stride=1 << 20, value=1)
        t, i = _leaf(m, p.task.mm, a)
        head = pmd_pfn(m.physmem.tables[t][i])
        assert m.physmem.pages[head].order == 9
        tail = m.physmem.page(head + 5)
        _both(c, m, k)
        object.__setattr__(tail, "mapcount", 1)  # a PTE mapping no table holds
        bad = list(_both(c, m, k)), list(c._errs["large_folios"])
        object.__setattr__(tail, "mapcount", 0)
        return bad, _both(c, m, k), head

    _, ((bad, mine), back, head) = testing.run_machine(fn)
    assert mine == [f"folio {head:#x} order 9: large mapcount 1 != entire 1 + 1 PTE "
                    f"mappings", f"folio {head:#x} order 9: nr_pages_mapped 0 != 1 pages "
                    "with a PTE mapping"]
    assert all(e in bad for e in mine)
    assert back == []


def test_a_share_count_on_a_page_that_is_no_table_is_seen():
    """ptdesc->pt_share_count only on a live shared PMD table: the pages with one, kept
    from check to check, must take in a page whose count changes."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 4096, value=1)
        t, i = _leaf(m, p.task.mm, a)
        page = m.physmem.pages[pte_pfn(m.physmem.tables[t][i])]
        object.__setattr__(page, "pt_share_count", 1)
        bad = _both(c, m, k)
        object.__setattr__(page, "pt_share_count", 0)
        return bad, _both(c, m, k), page.pfn

    _, (bad, back, pfn) = testing.run_machine(fn)
    assert bad == [f"page {pfn:#x} has pt_share_count 1 but is no live PMD table (freed "
                   "while shared)"]
    assert back == []


def test_a_mapped_page_without_a_struct_page_is_looked_at_every_time():
    """A PTE mapping a pfn with no struct page (the mapping check's "mapcount None"):
    the pfns so mapped are kept from check to check, and stop being looked at when
    the struct page is back (page_folio: physmem's struct pages, created on use)."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 16 << 10, value=2)
        t, i = _leaf(m, p.task.mm, a + 4096)
        pfn = pte_pfn(m.physmem.tables[t][i])
        if not pfn & 1:  # (a pfn with a neighbour below it in an order-1 block)
            t, i = _leaf(m, p.task.mm, a + 8192)
            pfn = pte_pfn(m.physmem.tables[t][i])
        assert pfn & 1
        page = m.physmem.pages.pop(pfn)
        gone = _both(c, m, k)
        still = _both(c, m, k)
        # the page below becomes an order-1 head: the pfn's folio (probed) is that one
        below = m.physmem.pages[pfn - 1]
        object.__setattr__(below, "order", 1)
        probed = _both(c, m, k)
        object.__setattr__(below, "order", 0)
        m.physmem.pages[pfn] = page
        return gone, still, probed, _both(c, m, k), pfn

    _, (gone, still, probed, back, pfn) = testing.run_machine(fn)
    assert f"pfn {pfn:#x}: mapcount None != 1 PTE mappings" in gone
    assert still == gone
    assert f"folio {pfn - 1:#x}: mapcount 0 != 2 mappings" in probed
    assert back == []


def test_a_mapped_page_put_on_a_free_list_is_seen_free():
    """A mapped page on a buddy free list (PageBuddy with a mapcount: a double free):
    whether a mapped pfn is free is kept per pfn while no free block around it came or
    went, and taken again when one did."""
    async def fn(m, k):
        p, a, c = await _anon_range(m, k, 16 << 10, value=2)
        t, i = _leaf(m, p.task.mm, a + 4096)
        pfn = pte_pfn(m.physmem.tables[t][i])
        seen = []
        for _ in range(2):
            dict.__setitem__(m.zone.free_area[0], pfn, None)
            dict.__setitem__(m.zone.free_order, pfn, 0)
            seen.append(_both(c, m, k))
            dict.__delitem__(m.zone.free_area[0], pfn)
            dict.__delitem__(m.zone.free_order, pfn)
            seen.append(_both(c, m, k))
        return seen, pfn

    _, (seen, pfn) = testing.run_machine(fn)
    free, back, again, back_again = seen
    assert f"pfn {pfn:#x}: mapped but free" in free
    assert again == free
    assert back == [] and back_again == []
