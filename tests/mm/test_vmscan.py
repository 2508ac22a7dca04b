"""Reclaim (mm/vmscan.c, do_shrink_slab of mm/shrinker.c) and MADV_COLD / MADV_PAGEOUT /
MADV_FREE (mm/madvise.c, madvise_free_huge_pmd of mm/huge_memory.c).

Expected values follow 6.18's code and the host recordings of workloads/cold_*,
free_*, pageout_* (kernel-thp-reference.md 5.3: partial ranges split the THP; whole
ones are deactivated, reclaimed or made lazyfree whole). The invariant checker runs
after every operation.
"""

from __future__ import annotations

import functools

from conftest import run as crun

from kmm import swap, swapfile, testing, vmscan, vmscan_node
from kmm.memory import pmd_lookup
from kmm.mm_types import PG_active, PG_dirty, PG_referenced, PG_swapbacked
from kmm.pgtable import (
    HPAGE_PMD_NR, PAGE_SIZE, pmd_dirty, pmd_index, pmd_pfn, pmd_trans_huge, pmd_young,
    pte_index, pte_present, table_pfn,
)
from kmm.task_mmu import smaps_range, smaps_swap_kb

MiB = 1 << 20
KiB = 1 << 10
NR = HPAGE_PMD_NR


run = functools.partial(crun, swap=64 * MiB)


def ev(m, name):
    return m.vmstat.events[name]


def pmd_of(m, mm, addr):
    return m.physmem.tables[pmd_lookup(m, mm, addr)][pmd_index(addr)]


def pte_of(m, mm, addr):
    return m.physmem.tables[table_pfn(pmd_of(m, mm, addr))][pte_index(addr)]


def lru_of(m, folio):
    return next((name for name, lst in m.lruvec.lists.items() if folio.pfn in lst), None)


async def thp(k, name="main", value=1):
    p = await k.process(name)
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    await p.touch(a, 4 * MiB, value=value)
    return p, a


# ------------------------------------------------------------ MADV_PAGEOUT
def test_pageout_of_one_page_inside_a_thp_splits_it_and_swaps_that_page():
    """workloads/pageout_one_page: the PMD path sees a range shorter than the PMD, so
    it splits the folio (split_folio: thp_split_pmd 1, thp_split_page 1) and the PTE
    path reclaims just the covered page (pswpout 1, Swap 4 kB); the other THP stays
    PMD-mapped."""
    async def fn(m, k):
        p, a = await thp(k)
        mm = p.task.mm
        assert await p.madvise(a + MiB, PAGE_SIZE, "pageout") == 0
        assert (ev(m, "thp_split_pmd"), ev(m, "thp_split_page"), ev(m, "pswpout"),
                ev(m, "thp_swpout")) == (1, 1, 1, 0)
        assert smaps_range(m, mm, a, a + 4 * MiB) == (4092, 2048)
        assert smaps_swap_kb(m, mm, a, a + 4 * MiB) == 4
        assert swapfile.is_swap_entry(m, pte_of(m, mm, a + MiB))
        assert await p.verify() == []  # faults the page back in
        assert ev(m, "pswpin") == 1
    run(fn)


def test_pageout_skips_a_thp_shared_with_a_child():
    """workloads/fork_pageout_parent: folio_maybe_mapped_shared -> leave it alone."""
    async def fn(m, k):
        p, a = await thp(k)
        await p.fork("c1")
        await p.madvise(a, 4 * MiB, "pageout")
        assert ev(m, "pswpout") == 0 and ev(m, "thp_split_pmd") == 0
        assert smaps_range(m, p.task.mm, a, a + 4 * MiB) == (4096, 4096)
    run(fn)


# --------------------------------------------------------------- MADV_COLD
def test_cold_whole_thp_is_deactivated_and_aged_without_a_split():
    """madvise_cold_or_pageout_pte_range's PMD path: a THP the range covers whole has
    its PMD made old (pmdp_invalidate, set_pmd_at), PG_referenced cleared and moves to
    the inactive list (folio_deactivate); nothing is split or freed."""
    async def fn(m, k):
        p, a = await thp(k)
        mm = p.task.mm
        folio = m.physmem.page(pmd_pfn(pmd_of(m, mm, a)))
        swap.folio_mark_accessed(m, folio)
        swap.folio_mark_accessed(m, folio)  # referenced, then active
        assert lru_of(m, folio) == "active_anon"
        assert pmd_young(pmd_of(m, mm, a))
        assert await p.madvise(a, 2 * MiB, "cold") == 0
        assert lru_of(m, folio) == "inactive_anon"
        assert not folio.flags & (PG_active | PG_referenced)
        assert pmd_trans_huge(pmd_of(m, mm, a)) and not pmd_young(pmd_of(m, mm, a))
        assert ev(m, "thp_split_pmd") == ev(m, "thp_split_page") == 0
        assert smaps_range(m, mm, a, a + 4 * MiB) == (4096, 4096)
        assert await p.verify() == []
    run(fn)


def test_cold_of_part_of_a_thp_splits_it():
    """workloads/cold_thp_partial: a partly covered PMD-mapped THP is split (PMD and
    folio) even though nothing is paged out; the covered 4 KiB page is deactivated."""
    async def fn(m, k):
        p, a = await thp(k)
        mm = p.task.mm
        await p.madvise(a + MiB, PAGE_SIZE, "cold")
        assert (ev(m, "thp_split_pmd"), ev(m, "thp_split_page")) == (1, 1)
        assert smaps_range(m, mm, a, a + 4 * MiB) == (4096, 2048)
        page = m.physmem.folio(pte_of(m, mm, a + MiB) >> 12 & ((1 << 40) - 1))
        assert page.order == 0 and lru_of(m, page) == "inactive_anon"
    run(fn)


# --------------------------------------------------------------- MADV_FREE
def test_free_whole_thp_makes_it_lazyfree_and_it_keeps_its_bytes():
    """madvise_free_huge_pmd: a THP covered whole becomes lazyfree (off the swap-backed
    LRU: inactive file list, no PG_swapbacked, clean) and its PMD clean and old; no
    split. Without reclaim its bytes still read back; a rewrite dirties the PMD."""
    async def fn(m, k):
        p, a = await thp(k)
        mm = p.task.mm
        folio = m.physmem.page(pmd_pfn(pmd_of(m, mm, a)))
        assert await p.madvise(a, 2 * MiB, "free") == 0
        pmd = pmd_of(m, mm, a)
        assert pmd_trans_huge(pmd) and not pmd_dirty(pmd) and not pmd_young(pmd)
        assert lru_of(m, folio) == "inactive_file"
        assert not folio.flags & (PG_swapbacked | PG_dirty)
        assert ev(m, "thp_split_pmd") == ev(m, "thp_split_page") == 0
        assert await p.touch(a, 2 * MiB, write=False, value=1) == 0
        await p.touch(a, PAGE_SIZE, value=2)
        assert pmd_dirty(pmd_of(m, mm, a))
        assert smaps_range(m, mm, a, a + 4 * MiB) == (4096, 4096)
    run(fn)


def test_free_of_part_of_a_thp_splits_it():
    """workloads/free_thp_partial: madvise_free_huge_pmd splits a partly covered THP
    (thp_split_pmd 1, thp_split_page 1); the covered page becomes lazyfree."""
    async def fn(m, k):
        p, a = await thp(k)
        mm = p.task.mm
        await p.madvise(a + MiB, PAGE_SIZE, "free")
        assert (ev(m, "thp_split_pmd"), ev(m, "thp_split_page")) == (1, 1)
        page = m.physmem.folio(pte_of(m, mm, a + MiB) >> 12 & ((1 << 40) - 1))
        assert page.order == 0 and lru_of(m, page) == "inactive_file"
        assert smaps_range(m, mm, a, a + 4 * MiB) == (4096, 2048)
    run(fn)


def test_reclaim_discards_clean_lazyfree_pages_and_keeps_redirtied_ones():
    """shrink_folio_list: a clean lazyfree folio is unmapped and freed without IO
    (pglazyfreed); one written again after MADV_FREE fails the unmap, becomes
    swap-backed again and is activated. The discarded pages read zero (the reclaim is
    the scenarios' memcg one, swappiness 0: nothing is swapped)."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(32 * KiB)
        await p.touch(a, 32 * KiB, value=9)
        await p.madvise(a, 32 * KiB, "free")
        await p.touch(a + 3 * PAGE_SIZE, 1, value=4)  # redirtied
        await vmscan_node.memcg_reclaim(m)
        assert ev(m, "pglazyfreed") == 7 and ev(m, "pswpout") == 0
        mm = p.task.mm
        kept = m.physmem.folio(pte_of(m, mm, a + 3 * PAGE_SIZE) >> 12 & ((1 << 40) - 1))
        # activated, then moved back by shrink_lruvec's anon aging (swap exists and
        # the inactive anon list is low): a swap-backed anon folio again
        assert kept.flags & PG_swapbacked and lru_of(m, kept) == "inactive_anon"
        assert ev(m, "pgactivate") >= 1 and ev(m, "pgdeactivate") >= 1
        assert mm.rss_anon == 1
        # the discarded bytes are gone (the workload shadow keeps them as lazyfree)
        assert await p.touch(a, 3 * PAGE_SIZE, write=False, value=0) == 0
        assert (await p.load(a + 3 * PAGE_SIZE))[0] == 4
    run(fn)


def test_free_throws_away_swapped_out_pages():
    """madvise_free_pte_range: a swap entry is cleared and its slot freed
    (free_swap_and_cache), so the page later reads zero without a swap-in."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(16 * KiB)
        await p.touch(a, 16 * KiB, value=6)
        await p.madvise(a, 16 * KiB, "pageout")
        assert p.task.mm.swapents == 4
        await p.madvise(a, 16 * KiB, "free")
        assert p.task.mm.swapents == 0 and m.swap_info.inuse_pages == 0
        assert await p.touch(a, 16 * KiB, write=False, value=0) == 0
        assert ev(m, "pswpin") == 0 and ev(m, "pgmajfault") == 0
    run(fn)


# ------------------------------------------------------------ direct reclaim
def test_direct_reclaim_takes_cold_inactive_pages_before_referenced_ones():
    """try_to_free_pages: shrink_inactive_list takes folios from the inactive list's
    tail; folio_check_references keeps a folio whose PTE is young (PG_referenced, back
    to the list head) and reclaims an unreferenced one. Region B is older but
    referenced; region A (aged by MADV_COLD) goes to swap first, until the 32 pages
    of SWAP_CLUSTER_MAX are reclaimed."""
    async def fn(m, k):
        p = await k.process()
        b = await p.mmap(256 * KiB)
        a = await p.mmap(256 * KiB)
        await p.touch(b, 256 * KiB, value=2)  # older: nearer the list's tail
        await p.touch(a, 256 * KiB, value=1)
        await p.madvise(a, 256 * KiB, "cold")  # clears A's young bits
        mm = p.task.mm
        nr = await vmscan_node.try_to_free_pages(m, 0, "GFP_HIGHUSER_MOVABLE")
        assert nr >= vmscan.SWAP_CLUSTER_MAX
        assert ev(m, "pgsteal_direct") == nr and ev(m, "allocstall_normal") == 1
        swapped_a = sum(1 for i in range(64)
                        if swapfile.is_swap_entry(m, pte_of(m, mm, a + i * PAGE_SIZE)))
        assert swapped_a == nr
        assert all(pte_present(pte_of(m, mm, b + i * PAGE_SIZE)) for i in range(64))
        assert all(m.physmem.folio(pte_of(m, mm, b + i * PAGE_SIZE) >> 12
                                   & ((1 << 40) - 1)).flags & PG_referenced
                   for i in range(64))
        assert await p.verify() == []
    run(fn)


def test_without_swap_reclaim_scans_no_anon_but_runs_the_shrinkers():
    """get_scan_count: no swap room -> SCAN_FILE, so anonymous pages are not scanned;
    shrink_slab still runs the deferred split shrinker, which splits a partially
    mapped THP and frees its unmapped pages."""
    async def fn(m, k):
        p, a = await thp(k)
        await p.madvise(a + MiB, MiB, "dontneed")
        assert ev(m, "thp_deferred_split_page") == 1
        free = m.zone.nr_free
        nr = await vmscan_node.try_to_free_pages(m, 0, "GFP_HIGHUSER_MOVABLE")
        assert ev(m, "pgscan_anon") == 0 and ev(m, "pswpout") == 0
        assert ev(m, "thp_split_page") == 1 and m.zone.nr_free >= free + 256
        assert nr == 0  # shrinkers' frees are not LRU pages reclaimed
        assert smaps_range(m, p.task.mm, a, a + 4 * MiB) == (3072, 2048)
    run(fn, swap=0)


class FakeShrinker:
    """A shrinker that records its scans and frees nothing."""
    seeks = vmscan.DEFAULT_SEEKS

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[int] = []

    def count_objects(self, m) -> int:
        return self.n

    async def scan_objects(self, m, nr_to_scan: int) -> int:
        self.calls.append(nr_to_scan)
        return 0


def test_do_shrink_slab_scans_in_batches_and_defers_the_rest():
    """do_shrink_slab: delta = (freeable >> priority) * 4 / seeks; scans in batches of
    128 while at least a batch is left; the rest is deferred to the next call (capped
    at 2 * freeable). A slab smaller than a batch is scanned whole once the scan covers
    all of it."""
    async def fn(m, k):
        big = FakeShrinker(1000)
        assert await vmscan_node.do_shrink_slab(m, big, 12, False) == 0 and big.calls == []
        await vmscan_node.do_shrink_slab(m, big, 0, False)  # delta 2000, capped at 2000
        assert big.calls == [128] * 15
        assert vmscan.NODE_DATA(m).nr_deferred[(id(big), False)] == 2000 - 15 * 128
        small = FakeShrinker(10)
        await vmscan_node.do_shrink_slab(m, small, 1, False)  # delta 10 >= freeable
        assert small.calls == [10]
        assert ev(m, "slabs_scanned") == 15 * 128 + 10
    run(fn)


def test_memory_pressure_program_swaps_thps_whole_and_keeps_every_byte():
    """workloads/memory_pressure.py: 40 MiB written on a 32 MiB machine with swap. The
    allocator wakes kswapd at the low watermark and kswapd reclaims (pgsteal_kswapd);
    each THP it takes goes out whole to a free cluster, its PMD split for the unmap
    (thp_swpout == thp_split_pmd, 512 pswpout each, as the host's pageout_thp
    recording shows); reading back brings every swapped page in by its own major fault
    (pgmajfault == pswpin), and no byte is lost."""
    import pathlib
    from kmm.tools.runner import run_program
    prog = pathlib.Path(__file__).resolve().parents[2] / "workloads" / "memory_pressure.py"
    rep = run_program(str(prog), check=testing.check_between_ops)
    r = rep["result"]
    w, back = r["writing"], r["reading_back"]
    assert r["mismatches"] == 0 and r["lost_bytes"] == 0
    assert w["pgsteal_kswapd"] > 0 and w["pageoutrun"] > 0
    assert w["thp_swpout"] > 0 and w["thp_swpout_fallback"] == 0
    assert w["thp_split_pmd"] == w["thp_swpout"] and w["thp_split_page"] == 0
    assert w["pswpout"] == 512 * w["thp_swpout"]
    assert back["pswpin"] == back["pgmajfault"] > 0
    rss, huge = r["rss_anon_huge_kb_after_write"]
    assert rss == huge  # what stayed resident is still PMD-mapped
