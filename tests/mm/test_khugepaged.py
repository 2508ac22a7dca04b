"""khugepaged and MADV_COLLAPSE, the mechanism (mm/khugepaged.c) and the daemon's loop.

Expected values come from the kernel source (mm/khugepaged.c, as kernel-thp-reference.md
section 6 walks it), from the 6.18 tracepoint formats of the host
(/sys/kernel/tracing/events/huge_memory/*/format), or from arithmetic on HPAGE_PMD_NR;
the invariant checker runs after every workload operation. The selftest cases are in
tests/selftests/test_khugepaged.py, the race programs at the end of this file.
"""

from __future__ import annotations

from conftest import run

import io
import json
import pathlib

import pytest

from kmm import (
    atomic, daemon, errno_name, khugepaged, khugepaged_collapse, page_alloc, rmap, swap, sysfs,
    testing,
)
from kmm.khugepaged import ScanResult as R
from kmm.mm_types import PG_anon_exclusive, PG_lru
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, pmd_dirty, pmd_pfn, pmd_trans_huge, pmd_write, pte_mkold,
    pte_pfn, table_pfn,
)
from kmm.runtime.trace import Trace
from kmm.task_mmu import smaps_range

from tests.mm.test_huge_memory import MiB, deposits, ev, pmd_at

NR = HPAGE_PMD_NR
WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
MSEC = 1_000_000




async def small_pages(k, size=2 * MiB, value=1, name="main", length=None, stride=PAGE_SIZE):
    """A process with a region of small pages (enabled=madvise, no MADV_HUGEPAGE)."""
    p = await k.process(name)
    a = await p.mmap(size)
    await p.touch(a, size if length is None else length, value=value, stride=stride)
    return p, a


def start_khugepaged(m):
    from kmm.daemons.khugepaged import Khugepaged
    daemon.start_daemon(m, Khugepaged())


async def scan(m, p, a, *, is_khugepaged=True):
    """hpage_collapse_scan_pmd as khugepaged_scan_mm_slot calls it (mmap lock read), on
    a VMA khugepaged may scan (MADV_HUGEPAGE, as the selftest's wait_for_scan)."""
    mm = p.task.mm
    if is_khugepaged:
        vma = mm.vma_lookup(a)
        await p.madvise(vma.start, vma.end - vma.start, "hugepage")
    await mm.mmap_lock.down_read("test")
    cc = khugepaged.CollapseControl(is_khugepaged=is_khugepaged)
    result, locked = await khugepaged.hpage_collapse_scan_pmd(m, mm, mm.vma_lookup(a), a, cc)
    if locked:
        await mm.mmap_lock.up_read()
    return result


def last(m, event):
    return [f for e, f in m.khugepaged_scan.log if e == event][-1]


# ------------------------------------------------------------------- enum, trace
def test_scan_result_values_and_trace_words_are_6_18s():
    """enum scan_result as the host's tracepoint format lists it: 6.18 has no
    SCAN_PAGE_RO, so SCAN_LACK_REFERENCED_PAGE is 11 and SCAN_PAGE_FILLED 30; the
    tracepoints print the SCAN_STATUS words."""
    assert len(R) == 31 and R.SCAN_FAIL == 0 and R.SCAN_SUCCEED == 1
    assert R.SCAN_LACK_REFERENCED_PAGE == 11 and R.SCAN_PAGE_FILLED == 30
    assert R.SCAN_ALLOC_HUGE_PAGE_FAIL == 24 and R.SCAN_PAGE_COUNT == 14
    assert [R.SCAN_PMD_MAPPED.status, R.SCAN_EXCEED_SHARED_PTE.status,
            R.SCAN_PAGE_COUNT.status, R.SCAN_DEL_PAGE_LRU.status, R.SCAN_COPY_MC.status] == [
        "page_pmd_mapped", "exceed_shared_pte", "not_suitable_page_count",
        "could_not_delete_page_from_lru", "copy_poisoned_page"]


def test_tracepoints_carry_the_kernels_fields():
    """mm_khugepaged_scan_pmd(mm, pfn, referenced, none_or_zero, status, unmapped),
    mm_collapse_huge_page_isolate(pfn, none_or_zero, referenced, status) and
    mm_collapse_huge_page(mm, isolated, status), in that order for one collapse (the
    scan's event is emitted after the collapse it started), in the run's trace."""
    buf = io.StringIO()

    async def fn(m, k):
        m.sched.trace = Trace(buf)
        p, a = await small_pages(k, length=PAGE_SIZE * 3)
        assert await p.madvise(a, 2 * MiB, "collapse") == 0

    run(fn)
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    tps = [e for e in events if e["event"].startswith(("mm_khugepaged", "mm_collapse"))]
    strip = [{k: v for k, v in e.items() if k not in ("seq", "t", "actor", "pfn", "mm")}
             for e in tps]
    assert strip == [
        {"event": "mm_collapse_huge_page_isolate", "none_or_zero": 509, "referenced": 0,
         "status": "succeeded"},
        {"event": "mm_collapse_huge_page", "isolated": 1, "status": "succeeded"},
        {"event": "mm_khugepaged_scan_pmd", "referenced": 0, "none_or_zero": 509,
         "status": "succeeded", "unmapped": 0}]
    assert {"mm", "pfn"} <= set(tps[-1]) and "pfn" in tps[0] and "mm" in tps[1]


# ------------------------------------------------------------------ registration
def test_registration_needs_an_anon_vma_and_an_eligible_vma():
    """khugepaged_enter_vma (TVA_KHUGEPAGED): MADV_HUGEPAGE of an untouched VMA does not
    register (no anon_vma); of a faulted one it does, once (MMF_VM_HUGEPAGE); under
    enabled=always a THP fault registers; under never nothing does."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        assert m.khugepaged_scan.mm_head == []
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, PAGE_SIZE)
        await p.madvise(a, 2 * MiB, "hugepage")
        assert [s.mm for s in m.khugepaged_scan.mm_head] == [p.task.mm]
        assert "MMF_VM_HUGEPAGE" in p.task.mm.flags
        await p.madvise(a, 2 * MiB, "hugepage")
        assert len(m.khugepaged_scan.mm_head) == 1
        q = await k.process("always")
        m.sysfs.write("enabled", "always")
        b = await q.mmap(2 * MiB)
        await q.touch(b, PAGE_SIZE)
        assert [s.mm.owner for s in m.khugepaged_scan.mm_head] == ["main", "always"]
        m.sysfs.write("enabled", "never")
        r = await k.process("never")
        c = await r.mmap(2 * MiB)
        await r.touch(c, PAGE_SIZE)
        await r.madvise(c, 2 * MiB, "hugepage")
        assert len(m.khugepaged_scan.mm_head) == 2
    run(fn)


def test_fork_inherits_registration_and_exit_removes_it():
    """khugepaged_fork registers the child of a registered mm at the list tail;
    __khugepaged_exit frees a slot the cursor is not on and clears MMF_VM_HUGEPAGE."""
    async def fn(m, k):
        p, a = await small_pages(k, length=PAGE_SIZE)
        await p.madvise(a, 2 * MiB, "hugepage")
        c = await p.fork("child")
        assert [s.mm.owner for s in m.khugepaged_scan.mm_head] == ["main", "child"]
        mm = c.task.mm
        await c.exit()
        assert [s.mm.owner for s in m.khugepaged_scan.mm_head] == ["main"]
        assert "MMF_VM_HUGEPAGE" not in mm.flags and mm.khugepaged_slot is None
    run(fn)


def test_exit_of_the_mm_under_the_cursor_leaves_its_slot_to_khugepaged():
    """__khugepaged_exit of the mm khugepaged's cursor is on: the slot stays (after the
    mmap_write_lock barrier); khugepaged's next scan finds mm_users 0, moves on and
    frees it (collect_mm_slot), completing a full scan."""
    async def fn(m, k):
        p, a = await small_pages(k, size=4 * MiB, length=PAGE_SIZE)
        await p.madvise(a, 4 * MiB, "hugepage")
        scan_ = m.khugepaged_scan
        cc = khugepaged.CollapseControl(is_khugepaged=True)
        # a budget of one PMD: the first block collapses and the scan stops there
        progress, result = await khugepaged.khugepaged_scan_mm_slot(m, 1, cc)
        assert (progress, result) == (1 + NR, R.SCAN_SUCCEED)
        assert scan_.mm_slot is p.task.mm.khugepaged_slot and scan_.address == a + 2 * MiB
        await p.exit()
        assert len(scan_.mm_head) == 1 and scan_.full_scans == 0
        progress, result = await khugepaged.khugepaged_scan_mm_slot(m, 4096, cc)
        assert progress == 1 and scan_.mm_head == [] and scan_.mm_slot is None
        assert scan_.full_scans == 1
    run(fn)


# ------------------------------------------------------------------- scan checks
def test_scan_pmd_states():
    """find_pmd_or_thp_or_none: no PMD table is SCAN_PMD_NULL, an empty PMD
    SCAN_PMD_NONE, a THP or the huge zero PMD SCAN_PMD_MAPPED; MADV_COLLAPSE of a
    PMD-mapped block is done already (0) and leaves the huge zero PMD as it is."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(8 * MiB)
        await p.touch(a, PAGE_SIZE)   # a PMD table for the whole 1 GiB
        assert await scan(m, p, a + 2 * MiB) == R.SCAN_PMD_NONE
        b = await p.mmap(2 * MiB, 1 << 40)
        await p.touch(b, PAGE_SIZE)
        await p.munmap(b, 2 * MiB)
        c = await p.mmap(4 * MiB, 3 << 40)
        await p.madvise(c, 4 * MiB, "hugepage")
        await p.touch(c, 2 * MiB, write=False, value=0)  # huge zero PMD
        await p.touch(c + 2 * MiB, 2 * MiB)                # THP
        assert await scan(m, p, c) == R.SCAN_PMD_MAPPED
        assert await scan(m, p, c + 2 * MiB) == R.SCAN_PMD_MAPPED
        mm = p.task.mm
        await mm.mmap_lock.down_read("test")
        assert khugepaged.find_pmd_or_thp_or_none(m, mm, 5 << 40)[0] == R.SCAN_PMD_NULL
        await mm.mmap_lock.up_read()
        zero = pmd_at(m, mm, c)[1]
        assert await p.madvise(c, 4 * MiB, "collapse") == 0
        assert pmd_at(m, mm, c)[1] == zero and ev(m, "thp_collapse_alloc") == 0
    run(fn)


@pytest.mark.parametrize("max_none, present, expect", [
    (511, 1, R.SCAN_SUCCEED), (0, 511, R.SCAN_EXCEED_NONE_PTE), (0, 512, R.SCAN_SUCCEED),
    (256, 255, R.SCAN_EXCEED_NONE_PTE), (256, 256, R.SCAN_SUCCEED)])
def test_max_ptes_none(max_none, present, expect):
    """khugepaged refuses more than max_ptes_none none PTEs (thp_scan_exceed_none_pte,
    once per refusal); MADV_COLLAPSE ignores the limit."""
    async def fn(m, k):
        p, a = await small_pages(k, length=present * PAGE_SIZE)
        assert await scan(m, p, a) == expect
        refused = expect == R.SCAN_EXCEED_NONE_PTE
        assert ev(m, "thp_scan_exceed_none_pte") == int(refused)
        if refused:
            assert await p.madvise(a, 2 * MiB, "collapse") == 0
            assert smaps_range(m, p.task.mm, a, a + 2 * MiB)[1] == 2048
    run(fn, knobs={"khugepaged/max_ptes_none": max_none})


def test_zero_page_ptes_count_as_none():
    """A PTE of the 4K zero page (a read fault) counts as none: 1 written page and 511
    read ones are 511 none_or_zero; with max_ptes_none 510 that is one too many. The
    collapse zero-fills them and drops the zero-page PTEs (MM_ANONPAGES grows by 511)."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.touch(a, 2 * MiB, write=False, value=0)
        await p.touch(a, PAGE_SIZE, value=3)
        assert await scan(m, p, a) == R.SCAN_EXCEED_NONE_PTE
        assert last(m, "mm_khugepaged_scan_pmd")["none_or_zero"] == 511
        assert p.task.mm.rss_anon == 1
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        assert p.task.mm.rss_anon == NR
        assert (await p.load(a), await p.load(a + PAGE_SIZE)) == (b"\x03", b"\x00")
    run(fn, knobs={"khugepaged/max_ptes_none": 510})


def test_max_ptes_shared_counts_every_pte_of_a_shared_thp():
    """folio_maybe_mapped_shared: after fork the child COWs 255 pages of the THP still
    PMD-mapped by the parent; its 257 other PTEs map a folio another mm maps, so they
    are shared: 257 > 256 refuses (thp_scan_exceed_share_pte); 256 after one more COW
    passes."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.touch(a, 2 * MiB)
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        c = await p.fork("child")
        await c.touch(a, 255 * PAGE_SIZE, value=2)
        assert await scan(m, c, a) == R.SCAN_EXCEED_SHARED_PTE
        assert ev(m, "thp_scan_exceed_share_pte") == 1
        await c.touch(a, 256 * PAGE_SIZE, value=2)
        assert await scan(m, c, a) == R.SCAN_SUCCEED
        assert smaps_range(m, c.task.mm, a, a + 2 * MiB)[1] == 2048
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB)[1] == 2048  # the parent's THP
    run(fn)


def test_khugepaged_needs_a_young_page_madvise_collapse_does_not():
    """khugepaged: no young PTE (and no PG_referenced folio) is
    SCAN_LACK_REFERENCED_PAGE; MADV_COLLAPSE skips the referenced rule."""
    async def fn(m, k):
        p, a = await small_pages(k, length=8 * PAGE_SIZE)
        mm = p.task.mm
        t = table_pfn(pmd_at(m, mm, a)[1])
        ptes = m.physmem.tables[t]
        for i in range(8):  # the accessed bits cleared, as reclaim's folio_referenced does
            await atomic.entry_set(m, "pte", t, i, pte_mkold(ptes[i]))
        assert await scan(m, p, a) == R.SCAN_LACK_REFERENCED_PAGE
        assert await scan(m, p, a, is_khugepaged=False) == R.SCAN_SUCCEED
    run(fn)


@pytest.mark.parametrize("how, expect", [("lock", R.SCAN_PAGE_LOCK),
                                         ("pin", R.SCAN_PAGE_COUNT),
                                         ("isolate", R.SCAN_PAGE_LRU)])
def test_busy_folio_is_refused_and_madvise_collapse_says_eagain(how, expect):
    """A locked folio (SCAN_PAGE_LOCK), one with a reference beyond its mappings, like a
    GUP pin (SCAN_PAGE_COUNT), or one off the LRU (SCAN_PAGE_LRU) is not collapsed;
    MADV_COLLAPSE reports these as transient: EAGAIN (madvise_collapse_errno)."""
    from kmm import swap

    async def fn(m, k):
        p, a = await small_pages(k, length=4 * PAGE_SIZE)
        table = m.physmem.tables[table_pfn(pmd_at(m, p.task.mm, a)[1])]
        folio = m.physmem.folio(pte_pfn(table[2]))
        hook, k.after_op = k.after_op, None  # the pin and the isolation are no mappings
        if how == "pin":
            await atomic.folio_ref_add(m, folio, 1)
        elif how == "isolate":
            assert await swap.folio_isolate_lru(m, folio)

        async def holder():  # another task holds the folio lock meanwhile
            if how == "lock":
                lk = m.folio_lock_of(folio)
                await lk.lock("test")
                await m.sched.sleep(1000 * MSEC)
                await lk.unlock()

        async def collapser():
            await m.sched.sleep(MSEC)
            assert await scan(m, p, a) == expect
            assert await errno_name(p.madvise(a, 2 * MiB, "collapse")) == "EAGAIN"

        await testing.together(m, holder=holder, collapser=collapser)
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (16, 0)
        if how == "pin":
            await swap.folio_put(m, folio)
        elif how == "isolate":
            await swap.folio_putback_lru(m, folio)
        k.after_op = hook
    run(fn)


# ---------------------------------------------------------------------- collapse
def test_collapse_result_struct_pages():
    """collapse_huge_page: a new order-9 folio, PMD-mapped dirty and writable, exclusive,
    on the LRU, queued for the underused shrinker (map_anon_folio_pmd_nopf); the old PTE
    table deposited behind it (nr_ptes unchanged); the 512 small folios freed; Rss and
    every byte unchanged; thp_collapse_alloc 1, no fault counters."""
    async def fn(m, k):
        p, a = await small_pages(k, value=5)
        mm = p.task.mm
        t, pmd = pmd_at(m, mm, a)
        old_table = table_pfn(pmd)
        old = [pte_pfn(e) for e in m.physmem.tables[old_table]]
        nr_ptes = mm.nr_ptes
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        t, pmd = pmd_at(m, mm, a)
        assert pmd_trans_huge(pmd) and pmd_write(pmd) and pmd_dirty(pmd)
        folio = m.physmem.page(pmd_pfn(pmd))
        assert (folio.order, folio.refcount, folio.entire_mapcount) == (9, 1, 1)
        assert folio.flags & PG_anon_exclusive and folio.flags & PG_lru
        assert folio.on_deferred_list
        assert deposits(m, t) == [old_table] and mm.nr_ptes == nr_ptes
        assert all(m.zone.is_free(pfn) for pfn in old)
        assert mm.rss_anon == NR
        assert (ev(m, "thp_collapse_alloc"), ev(m, "thp_fault_alloc")) == (1, 0)
        assert m.khugepaged_scan.pages_collapsed == 0  # MADV_COLLAPSE does not count
        assert await p.verify() == []
    run(fn)


def test_collapse_lock_sequence():
    """The kernel's order (kernel-thp-reference.md 6.5): mmap read lock dropped before
    the allocation, retaken to revalidate, then the mmap write lock, the anon_vma write
    lock, the PMD lock to clear and flush the PMD, the detached table's PTE lock to
    isolate, the anon_vma lock released before the copy, the PMD lock again to install;
    the mmap write lock released last."""
    buf = io.StringIO()

    async def fn(m, k):
        p, a = await small_pages(k)
        m.sched.trace = Trace(buf)
        assert await p.madvise(a, 2 * MiB, "collapse") == 0

    run(fn)
    seq = []
    for line in buf.getvalue().splitlines():
        e = json.loads(line)
        if e["event"] in ("lock", "unlock") and e["lock"].split(":")[0] in (
                "mmap_lock", "anon_vma", "ptl_pmd") or e["event"] in (
                "mm_page_alloc", "tlb_flush", "copy_mc_user_highpage"):
            name = e.get("lock", "").split(":")[0]
            item = (e["event"], name, e.get("mode", ""))
            if not seq or seq[-1] != item:
                seq.append(item)
    first_copy = seq.index(("copy_mc_user_highpage", "", ""))
    assert seq[:first_copy + 1] == [
        ("lock", "mmap_lock", "read"), ("unlock", "mmap_lock", "read"),   # madvise, scan
        ("mm_page_alloc", "", ""),
        ("lock", "mmap_lock", "read"), ("unlock", "mmap_lock", "read"),   # revalidate
        ("lock", "mmap_lock", "write"), ("lock", "anon_vma", "write"),
        ("lock", "ptl_pmd", ""), ("tlb_flush", "", ""), ("unlock", "ptl_pmd", ""),
        ("unlock", "anon_vma", "write"), ("copy_mc_user_highpage", "", "")]
    assert seq[first_copy + 1:] == [
        ("lock", "ptl_pmd", ""), ("unlock", "ptl_pmd", ""),
        ("unlock", "mmap_lock", "write"),
        ("lock", "mmap_lock", "read"), ("unlock", "mmap_lock", "read")]  # madvise's own


def test_collapse_flushes_every_cpus_tlb():
    """pmdp_collapse_flush: once the PMD is cleared, no CPU keeps a 4 KiB translation of
    the block (the copy must not miss a write through a stale entry)."""
    async def fn(m, k):
        p, a = await small_pages(k)
        await k.parallel(lambda cpu: p.on(cpu).touch(a, 2 * MiB, write=False, value=1),
                         lambda cpu: p.on(cpu).touch(a, 2 * MiB, write=False, value=1))
        mm = p.task.mm
        assert all(any(key[0] == mm.id for key in cpu.tlb4k) for cpu in m.cpus)
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        lo, hi = a >> 12, (a + 2 * MiB) >> 12
        assert not any(key[0] == mm.id and lo <= key[1] < hi
                       for cpu in m.cpus for key in cpu.tlb4k)
    run(fn, cpus=2)


def test_isolate_failure_puts_everything_back(monkeypatch):
    """A failure after the PMD was cleared (here the isolate's refcount re-check) puts
    the old PTE table back with pmd_populate, unlocks and returns every isolated folio to
    the LRU, and frees the new folio; thp_collapse_alloc still counted it; MADV_COLLAPSE
    says EAGAIN (SCAN_PAGE_COUNT)."""
    calls = []
    real = khugepaged.is_refcount_suitable

    def flaky(folio):
        calls.append(folio.pfn)
        return real(folio) and len(calls) <= NR + 100  # the scan's 512, then 100 isolated

    async def fn(m, k):
        p, a = await small_pages(k, value=6)
        mm = p.task.mm
        before = list(m.physmem.tables[table_pfn(pmd_at(m, mm, a)[1])])
        free = m.zone.nr_free
        monkeypatch.setattr(khugepaged, "is_refcount_suitable", flaky)
        assert await errno_name(p.madvise(a, 2 * MiB, "collapse")) == "EAGAIN"
        assert last(m, "mm_collapse_huge_page_isolate")["status"] == "not_suitable_page_count"
        assert list(m.physmem.tables[table_pfn(pmd_at(m, mm, a)[1])]) == before
        for e in before:
            folio = m.physmem.page(pte_pfn(e))
            assert folio.flags & PG_lru and folio.refcount == 1
            assert folio.lock is None or folio.lock.owner is None
        assert m.zone.nr_free == free and ev(m, "thp_collapse_alloc") == 1
        assert await p.verify() == []
    run(fn)


@pytest.mark.parametrize("change, result", [("munmap", "vma_null"),
                                            ("dontneed", "pmd_none")])
def test_range_changed_while_allocating(monkeypatch, change, result):
    """collapse_huge_page holds no mmap lock while it allocates; after retaking it,
    hugepage_vma_revalidate and find_pmd_or_thp_or_none find what changed meanwhile (the
    VMA unmapped: SCAN_VMA_NULL; every page zapped and the empty PTE table reclaimed:
    SCAN_PMD_NONE) and the collapse gives up, freeing the new folio; MADV_COLLAPSE says
    EINVAL."""
    real = khugepaged_collapse.alloc_charge_folio
    got = []

    async def slow_alloc(m, mm, cc):
        r = await real(m, mm, cc)
        got.append(r[1])
        await m.sched.sleep(MSEC)  # a long allocation: direct compaction, say
        return r

    async def fn(m, k):
        p, a = await small_pages(k)
        monkeypatch.setattr(khugepaged_collapse, "alloc_charge_folio", slow_alloc)

        async def collapser():
            assert await errno_name(p.madvise(a, 2 * MiB, "collapse")) == "EINVAL"

        async def other():
            await m.sched.sleep(MSEC // 2)
            if change == "munmap":
                assert await p.munmap(a, 2 * MiB) == 0
            else:
                assert await p.madvise(a, 2 * MiB, "dontneed") == 0

        await testing.together(m, collapser=collapser, other=other)
        assert last(m, "mm_collapse_huge_page")["status"] == result
        assert m.zone.is_free(got[0].pfn) and ev(m, "thp_collapse_alloc") == 1
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (0, 0)
    run(fn)


def test_allocation_failure(monkeypatch):
    """alloc_charge_folio failing: thp_collapse_alloc_failed, SCAN_ALLOC_HUGE_PAGE_FAIL,
    and MADV_COLLAPSE returns ENOMEM; khugepaged asks GFP_TRANSHUGE_LIGHT when
    khugepaged/defrag is 0, MADV_COLLAPSE always GFP_TRANSHUGE."""
    asked = []
    real = page_alloc.alloc_pages

    async def no_thp(m, order, gfp, purpose, *a):
        if order == 9:
            asked.append(gfp)
            return -1
        return await real(m, order, gfp, purpose, *a)

    async def fn(m, k):
        p, a = await small_pages(k)
        monkeypatch.setattr(page_alloc, "alloc_pages", no_thp)
        assert await errno_name(p.madvise(a, 2 * MiB, "collapse")) == "ENOMEM"
        assert last(m, "mm_collapse_huge_page")["status"] == "alloc_huge_page_failed"
        m.sysfs.write("khugepaged/defrag", 0)
        assert await scan(m, p, a) == R.SCAN_ALLOC_HUGE_PAGE_FAIL
        assert asked == ["GFP_TRANSHUGE", "GFP_TRANSHUGE_LIGHT"]
        assert (ev(m, "thp_collapse_alloc_failed"), ev(m, "thp_collapse_alloc")) == (2, 0)
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (2048, 0)
    run(fn)


def test_madvise_collapse_ignores_enabled_but_not_nohugepage():
    """TVA_FORCED_COLLAPSE: enabled=never does not stop MADV_COLLAPSE; VM_NOHUGEPAGE
    does (EINVAL)."""
    async def fn(m, k):
        m.sysfs.write("enabled", "never")
        p, a = await small_pages(k, size=4 * MiB)
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        await p.madvise(a + 2 * MiB, 2 * MiB, "nohugepage")
        assert await errno_name(p.madvise(a + 2 * MiB, 2 * MiB, "collapse")) == "EINVAL"
        assert smaps_range(m, p.task.mm, a, a + 4 * MiB) == (4096, 2048)
    run(fn)


def test_collapse_of_shared_pages_copies_for_this_mm_only():
    """The collapse result is always a new exclusive THP for this mm: small pages shared
    with a child after fork are copied, the child keeps mapping the old ones."""
    async def fn(m, k):
        p, a = await small_pages(k, value=4)
        c = await p.fork("child")
        assert await p.madvise(a, 2 * MiB, "collapse") == 0
        assert smaps_range(m, c.task.mm, a, a + 2 * MiB) == (2048, 0)
        await p.touch(a, 2 * MiB, value=8)
        assert await c.verify() == [] and await p.verify() == []
    run(fn)


def test_mremap_moves_ptes_and_huge_pmds():
    """do_mremap (MAYMOVE|FIXED): moved PTEs keep their pages (the VMA keeps its page
    offset, so the rmap still finds them); a whole aligned huge PMD moves with its
    deposited table; growing leaves the grown part empty; shrinking unmaps the tail
    (splitting the PMD the new end cuts); a source spanning two VMAs is EFAULT."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(4 * MiB, 1 << 30)
        await p.madvise(a, 4 * MiB, "hugepage")
        await p.touch(a, 4 * MiB, value=2)
        await p.madvise(a + 3 * MiB, PAGE_SIZE, "dontneed")  # the second THP PTE-mapped
        mm = p.task.mm
        thp = pmd_pfn(pmd_at(m, mm, a)[1])
        assert await p.mremap(a, 4 * MiB, 6 * MiB, 1 << 31) == 1 << 31
        assert pmd_pfn(pmd_at(m, mm, 1 << 31)[1]) == thp
        assert smaps_range(m, mm, 1 << 31, (1 << 31) + 6 * MiB) == (4092, 2048)
        assert smaps_range(m, mm, a, a + 4 * MiB) == (0, 0)
        assert await p.mremap(1 << 31, 6 * MiB, 8 * PAGE_SIZE, 3 << 30) == 3 << 30
        assert smaps_range(m, mm, 0, 1 << 40) == (32, 0)
        assert ev(m, "thp_split_pmd") == 2
        assert await p.verify() == []
        b = await p.mmap(2 * MiB, 1 << 32)
        await p.madvise(b, MiB, "hugepage")
        assert await errno_name(p.mremap(b, 2 * MiB, 2 * MiB, 5 << 30)) == "EFAULT"
    run(fn)


# ------------------------------------------------------------------- the daemon
def test_khugepaged_passes_budget_and_sleeps_in_emulated_time():
    """pages_to_scan 512 gives one PMD per pass (1 for the mm + 512 for the first
    block's collapse attempt reach the budget); passes come scan_sleep_millisecs apart
    in emulated time; the first one at once, when the mm registers on an empty list;
    finishing the list counts full_scans, each collapse pages_collapsed."""
    async def fn(m, k):
        m.sysfs.write("khugepaged/pages_to_scan", 512)
        m.sysfs.write("khugepaged/scan_sleep_millisecs", 1000)
        start_khugepaged(m)
        p, a = await small_pages(k, size=8 * MiB)
        await k.sleep(MSEC)
        t0 = m.sched.now
        await p.madvise(a, 8 * MiB, "hugepage")
        seen = []
        for _ in range(5):
            await k.sleep(500 * MSEC)
            seen.append((m.sysfs["khugepaged/pages_collapsed"], m.sysfs["khugepaged/full_scans"]))
            await k.sleep(500 * MSEC)
        assert seen == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1)]
        assert 5000 * MSEC <= m.sched.now - t0 < 5001 * MSEC
        assert smaps_range(m, p.task.mm, a, a + 8 * MiB)[1] == 8192
        with pytest.raises(sysfs.KnobError):
            m.sysfs.write("khugepaged/full_scans", 0)
    run(fn)


def test_sleep_knob_write_wakes_khugepaged():
    """scan_sleep_millisecs_store resets khugepaged_sleep_expire and wakes the thread:
    a long sleep is cut short by the write, as the oracle's kick relies on."""
    async def fn(m, k):
        m.sysfs.write("khugepaged/scan_sleep_millisecs", 100_000)
        start_khugepaged(m)
        p, a = await small_pages(k, size=4 * MiB)
        await p.madvise(a, 4 * MiB, "hugepage")
        await k.sleep(MSEC)
        assert m.sysfs["khugepaged/full_scans"] == 1
        for n in (2, 3):
            m.sysfs.write("khugepaged/scan_sleep_millisecs", 100_000)
            await k.sleep(MSEC)
            assert m.sysfs["khugepaged/full_scans"] == n
        assert m.sched.now < 100_000 * MSEC
    run(fn)


def test_allocation_failure_sleeps_alloc_sleep_then_ends_the_pass(monkeypatch):
    """khugepaged_do_scan: the first SCAN_ALLOC_HUGE_PAGE_FAIL of a pass sleeps
    alloc_sleep_millisecs and goes on, the second ends the pass; then scan_sleep."""
    attempts = []
    real = page_alloc.alloc_pages

    async def no_thp(m, order, gfp, purpose, *a):
        if order == 9:
            attempts.append(m.sched.now)
            return -1
        return await real(m, order, gfp, purpose, *a)

    async def fn(m, k):
        m.sysfs.write("khugepaged/scan_sleep_millisecs", 1000)
        m.sysfs.write("khugepaged/alloc_sleep_millisecs", 5000)
        monkeypatch.setattr(page_alloc, "alloc_pages", no_thp)
        start_khugepaged(m)
        p, a = await small_pages(k, size=8 * MiB)
        await p.madvise(a, 8 * MiB, "hugepage")
        await k.sleep(12_500 * MSEC)
        gaps = [round((t - attempts[0]) / MSEC / 100) / 10 for t in attempts]
        assert gaps == [0, 5, 6, 11, 12]  # seconds: fail, +alloc_sleep, fail, +scan_sleep
        assert ev(m, "thp_collapse_alloc_failed") == 5
    run(fn)


def test_khugepaged_with_enabled_never_waits():
    """hugepage_pmd_enabled false: the thread does not scan (the kernel stops it), and
    a write to `enabled` that brings THPs back starts it on the registered mms."""
    async def fn(m, k):
        start_khugepaged(m)
        p, a = await small_pages(k)
        await p.madvise(a, 2 * MiB, "hugepage")
        m.sysfs.write("enabled", "never")
        await k.sleep(30_000 * MSEC)
        before = m.sysfs["khugepaged/full_scans"]
        await k.sleep(30_000 * MSEC)
        assert m.sysfs["khugepaged/full_scans"] == before
        m.sysfs.write("enabled", "madvise")
        await k.sleep(MSEC)
        assert m.sysfs["khugepaged/full_scans"] == before + 1
    run(fn)


# ------------------------------------------------------------------------ workloads
def test_dontneed_refill_program():
    """workloads/khugepaged_dontneed_refill.py: 1, 64, 65 and 409 scattered 4 KiB frees
    in four THPs; khugepaged refills the blocks with at most max_ptes_none holes: none
    at 0, the first two at 64, all four at 409 and 511. Rss: 8192 kB, then 8192 - 4 *
    539 = 6036 kB, then back by 4 kB per refilled hole. (Invariants every 25 operations:
    the program makes over 2000.)"""
    from kmm.tools.runner import run_program
    n = [0]

    def every_25th(m, k):
        n[0] += 1
        if n[0] % 25 == 0:
            testing.check_invariants(m, k)

    rep = run_program(str(WORKLOADS / "khugepaged_dontneed_refill.py"), cpus=1,
                      check=every_25th)
    res = rep["result"]
    assert {s: (r["blocks_refilled"], r["rss_kb"], r["anon_huge_kb"][2], r["lost_bytes"])
            for s, r in res.items()} == {
        "max_ptes_none=0": (0, [8192, 6036, 6036], 0, 0),
        "max_ptes_none=64": (2, [8192, 6036, 6036 + 4 * 65], 4096, 0),
        "max_ptes_none=409": (4, [8192, 6036, 8192], 8192, 0),
        "max_ptes_none=511": (4, [8192, 6036, 8192], 8192, 0)}


def test_collapse_cost_program():
    """workloads/khugepaged_collapse_cost.py: MADV_COLLAPSE stalls the caller for the
    whole collapse and its THPs are there on return; with khugepaged the caller pays
    nothing, khugepaged pays the collapse in its own actor, and with pages_to_scan 1024
    (two PMDs a pass) the last THPs arrive on the second pass, scan_sleep_millisecs
    (10 s) after the first."""
    from kmm.tools.runner import run_program
    rep = run_program(str(WORKLOADS / "khugepaged_collapse_cost.py"), cpus=1,
                      check=testing.check_invariants)
    r = rep["result"]
    mc, kh = r["MADV_COLLAPSE"], r["khugepaged"]
    assert mc["anon_huge_kb"] == kh["anon_huge_kb"] == 8192 and r["lost_bytes"] == 0
    assert mc["app_stall_ms"] > 1000 * kh["app_stall_ms"]
    assert 0.5 < kh["khugepaged_busy_ms"] / mc["app_stall_ms"] < 2
    assert kh["anon_huge_kb_after_first_pass"] == 4096
    assert 10_000 <= kh["thps_after_ms"] <= 10_200  # polled every 100 ms


# ------------------------------------------------------------------ race programs
RACES = [("khugepaged_collapse_race_fault.py", 6), ("khugepaged_collapse_race_munmap.py", 6),
         ("khugepaged_collapse_race_fork.py", 4), ("khugepaged_collapse_race_split.py", 10),
         ("khugepaged_daemon_race.py", 6)]


@pytest.mark.parametrize("program, seed", [(p, s) for p, n in RACES for s in range(n)])
def test_collapse_races_run_clean(program, seed):
    """collapse_huge_page against faults, munmap, fork and split on another CPU, and the
    khugepaged daemon against faults and zaps, under random schedules: the invariant
    checker between operations and no byte lost (each program's own verify)."""
    from kmm.tools.runner import run_program
    rep = run_program(str(WORKLOADS / program), cpus=2, seed=seed, mode="random",
                      check=testing.check_between_ops)
    res = rep["result"]
    assert all(v == 0 for key, v in res.items() if key.endswith("lost_bytes")
               or key.endswith("_lost")), res
    assert res.get("madvise", 0) in (0, "EAGAIN", "EINVAL")
