"""Compaction (mm/compaction.c), the allocation slow path that runs it
(__alloc_pages_slowpath, mm/page_alloc.c) and the defrag knob's gfp masks
(vma_thp_gfp_mask, mm/huge_memory.c), on a 16 MiB machine fragmented by
workloads/fragmented_defrag.py's recipe: pageblocks 1..6 each hold 8 movable 4K pages
(one per 256 KiB) and no free 2 MiB block exists; the tests choose which of them also
hold an unmovable kernel page. Pageblock 0 holds the zero page and page tables,
pageblock 7 is pinned by an order-9 kernel allocation.

Expected values are the kernel's control flow, step by step: a THP fault tries
alloc_pages_mpol twice (first __GFP_THISNODE | __GFP_NORETRY, then, if the mask may
direct-reclaim, the mask itself); the slow path compacts async before reclaim for
costly orders, gives up after that under __GFP_NORETRY when compaction was skipped or
deferred, and otherwise reclaims and compacts again (async under __GFP_NORETRY,
sync-light without); only sync runs that fail defer the next ones.
"""

from __future__ import annotations

import pytest
from conftest import run as crun

from kmm import compaction, gfp, page_alloc, swap, testing, vmscan, vmscan_node
from kmm.compaction import CompactResult
from kmm.daemon import start_daemon
from kmm.daemons.kcompactd import Kcompactd
from kmm.machine import Machine, MachineConfig
from kmm.mm_types import PG_lru
from kmm.pgtable import HPAGE_PMD_NR, pmd_index, pmd_pfn, pmd_trans_huge
from kmm.workloads import fragmented_defrag as fd

MiB = 1 << 20
ARENA = 6  # pageblocks 1..6


def run(fn, *, knobs=None, mode="free", seed=1):
    """A 16 MiB, 2-CPU machine (enabled=always); ``fn(m, k)`` is the driver; the
    invariants are checked at the end."""
    return crun(fn, memory=16 * MiB, cpus=2, seed=seed, mode=mode, check=None,
                knobs={"enabled": "always", **(knobs or {})}, machine=True)


async def fragment(m, k, unmovable):
    """Fragment the arena; ``unmovable`` selects arena blocks (0-based) that also get an
    unmovable page. Returns the frag process and fragment()'s record."""
    p = await k.process("frag")
    st = await fd.fragment(k, p, ARENA, unmovable=unmovable)
    assert st["arena"] == [b * 512 for b in range(1, ARENA + 1)]
    assert m.zone.buddyinfo()[9:] == [0, 0]
    testing.check_invariants(m, k)
    return p, st


async def distinct_bytes(p, st):
    """Write a different byte into every movable page (compaction must carry them)."""
    for i in range(st["pages"]):
        await p.store(st["addr"] + i * 4096 + 7, bytes([1 + i % 251]))


def block_layout(m, block):
    """(movable LRU pages, other allocated pages) in a pageblock."""
    lru = other = 0
    for pfn in range(block * 512, block * 512 + 512):
        if m.zone.is_free(pfn):
            continue
        pg = m.physmem.pages.get(pfn)
        if pg is not None and pg.flags & PG_lru and not pg.order:
            lru += 1
        else:
            other += 1
    return lru, other


async def thp_region(k, madvised=True, nr=4):
    q = await k.process("thp")
    a = await q.mmap(nr * 2 * MiB)
    if madvised:
        await q.madvise(a, nr * 2 * MiB, "hugepage")
    return q, a


def huge_pfn(m, q, addr):
    from kmm.memory import pmd_lookup
    e = m.physmem.tables[pmd_lookup(m, q.task.mm, addr)][pmd_index(addr)]
    return pmd_pfn(e) if pmd_trans_huge(e) else -1


def ev(m, *names):
    return {n: m.vmstat.events[n] for n in names}


FAULT_EVENTS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall",
                "compact_success", "compact_fail")


# ------------------------------------------------------- the slow path, step by step
def spy_slow_path(monkeypatch, log):
    """Record the slow path's calls into reclaim and compaction (reclaim frees
    nothing: all memory is anonymous and there is no swap)."""
    async def wakeup_kswapd(m, order, gfp=None, nid=0):
        log.append(("wakeup_kswapd", order))

    async def try_to_free_pages(m, order, gfp):
        log.append(("try_to_free_pages", order))
        return 0

    monkeypatch.setattr(vmscan_node, "wakeup_kswapd", wakeup_kswapd)
    monkeypatch.setattr(vmscan_node, "try_to_free_pages", try_to_free_pages)
    monkeypatch.setattr(vmscan, "zone_reclaimable_pages", lambda m: 0)
    real = compaction.try_to_compact_pages

    async def try_to_compact_pages(m, order, gfp, alloc_flags, prio, zones=None):
        r = await real(m, order, gfp, alloc_flags, prio, zones)
        log.append(("compact", prio.name[len("COMPACT_PRIO_"):], r.name[len("COMPACT_"):]))
        return r
    monkeypatch.setattr(compaction, "try_to_compact_pages", try_to_compact_pages)


DIRECT_NORETRY = [("compact", "ASYNC", "COMPLETE"), ("try_to_free_pages", 9),
                  ("compact", "ASYNC", "COMPLETE")]
DIRECT = DIRECT_NORETRY + [("compact", "ASYNC", "COMPLETE"), ("try_to_free_pages", 9),
                           ("compact", "SYNC_LIGHT", "COMPLETE")]
KSWAPD = [("wakeup_kswapd", 9), ("wakeup_kswapd", 9)]


@pytest.mark.parametrize("defrag, madvised, expected", [
    # GFP_TRANSHUGE: direct compaction and reclaim; the first (NORETRY) attempt stays
    # async, the second ends with a sync-light run
    ("always", True, DIRECT),
    # GFP_TRANSHUGE | __GFP_NORETRY: both attempts give up after async compaction
    ("always", False, DIRECT_NORETRY + DIRECT_NORETRY),
    # GFP_TRANSHUGE_LIGHT | __GFP_KSWAPD_RECLAIM: wake kswapd (slow path entry and
    # retry loop), no direct work, no second attempt
    ("defer", True, KSWAPD),
    ("defer", False, KSWAPD),
    ("defer+madvise", True, DIRECT),
    ("defer+madvise", False, KSWAPD),
    ("madvise", True, DIRECT),
    ("madvise", False, []),             # GFP_TRANSHUGE_LIGHT: nothing at all
    ("never", True, []),
    ("never", False, []),
], ids=lambda v: v if isinstance(v, str) else None)
def test_thp_fault_slow_path_per_defrag_mode(monkeypatch, defrag, madvised, expected):
    """On a zone where compaction cannot free a block (every pageblock holds an
    unmovable page), one THP fault's slow-path calls are exactly the kernel's for the
    mask vma_thp_gfp_mask gives; it falls back either way."""
    log = []

    async def fn(m, k):
        await fragment(m, k, unmovable=lambda i: True)
        spy_slow_path(monkeypatch, log)
        m.sysfs.write("defrag", defrag)
        q, a = await thp_region(k, madvised)
        await q.touch(a, 1)
        stalls = sum(1 for e in log if e[0] == "compact")
        assert ev(m, *FAULT_EVENTS) == {
            "thp_fault_alloc": 0, "thp_fault_fallback": 1, "compact_stall": stalls,
            "compact_success": 0, "compact_fail": stalls}
    run(fn)
    assert log == expected


def test_order0_allocation_reclaims_then_retries(monkeypatch):
    """An order-0 GFP_HIGHUSER_MOVABLE allocation at the min watermark wakes kswapd,
    retries at min, then direct-reclaims (never compacts: order 0) and takes a page
    reclaim freed; with nothing reclaimable it fails once should_reclaim_retry sees
    that reclaiming everything could not meet the watermark."""
    log = []

    async def fn(m, k):
        held = []
        while (pfn := await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "t")) >= 0:
            held.append(pfn)
        assert m.zone.nr_free == m.zone.wmark["min"]
        spy_slow_path(monkeypatch, log)
        reclaimable = [32]

        async def try_to_free_pages(m, order, gfp):
            log.append(("try_to_free_pages", order))
            n, reclaimable[0] = reclaimable[0], 0
            for pfn in held[len(held) - n:]:
                await swap.folio_put(m, m.physmem.page(pfn))
            del held[len(held) - n:]
            return n
        monkeypatch.setattr(vmscan_node, "try_to_free_pages", try_to_free_pages)
        assert await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "t") >= 0
        assert log == [("wakeup_kswapd", 0), ("wakeup_kswapd", 0), ("try_to_free_pages", 0)]
        while (pfn := await page_alloc.alloc_pages(m, 0, "GFP_HIGHUSER_MOVABLE", "t")) >= 0:
            held.append(pfn)
            log.clear()
        assert log == [("wakeup_kswapd", 0), ("wakeup_kswapd", 0), ("try_to_free_pages", 0)]
        assert m.vmstat.events["compact_stall"] == 0
        for pfn in held:
            await swap.folio_put(m, m.physmem.page(pfn))
    run(fn)


# ------------------------------------------------------------ compaction proper
@pytest.mark.parametrize("defrag, madvised", [
    ("always", True), ("always", False), ("madvise", True), ("defer+madvise", True)])
def test_async_compaction_frees_the_first_pageblock_without_unmovable_pages(defrag,
                                                                            madvised):
    """Every mode that stalls (always; madvise and defer+madvise in a MADV_HUGEPAGE
    VMA) gets its THP from the first, async run of direct compaction, which skips
    pageblock 0 at its first page (the zero page) and pageblock 1 at its unmovable page
    (skip_on_failure), isolates pageblock 2's 8 movable pages, migrates them to free
    pages the free scanner found at the top, and stops as soon as pageblock 2 is a free
    order-9 block (compact_finished): one stall, one success, the THP at pfn 1024."""
    async def fn(m, k):
        p, st = await fragment(m, k, unmovable=lambda i: i == 0)
        await distinct_bytes(p, st)
        assert block_layout(m, 1) == (8, 1) and block_layout(m, 2) == (8, 0)
        q, a = await thp_region(k, madvised)
        await q.touch(a, 2 * MiB, value=9)
        assert ev(m, *FAULT_EVENTS, "pgmigrate_success", "compact_migrate_scanned") == {
            "thp_fault_alloc": 1, "thp_fault_fallback": 0, "compact_stall": 1,
            "compact_success": 1, "compact_fail": 0, "pgmigrate_success": 8,
            # pfn 0, pfn 512, then all of pageblock 2
            "compact_migrate_scanned": 1 + 1 + 512}
        assert huge_pfn(m, q, a) == 1024
        assert m.zone.compact_defer_shift == 0
        testing.check_invariants(m, k)
        assert await p.verify() == [] and await q.verify() == []
    run(fn, knobs={"defrag": defrag})


def test_compaction_fails_when_every_pageblock_holds_an_unmovable_page():
    """defrag=always, MADV_HUGEPAGE, every pageblock pinned by an unmovable page: async
    runs give up on each block at once and move nothing; the closing sync-light run
    moves movable pages all the same (it does not abandon blocks) but frees no block;
    4 stalls, 4 failures, the fault falls back, the sync failure defers compaction
    (compact_defer_shift 1), and every byte of the moved pages is where it was written."""
    async def fn(m, k):
        p, st = await fragment(m, k, unmovable=lambda i: True)
        await distinct_bytes(p, st)
        before = {b: block_layout(m, b) for b in range(1, ARENA + 1)}
        q, a = await thp_region(k)
        await q.touch(a, 2 * MiB, value=9)
        e = ev(m, *FAULT_EVENTS, "pgmigrate_success", "pgmigrate_fail")
        assert e["pgmigrate_success"] > 0 and e["pgmigrate_fail"] == 0
        del e["pgmigrate_success"], e["pgmigrate_fail"]
        assert e == {"thp_fault_alloc": 0, "thp_fault_fallback": 1, "compact_stall": 4,
                     "compact_success": 0, "compact_fail": 4}
        assert (m.zone.compact_defer_shift, m.zone.compact_considered) == (1, 0)
        assert m.zone.buddyinfo()[9:] == [0, 0]
        assert {b: block_layout(m, b) for b in range(1, ARENA + 1)} != before  # moved
        testing.check_invariants(m, k)
        assert await p.verify() == [] and await q.verify() == []
    run(fn, knobs={"defrag": "always"})


def test_failed_compaction_is_deferred_exponentially(monkeypatch):
    """defer_compaction / compaction_deferred, fault after fault on the unmovable zone
    (defrag=always, madvised): after a failed sync run the next 1 << shift attempts at
    async or sync-light priority are skipped (each still counts a stall and a failure),
    then compaction runs again; each sync failure doubles the backoff. Per fault:
    (stalls, compaction runs, compact_defer_shift, compact_considered)."""
    runs = []
    real = compaction.compact_zone

    async def compact_zone(m, cc):
        runs.append(cc.mode)
        return await real(m, cc)
    monkeypatch.setattr(compaction, "compact_zone", compact_zone)

    async def fn(m, k):
        await fragment(m, k, unmovable=lambda i: True)
        q, a = await thp_region(k, nr=5)
        out = []
        for i in range(5):
            stalls, n = m.vmstat.events["compact_stall"], len(runs)
            await q.touch(a + i * 2 * MiB, 1)
            out.append((m.vmstat.events["compact_stall"] - stalls, len(runs) - n,
                        m.zone.compact_defer_shift, m.zone.compact_considered))
        return out
    _, out = run(fn, knobs={"defrag": "always"})
    assert out == [
        (4, 4, 1, 0),  # async x3, sync-light: fails, defers (1 attempt skipped next)
        (3, 2, 2, 0),  # NORETRY attempt deferred; then async and sync-light run
        (3, 0, 2, 3),  # 3 of the 4 skipped
        (4, 4, 3, 0),  # the 4th runs: backoff over, all four runs, defer again (8)
        (3, 0, 3, 3),
    ]


# ------------------------------------------------------------- defrag modes
def test_defrag_never_falls_back_without_stalling_or_waking_anyone():
    """defrag=never (GFP_TRANSHUGE_LIGHT): even with a compactable pageblock and a
    madvised VMA the fault falls back at once; kcompactd is not asked for anything."""
    async def fn(m, k):
        await fragment(m, k, unmovable=lambda i: i == 0)
        q, a = await thp_region(k)
        await q.touch(a, 2 * MiB)
        assert ev(m, *FAULT_EVENTS) == {"thp_fault_alloc": 0, "thp_fault_fallback": 1,
                                        "compact_stall": 0, "compact_success": 0,
                                        "compact_fail": 0}
        assert m.zone.kcompactd_max_order == 0
        assert await q.verify() == []
    run(fn, knobs={"defrag": "never"})


def test_defrag_madvise_stalls_only_in_madvised_vmas():
    """defrag=madvise with enabled=always: a plain VMA's fault falls back without
    stalling (GFP_TRANSHUGE_LIGHT), a MADV_HUGEPAGE one compacts and gets its THP."""
    async def fn(m, k):
        await fragment(m, k, unmovable=lambda i: i % 2 == 0)
        plain, a = await thp_region(k, madvised=False)
        await plain.touch(a, 1)
        assert ev(m, *FAULT_EVENTS) == {"thp_fault_alloc": 0, "thp_fault_fallback": 1,
                                        "compact_stall": 0, "compact_success": 0,
                                        "compact_fail": 0}
        r = await plain.mmap(2 * MiB)
        await plain.madvise(r, 2 * MiB, "hugepage")
        await plain.touch(r, 1)
        assert ev(m, *FAULT_EVENTS) == {"thp_fault_alloc": 1, "thp_fault_fallback": 1,
                                        "compact_stall": 1, "compact_success": 1,
                                        "compact_fail": 0}
        assert huge_pfn(m, plain, r) == 1024  # pageblock 2: the first without unmovable
    run(fn, knobs={"defrag": "madvise"})


def hopeless_kswapd(m):
    """kswapd gave up (MAX_RECLAIM_RETRIES failed runs: only anonymous memory, no swap),
    so wakeup_kswapd hands a request that may not stall straight to kcompactd."""
    vmscan.NODE_DATA(m).kswapd_failures = page_alloc.MAX_RECLAIM_RETRIES


@pytest.mark.parametrize("defrag", ["defer", "defer+madvise"])
def test_defrag_defer_wakes_kcompactd_which_frees_a_block(defrag):
    """defer (and defer+madvise outside MADV_HUGEPAGE): the fault falls back at once
    without a stall and asks kcompactd for order 9; kcompactd compacts (sync-light)
    until a block is free, so the next fault gets a THP, still without a stall."""
    async def fn(m, k):
        from kmm.daemons.kswapd import Kswapd
        await fragment(m, k, unmovable=lambda i: i == 0)
        start_daemon(m, Kswapd())
        start_daemon(m, Kcompactd())
        await m.sched.sleep(1000)  # both daemons go to sleep on their waitqueues
        hopeless_kswapd(m)
        q, a = await thp_region(k, madvised=False)
        await q.touch(a, 1)
        assert ev(m, *FAULT_EVENTS) == {"thp_fault_alloc": 0, "thp_fault_fallback": 1,
                                        "compact_stall": 0, "compact_success": 0,
                                        "compact_fail": 0}
        assert m.zone.kcompactd_max_order == 9
        # sync-light does not abandon pageblocks 0 and 1: it moves their movable pages
        # too, then pageblock 2's, which frees it
        movable = sum(block_layout(m, b)[0] for b in range(3))
        await m.sched.sleep(1_000_000)  # kcompactd runs
        assert m.zone.kcompactd_max_order == 0 and m.zone.buddyinfo()[9] == 1
        assert ev(m, "compact_daemon_wake", "pgmigrate_success") == {
            "compact_daemon_wake": 1, "pgmigrate_success": movable}
        assert m.vmstat.events["compact_daemon_migrate_scanned"] > 0
        await q.touch(a + 2 * MiB, 1)
        assert ev(m, *FAULT_EVENTS) == {"thp_fault_alloc": 1, "thp_fault_fallback": 1,
                                        "compact_stall": 0, "compact_success": 0,
                                        "compact_fail": 0}
        assert huge_pfn(m, q, a + 2 * MiB) == 1024
    run(fn, knobs={"defrag": defrag})


def test_kcompactd_defers_after_a_failed_run():
    """kcompactd_do_work on a zone it cannot help: one full sync-light run, COMPLETE,
    defer_compaction; woken again, compaction_deferred skips the work (only
    compact_daemon_wake counts)."""
    async def fn(m, k):
        await fragment(m, k, unmovable=lambda i: True)
        start_daemon(m, Kcompactd())
        await m.sched.sleep(1000)
        scanned = []
        for _ in range(2):
            compaction.wakeup_kcompactd(m, 9)
            await m.sched.sleep(1_000_000)
            scanned.append(m.vmstat.events["compact_daemon_migrate_scanned"])
        assert m.vmstat.events["compact_daemon_wake"] == 2
        assert scanned[0] > 0 and scanned[1] == scanned[0]
        assert (m.zone.compact_defer_shift, m.zone.compact_considered) == (1, 1)
    run(fn)


def test_compaction_under_the_random_scheduler_is_deterministic_and_clean():
    """Two CPUs fault madvised THPs while kcompactd compacts, under the random
    scheduler: the invariants hold between operations, no byte is lost, and the same
    seed gives the same outcome."""
    def once(seed):
        async def fn(m, k):
            p, st = await fragment(m, k, unmovable=lambda i: i % 3 == 0)
            await distinct_bytes(p, st)
            start_daemon(m, Kcompactd())
            q, a = await thp_region(k, nr=4)
            k.after_op = lambda: testing.check_between_ops(m, k)
            compaction.wakeup_kcompactd(m, 9)
            await k.parallel(lambda cpu: q.on(cpu).touch(a, 4 * MiB, value=5),
                             lambda cpu: q.on(cpu).touch(a + 4 * MiB, 4 * MiB, value=6))
            k.after_op = None
            assert await p.verify() == [] and await q.verify() == []
            return (ev(m, *FAULT_EVENTS, "pgmigrate_success"), m.sched.now)
        return run(fn, knobs={"defrag": "madvise"}, mode="random", seed=seed)[1]
    a, b = once(3), once(3)
    assert a == b
    assert a[0]["thp_fault_alloc"] >= 1


def test_untouched_memory_counts_as_free_blocks():
    """Frames never handed out are free order-10 blocks: compaction is not needed
    (compaction_suit_allocation_order says COMPACT_SUCCESS) and the free scanner never
    takes them as targets."""
    m = Machine(MachineConfig(memory=64 * MiB, cpus=1))
    z = m.zone
    assert z.untouched < z.untouched_end
    assert compaction.compaction_suit_allocation_order(
        z, 9, page_alloc.ALLOC_WMARK_MIN, True, False) == CompactResult.COMPACT_SUCCESS
    cc = compaction.CompactControl(z, 9, gfp.GFP_TRANSHUGE, compaction.MIGRATE_ASYNC,
                                   page_alloc.ALLOC_WMARK_MIN, True)
    assert not compaction.suitable_migration_target(cc, z.untouched_end - 512)
    assert compaction.fragmentation_index(z, 9) == -1000
    assert HPAGE_PMD_NR == 512
