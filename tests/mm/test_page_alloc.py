"""The buddy allocator (mm/page_alloc.c): split and merge, LIFO reuse, watermarks, the
order-9 fallback on a fragmented zone, and physical memory that costs only what is used.

Expected figures are arithmetic on the buddy system (a block of order n splits into one
free block of every order below it) and on the kernel's watermark formulas
(calculate_min_free_kbytes, khugepaged's set_recommended_min_free_kbytes,
__setup_per_zone_wmarks), checked against the host's /proc/sys/vm/min_free_kbytes.
"""

from __future__ import annotations

import functools

from conftest import run as crun

from kmm import swap

from math import isqrt

import pytest

from kmm import memory, page_alloc
from kmm.machine import Machine, MachineConfig
from kmm.page_alloc import MAX_PAGE_ORDER
from kmm.pgtable import HPAGE_PMD_NR, HPAGE_PMD_ORDER, pmd_index, pmd_trans_huge
from kmm.task_mmu import smaps_range

MiB = 1 << 20
GiB = 1 << 30
MAX_BLOCK = 1 << MAX_PAGE_ORDER  # 1024 pages, 4 MiB


run = functools.partial(crun, machine=True)

async def alloc(m, order=0):
    return await page_alloc.alloc_pages(m, order, "GFP_HIGHUSER_MOVABLE", "anon")


async def free(m, pfn):
    """The last reference goes: folio_put -> __free_pages."""
    await swap.folio_put(m, m.physmem.page(pfn))


# ------------------------------------------------------------ split, merge
def test_boot_split_leaves_one_block_of_each_lower_order():
    """The first allocation (empty_zero_page, order 0) splits an order-10 block:
    expand() leaves the upper halves free, one block of each order 0..9 (512 + 256 + ...
    + 1 = 1023 pages); the other 1 GiB / 4 MiB - 1 = 255 blocks stay whole."""
    m = Machine(MachineConfig(memory=GiB, cpus=1))
    nr_blocks = GiB // (MAX_BLOCK * 4096)
    assert m.zone.buddyinfo() == [1] * MAX_PAGE_ORDER + [nr_blocks - 1]
    assert m.zone.nr_free == GiB // 4096 - 1
    assert sum(n << o for o, n in enumerate(m.zone.buddyinfo())) == m.zone.nr_free
    assert m.zero_pfn == 0 and not m.zone.is_free(0) and m.zone.is_free(1)
    assert m.zone.check() == []


def test_split_and_merge_buddyinfo_arithmetic():
    """__rmqueue_smallest takes the smallest free block that fits and expand() frees the
    upper halves; __free_one_page merges a freed block with its free buddy (pfn ^ (1 <<
    order)) order by order, so freeing what was taken restores buddyinfo exactly."""
    async def fn(m, k):
        z = m.zone
        boot = z.buddyinfo()
        nr0 = z.nr_free
        # order 0: the free order-0 block is the zero page's buddy, pfn 1
        p = await alloc(m, 0)
        assert p == 1
        assert z.buddyinfo() == [0] + boot[1:]
        await free(m, p)
        assert z.buddyinfo() == boot and z.nr_free == nr0
        # order 0 again with no order-0 block: the order-1 block (pfns 2, 3) splits,
        # pfn 2 is used and pfn 3 is left free
        a = await alloc(m, 0)
        b = await alloc(m, 0)
        assert (a, b) == (1, 2)
        assert z.buddyinfo() == [1, 0] + boot[2:]
        await free(m, a)  # pfn 1 cannot merge: its buddy pfn 0 is the zero page
        assert z.buddyinfo() == [2, 0] + boot[2:]
        await free(m, b)  # pfn 2 merges with 3 into order 1; pfn 1 stays alone
        assert z.buddyinfo() == boot
        # order 5 takes the order-5 block at pfn 32 (1 << 5), untouched blocks stay
        c = await alloc(m, 5)
        assert c == 32 and z.buddyinfo()[5] == 0
        assert z.nr_free == nr0 - 32
        await free(m, c)
        assert z.buddyinfo() == boot
        # order 10: no free order-10 block on the lists, so a never-touched one is used;
        # freeing it cannot merge beyond MAX_PAGE_ORDER
        d = await alloc(m, MAX_PAGE_ORDER)
        assert d % MAX_BLOCK == 0 and d >= MAX_BLOCK
        assert z.buddyinfo()[MAX_PAGE_ORDER] == boot[MAX_PAGE_ORDER] - 1
        await free(m, d)
        assert z.buddyinfo() == boot and z.nr_free == nr0
        assert z.check() == []
    run(fn)


def test_freed_pages_are_reused_last_in_first_out():
    """Free lists are LIFO: a freed block that does not merge goes to the head of its
    list and allocation takes the head (for order 0 the kernel's per-CPU lists behave
    the same: free_unref_folios adds at the head, rmqueue_pcplist takes the head), so
    the most recently freed block of an order is the next one handed out (cache-hot)."""
    async def fn(m, k):
        # pfns 1..16, taken in address order as the split blocks are used up
        held = [await alloc(m, 0) for _ in range(16)]
        assert held == list(range(1, 17))
        # taking pfn 16 split 16..31, leaving pfn 17 as the one free order-0 block
        assert m.zone.buddyinfo()[0] == 1
        # the buddies of 2, 6 and 4 (3, 7 and 5) stay held: no merging, so three more
        # order-0 blocks on the list, handed back newest first
        for pfn in (2, 6, 4):
            await free(m, pfn)
        assert m.zone.buddyinfo()[0] == 4
        assert [await alloc(m, 0) for _ in range(3)] == [4, 6, 2]
        for pfn in held:
            await free(m, pfn)
        assert m.zone.check() == []
    run(fn)


# ------------------------------------------------------------- watermarks
# The host: /proc/sys/vm/min_free_kbytes read 67584 on this 24 GiB machine whose
# /proc/zoneinfo has three populated zones below ZONE_MOVABLE (DMA, DMA32, Normal).
HOST_MIN_FREE_KBYTES = 67584
HOST_NR_ZONES = 3


def recommended_min_free_kbytes(nr_zones: int, lowmem_pages: int) -> int:
    """khugepaged.c set_recommended_min_free_kbytes, in pages then kB (4 KiB pages)."""
    pageblock_nr_pages = HPAGE_PMD_NR  # pageblock_order = HPAGE_PMD_ORDER on x86-64
    migrate_pcptypes = 3               # MIGRATE_UNMOVABLE, MOVABLE, RECLAIMABLE
    pages = pageblock_nr_pages * nr_zones * 2                       # two free pageblocks
    pages += pageblock_nr_pages * nr_zones * migrate_pcptypes ** 2  # fallback headroom
    pages = min(pages, lowmem_pages // 20)                          # at most 5% of lowmem
    return pages * 4


def calculate_min_free_kbytes(lowmem_pages: int) -> int:
    """page_alloc.c calculate_min_free_kbytes: sqrt(lowmem_kbytes * 16), 128..262144."""
    return max(128, min(isqrt(lowmem_pages * 4 * 16), 262144))


def test_recommended_min_free_kbytes_formula_matches_the_host():
    """The formula, fed the host's three zones, gives the host's own value: the 5% cap
    does not bind on 24 GiB, so it is (2 + 3 * 3) pageblocks per zone."""
    host_lowmem_pages = 24 * GiB // 4096
    got = max(calculate_min_free_kbytes(host_lowmem_pages),
              recommended_min_free_kbytes(HOST_NR_ZONES, host_lowmem_pages))
    assert got == HOST_MIN_FREE_KBYTES == (2 + 9) * 512 * HOST_NR_ZONES * 4


@pytest.mark.parametrize("mem", [16 * MiB, 64 * MiB, GiB, 64 * GiB, 1 << 40],
                         ids=["16M", "64M", "1G", "64G", "1T"])
def test_zone_watermarks_follow_setup_per_zone_wmarks(mem):
    """One zone (ZONE_NORMAL), THP enabled: min_free_kbytes is the larger of
    calculate_min_free_kbytes and set_recommended_min_free_kbytes; then
    __setup_per_zone_wmarks: min = min_free_kbytes in pages (the only zone gets it all),
    low = min + max(min / 4, managed * watermark_scale_factor / 10000), high = min + 2 *
    that step (watermark_scale_factor 10)."""
    m = Machine(MachineConfig(memory=mem, cpus=1))
    managed = mem // 4096
    kb = max(calculate_min_free_kbytes(managed), recommended_min_free_kbytes(1, managed))
    assert m.zone.min_free_kbytes == kb
    wmin = kb // 4
    step = max(wmin // 4, managed * 10 // 10000)
    assert m.zone.wmark == {"min": wmin, "low": wmin + step, "high": wmin + 2 * step}
    if mem == GiB:  # spelled out: 11 pageblocks of 2 MiB
        assert m.zone.min_free_kbytes == 22528
        assert m.zone.wmark == {"min": 5632, "low": 7040, "high": 8448}
    if mem == 16 * MiB:  # the 5% cap binds: 4096 // 20 = 204 pages
        assert m.zone.wmark["min"] == 204


def test_order0_allocation_stops_at_the_min_watermark():
    """Without reclaim the slow path may dip to the min watermark but not below
    (__zone_watermark_ok: free - (2^order - 1) must stay above the mark)."""
    async def fn(m, k):
        n = 0
        while await alloc(m, 0) >= 0:
            n += 1
        assert m.zone.nr_free == m.zone.wmark["min"]
        assert n == (16 * MiB // 4096 - 1) - m.zone.wmark["min"]
    run(fn, memory=16 * MiB)


# -------------------------------------------------------- order-9 fallback
def test_thp_fault_on_fragmented_memory_falls_back_to_4k_pages():
    """do_huge_pmd_anonymous_page on a zone with plenty of free memory but no free
    order-9 block: __zone_watermark_ok needs a free block of the order, and compaction
    cannot make one (every 2 MiB block holds a kernel page, which it cannot move), so
    vma_alloc_anon_folio_pmd fails, counts thp_fault_fallback and returns
    VM_FAULT_FALLBACK; the fault continues in do_anonymous_page with 4 KiB pages."""
    async def fn(m, k):
        z = m.zone
        held = []
        while (pfn := await alloc(m, 0)) >= 0:
            held.append(pfn)
        # keep the lowest held pfn of every 2 MiB block, free the rest
        keep = {}
        for pfn in sorted(held):
            keep.setdefault(pfn >> HPAGE_PMD_ORDER, pfn)
        for pfn in held:
            if keep[pfn >> HPAGE_PMD_ORDER] != pfn:
                await free(m, pfn)
        nblocks = 16 * MiB // (2 * MiB)
        assert len(keep) == nblocks
        # block 0 holds the zero page (pfn 0) and pfn 1: orders 1..8 free; every other
        # block holds its first page: orders 0..8 free; nothing of order 9 or 10
        assert z.buddyinfo() == [nblocks - 1] + [nblocks] * 8 + [0, 0]
        assert z.nr_free == nblocks * HPAGE_PMD_NR - nblocks - 1
        assert z.nr_free > z.wmark["high"]  # fragmented, not exhausted
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 2 * MiB, value=5)
        ev = m.vmstat.events
        assert ev["thp_fault_fallback"] == 1 and ev["thp_fault_alloc"] == 0
        assert ev["compact_stall"] > 0 and ev["compact_success"] == 0
        t = memory.pmd_lookup(m, p.task.mm, a)
        assert not pmd_trans_huge(m.physmem.tables[t][pmd_index(a)])
        assert p.task.mm.rss_anon == HPAGE_PMD_NR and p.task.mm.nr_ptes == 1
        assert smaps_range(m, p.task.mm, a, a + 2 * MiB) == (2048, 0)
        assert await p.verify() == []
        await p.exit()
        for pfn in keep.values():
            await free(m, pfn)
        # everything merged back: 16 MiB is four order-10 blocks, minus the zero page
        assert z.buddyinfo() == [1] * 10 + [3]
    run(fn, memory=16 * MiB)


def test_thp_fault_with_free_order9_block_succeeds_on_a_small_machine():
    """The same 16 MiB machine without fragmentation: the fault gets its THP."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 2 * MiB, value=5)
        assert m.vmstat.events["thp_fault_alloc"] == 1
        assert m.vmstat.events["thp_fault_fallback"] == 0
    run(fn, memory=16 * MiB)


# ------------------------------------------------------- sparse physmem
def test_one_tib_machine_costs_the_host_what_a_one_gib_one_does():
    """design.md section 6: host memory is independent of emulated RAM. After the same
    workload a 1 TiB and a 1 GiB machine hold the same struct pages, frame contents and
    page tables (physmem creates each lazily; never-used blocks are not on any list)."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(8 * MiB)
        await p.madvise(a, 4 * MiB, "hugepage")
        await p.touch(a, 8 * MiB, value=3)
        await p.madvise(a + MiB, 4096, "dontneed")
        c = await p.fork("child")
        await c.touch(a, 8 * MiB, value=4, stride=64 * 1024)
        await c.exit()
        return {"zone_lists": sum(len(x) for x in m.zone.free_area)}

    small, r1 = run(fn, memory=GiB)
    big, r2 = run(fn, memory=1 << 40)
    assert big.physmem.nr_pages == (1 << 40) // 4096
    for name in ("pages", "data", "tables"):
        a, b = getattr(small.physmem, name), getattr(big.physmem, name)
        assert len(a) == len(b) and set(a) == set(b), name
    assert r1 == r2  # the free lists hold as many blocks
    assert len(big.physmem.pages) < 4096
    assert big.zone.nr_free - small.zone.nr_free == ((1 << 40) - GiB) // 4096




# ------------------------------------------------------------------ gfp masks
def test_gfp_masks_compose_as_in_gfp_types_h():
    """The masks carry the kernel's bit values: GFP_HIGHUSER_MOVABLE is 0x100cca, as
    the kernel's OOM reports print it ("gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|
    __GFP_COMP)"). GFP_TRANSHUGE_LIGHT adds __GFP_COMP | __GFP_NOMEMALLOC |
    __GFP_NOWARN and drops both reclaim bits but keeps __GFP_IO (so it may compact once
    a defrag mode adds __GFP_DIRECT_RECLAIM); GFP_TRANSHUGE adds direct reclaim only,
    not kswapd."""
    from kmm import gfp as pa
    assert pa.GFP_HIGHUSER_MOVABLE == 0x100cca
    assert pa.format_gfp(pa.GFP_HIGHUSER_MOVABLE | pa.__GFP_COMP) == \
        "GFP_HIGHUSER_MOVABLE|__GFP_COMP"
    assert pa.GFP_HIGHUSER_MOVABLE | pa.__GFP_COMP == 0x140cca
    assert pa.GFP_TRANSHUGE_LIGHT == 0x1c20ca and pa.GFP_TRANSHUGE == 0x1c24ca
    assert pa.gfp_compaction_allowed(pa.GFP_TRANSHUGE_LIGHT)
    assert pa.format_gfp(pa.GFP_TRANSHUGE | pa.__GFP_THISNODE | pa.__GFP_NORETRY) == \
        "GFP_TRANSHUGE|__GFP_NORETRY|__GFP_THISNODE"
    assert pa.format_gfp(pa.GFP_PGTABLE_USER) == "GFP_PGTABLE_USER"
    assert pa.gfp_mask("GFP_KERNEL") == pa.GFP_KERNEL == 0xcc0


@pytest.mark.parametrize("defrag, madvised, mask", [
    ("always", True, "GFP_TRANSHUGE"),
    ("always", False, "GFP_TRANSHUGE|__GFP_NORETRY"),
    ("defer", True, "GFP_TRANSHUGE_LIGHT|__GFP_KSWAPD_RECLAIM"),
    ("defer", False, "GFP_TRANSHUGE_LIGHT|__GFP_KSWAPD_RECLAIM"),
    ("defer+madvise", True, "GFP_TRANSHUGE"),
    ("defer+madvise", False, "GFP_TRANSHUGE_LIGHT|__GFP_KSWAPD_RECLAIM"),
    ("madvise", True, "GFP_TRANSHUGE"),
    ("madvise", False, "GFP_TRANSHUGE_LIGHT"),
    ("never", True, "GFP_TRANSHUGE_LIGHT"),
    ("never", False, "GFP_TRANSHUGE_LIGHT"),
])
def test_vma_thp_gfp_mask_per_defrag_mode(defrag, madvised, mask):
    """huge_memory.c vma_thp_gfp_mask: which reclaim a THP fault may do, per mode and
    VM_HUGEPAGE, printed as show_gfp_flags prints masks."""
    from kmm import gfp
    from kmm.huge_memory import vma_thp_gfp_mask
    from kmm.mm_types import VM_HUGEPAGE
    m = Machine(MachineConfig(memory=16 * MiB, cpus=1))
    m.sysfs.write("defrag", defrag)
    vma = type("Vma", (), {"flags": VM_HUGEPAGE if madvised else 0})()
    assert gfp.format_gfp(vma_thp_gfp_mask(m, vma)) == mask


def test_memalloc_may_use_the_reserves():
    """__GFP_MEMALLOC (__gfp_pfmemalloc_flags: ALLOC_NO_WATERMARKS) goes below the min
    watermark, down to the last free page; an ordinary allocation stops at min."""
    async def fn(m, k):
        held = []
        while (pfn := await alloc(m, 0)) >= 0:
            held.append(pfn)
        assert m.zone.nr_free == m.zone.wmark["min"]
        from kmm import gfp
        memalloc = gfp.__GFP_MEMALLOC
        while (pfn := await page_alloc.alloc_pages(m, 0, memalloc, "t")) >= 0:
            held.append(pfn)
        assert m.zone.nr_free == 0
        for pfn in held:
            await free(m, pfn)
    run(fn, memory=16 * MiB)
