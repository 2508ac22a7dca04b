"""Anonymous PMD THPs, struct page by struct page: fault, partial unmap, PMD split, fork,
COW, the huge zero PMD and teardown (mm/huge_memory.c, mm/rmap.c, mm/memory.c).

Every expected value comes from the kernel's documented behaviour (kernel-thp.md sections
4 to 6, kernel-thp-reference.md 2.4, 2.5, 3, 4.2 and 4.4) or from arithmetic on HPAGE_PMD_NR;
the invariant checker runs after every operation and at the end of every driver.
"""

from __future__ import annotations

from conftest import run


import pytest

from kmm import atomic, huge_memory, memory
from kmm.mm_types import PG_anon_exclusive, PG_partially_mapped
from kmm.pgtable import (
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX, _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW,
    _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, _PAGE_USER, HPAGE_PMD_NR, PAGE_SIZE,
    pmd_index, pmd_pfn, pmd_trans_huge, pmd_write, pmd_young, pte_index, table_pfn,
)
from kmm.task_mmu import smaps_range
from kmm.testing import check_invariants

MiB = 1 << 20
NR = HPAGE_PMD_NR  # 512 subpages per PMD THP



def pmd_at(m, mm, addr):
    """(PMD table pfn, PMD entry) mapping addr."""
    t = memory.pmd_lookup(m, mm, addr)
    assert t >= 0, f"no PMD table for {addr:#x}"
    return t, m.physmem.tables[t][pmd_index(addr)]


def deposits(m, pmd_tbl):
    return list(m.physmem.pages[pmd_tbl].pt_deposit or ())


def ev(m, name):
    return m.vmstat.events[name]


async def thp_region(k, name="main", size=2 * MiB, value=1):
    """A process with a MADV_HUGEPAGE region written once per 4 KiB (THP faults)."""
    p = await k.process(name)
    a = await p.mmap(size)
    assert await p.madvise(a, size, "hugepage") == 0
    await p.touch(a, size, value=value)
    return p, a


# --------------------------------------------------------------------- fault
def test_thp_write_fault_struct_pages():
    """do_huge_pmd_anonymous_page -> __do_huge_pmd_anonymous_page (reference 2.4): one
    order-9 folio mapped by one writable dirty PMD; folio_add_new_anon_rmap(RMAP_EXCLUSIVE)
    gives entire_mapcount 1 and PageAnonExclusive; the PMD mapping owns the single
    reference; pgtable_trans_huge_deposit parks one PTE table, counted in nr_ptes;
    MM_ANONPAGES += HPAGE_PMD_NR; thp_fault_alloc 1."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 1, value=7)  # one write fault
        mm = p.task.mm
        t, pmd = pmd_at(m, mm, a)
        assert pmd_trans_huge(pmd) and pmd_write(pmd) and pmd & _PAGE_DIRTY
        folio = m.physmem.page(pmd_pfn(pmd))
        assert folio.order == 9 and folio.pfn % NR == 0
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount,
                folio.nr_pages_mapped, folio.mapcount) == (1, 1, 1, 0, 0)
        assert folio.flags & PG_anon_exclusive
        assert folio.anon_vma is mm.vmas[0].anon_vma
        dep = deposits(m, t)
        assert len(dep) == 1 and not any(m.physmem.tables[dep[0]])
        assert m.physmem.pages[dep[0]].page_type == "table"
        assert mm.nr_ptes == 1 and mm.rss_anon == NR
        # pgd + pud + pmd tables + the deposited one
        assert mm.pgtables_bytes == 4 * PAGE_SIZE
        assert ev(m, "thp_fault_alloc") == 1 and ev(m, "thp_fault_fallback") == 0
        assert m.vmstat.node["nr_anon_transparent_hugepages"] == 1
        assert m.vmstat.node["nr_anon_pages"] == NR
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 2048)
        # the other 511 pages are written through the same PMD: no more faults
        faults = ev(m, "pgfault")
        await p.touch(a + PAGE_SIZE, 2 * MiB - PAGE_SIZE, value=7)
        assert ev(m, "pgfault") == faults and ev(m, "thp_fault_alloc") == 1
        assert await p.verify() == []
    run(fn)


def test_new_thp_is_queued_for_the_underused_shrinker_only_with_shrink_underused():
    """6.12+: map_anon_folio_pmd calls deferred_split_folio(folio, false), which queues a
    new THP (unflagged, not counted) only when shrink_underused is on (reference 2.4)."""
    def queued(knob):
        async def fn(m, k):
            p, a = await thp_region(k)
            folio = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
            assert not folio.flags & PG_partially_mapped
            assert ev(m, "thp_deferred_split_page") == 0
            return folio.on_deferred_list, list(m.deferred_split_queue) == [folio.pfn]
        return run(fn, knobs={"shrink_underused": knob})
    assert queued(1) == (True, True)
    assert queued(0) == (False, False)


# -------------------------------------------------------- partial DONTNEED
def test_partial_dontneed_leaves_a_partially_mapped_pte_mapped_thp():
    """MADV_DONTNEED of one 4 KiB page of a THP (reference 4.4): zap_pmd_range splits the
    PMD (thp_split_pmd 1; the deposited table becomes the live PTE table), zap_pte_range
    unmaps one page, __folio_remove_rmap sees a partially mapped folio and
    deferred_split_folio(folio, true) flags and counts it (thp_deferred_split_page 1).
    The folio stays order 9 with 511 PTE mappings, each owning one reference."""
    async def fn(m, k):
        p, a = await thp_region(k)
        mm = p.task.mm
        t, pmd = pmd_at(m, mm, a)
        folio = m.physmem.page(pmd_pfn(pmd))
        (dep,) = deposits(m, t)
        victim = a + 5 * PAGE_SIZE
        assert await p.madvise(victim, PAGE_SIZE, "dontneed") == 0
        _, pmd = pmd_at(m, mm, a)
        assert not pmd_trans_huge(pmd) and table_pfn(pmd) == dep  # withdrawn, populated
        assert deposits(m, t) == []
        assert folio.order == 9
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount,
                folio.nr_pages_mapped) == (NR - 1, 0, NR - 1, NR - 1)
        pte = m.physmem.tables[dep]
        assert pte[pte_index(victim)] == 0
        assert sum(1 for e in pte if e) == NR - 1
        assert m.physmem.page(folio.pfn + 5).mapcount == 0
        assert all(m.physmem.page(folio.pfn + i).mapcount == 1 for i in range(NR) if i != 5)
        assert folio.on_deferred_list and folio.flags & PG_partially_mapped
        assert folio.pfn in m.deferred_split_queue
        assert ev(m, "thp_split_pmd") == 1 and ev(m, "thp_deferred_split_page") == 1
        assert mm.nr_ptes == 1 and mm.rss_anon == NR - 1
        assert m.vmstat.node["nr_anon_pages"] == NR - 1  # NR_ANON_MAPPED
        assert m.vmstat.node["nr_anon_transparent_hugepages"] == 0
        # Rss 2044 kB, AnonHugePages 0 (a PTE-mapped THP is not AnonHugePages)
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048 - 4, 0)
        # no memory comes back until the folio itself is split: nothing was freed
        assert ev(m, "pgfree") == 0
        # a second partial unmap of the same folio is not counted again (flag already set)
        assert await p.madvise(victim + PAGE_SIZE, PAGE_SIZE, "dontneed") == 0
        assert ev(m, "thp_deferred_split_page") == 1 and ev(m, "thp_split_pmd") == 1
        assert folio.refcount == NR - 2
        assert await p.touch(victim, 2 * PAGE_SIZE, write=False, value=0) == 0
    run(fn)


def test_dontneed_of_a_whole_pmd_frees_the_thp_and_its_deposit():
    """A whole aligned 2 MiB MADV_DONTNEED goes to zap_huge_pmd (reference 3, 4.4): no
    split, the deposited table is freed (zap_deposited_table, nr_ptes--), the folio's
    last reference drops after the TLB flush and all 512 pages go back to the buddy."""
    async def fn(m, k):
        p, a = await thp_region(k, size=4 * MiB)
        mm = p.task.mm
        free0 = m.zone.nr_free
        assert await p.madvise(a, 2 * MiB, "dontneed") == 0
        assert ev(m, "thp_split_pmd") == 0
        _, pmd = pmd_at(m, mm, a)
        assert pmd == 0
        # the THP (512 pages) and its deposited table (1 page) were freed
        assert m.zone.nr_free == free0 + NR + 1
        assert mm.nr_ptes == 1 and mm.rss_anon == NR
        assert smaps_range(m, mm, a, a + 4 * MiB) == (2048, 2048)
    run(fn)


# ------------------------------------------------------------------ split
FLAGS = [(w, d, y) for w in (False, True) for d in (False, True) for y in (False, True)]


@pytest.mark.parametrize("write, dirty, young", FLAGS,
                         ids=[f"{'w' if w else 'ro'}-{'d' if d else 'c'}-{'y' if y else 'o'}"
                              for w, d, y in FLAGS])
def test_split_huge_pmd_carries_write_dirty_young_into_ptes(write, dirty, young):
    """__split_huge_pmd_locked (reference 4.2, steps 4 to 9): the 512 PTEs map the
    consecutive subpages with the PMD's write, dirty and young bits (old PTEs when the PMD
    was old; "carry over dirty bit when thp splits on pmd"); the folio stays order 9 with
    refcount 512 (folio_ref_add 511), 512 PTE mappings, no PMD mapping and every subpage
    PageAnonExclusive; the withdrawn deposit becomes the PTE table; thp_split_pmd 1."""
    async def fn(m, k):
        p, a = await thp_region(k)
        mm = p.task.mm
        vma = mm.vmas[0]
        t, pmd = pmd_at(m, mm, a)
        pfn = pmd_pfn(pmd)
        (dep,) = deposits(m, t)
        # the PMD as the hardware and the kernel may leave it (x86 bits, PAGE_COPY prot)
        want_pmd = ((pfn << 12) | _PAGE_PRESENT | _PAGE_USER | _PAGE_NX | _PAGE_PSE
                    | (_PAGE_RW if write else 0) | (_PAGE_ACCESSED if young else 0)
                    | (_PAGE_DIRTY | _PAGE_SOFT_DIRTY if dirty else 0))
        await atomic.entry_set(m, "pmd", t, pmd_index(a), want_pmd)
        await mm.mmap_lock.down_read("test")
        await huge_memory.split_huge_pmd_address(m, vma, a + 3 * PAGE_SIZE, False)
        await mm.mmap_lock.up_read()
        check_invariants(m, k)
        _, new = pmd_at(m, mm, a)
        assert table_pfn(new) == dep and not pmd_trans_huge(new)
        pte = m.physmem.tables[dep]
        for i in range(NR):
            want = (((pfn + i) << 12) | _PAGE_PRESENT | _PAGE_USER | _PAGE_NX
                    | (_PAGE_RW if write else 0) | (_PAGE_ACCESSED if young else 0)
                    | (_PAGE_DIRTY | _PAGE_SOFT_DIRTY if dirty else 0))
            assert pte[i] == want, f"PTE {i}: {pte[i]:#x} != {want:#x}"
        folio = m.physmem.page(pfn)
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount,
                folio.nr_pages_mapped) == (NR, 0, NR, NR)
        assert all(m.physmem.page(pfn + i).flags & PG_anon_exclusive for i in range(NR))
        assert not folio.flags & PG_partially_mapped
        assert ev(m, "thp_split_pmd") == 1 and ev(m, "thp_deferred_split_page") == 0
        assert mm.nr_ptes == 1 and mm.rss_anon == NR and deposits(m, t) == []
        assert m.vmstat.node["nr_anon_transparent_hugepages"] == 0
        assert m.vmstat.node["nr_anon_pages"] == NR  # every page is still mapped
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 0)
        # the data is the same through the PTEs
        assert await p.verify() == []
    run(fn)


def test_split_huge_pmd_rechecks_under_the_pmd_lock():
    """split_huge_pmd_locked re-checks under the PMD lock that the PMD is still huge ("some
    one else already split it"): a second split of the same PMD changes nothing and is
    not counted again (reference 4.1)."""
    async def fn(m, k):
        p, a = await thp_region(k)
        mm = p.task.mm
        vma = mm.vmas[0]
        t, _ = pmd_at(m, mm, a)
        await mm.mmap_lock.down_read("test")
        await huge_memory.__split_huge_pmd(m, vma, t, pmd_index(a), a, freeze=False)
        before = list(m.physmem.tables[t])
        await huge_memory.__split_huge_pmd(m, vma, t, pmd_index(a), a, freeze=False)
        await mm.mmap_lock.up_read()
        assert m.physmem.tables[t] == before
        assert ev(m, "thp_split_pmd") == 1
    run(fn)


# ------------------------------------------------------------------- fork
async def forked(m, k):
    p, a = await thp_region(k)
    c = await p.fork("child")
    return p, c, a


def test_fork_shares_the_thp_write_protected_with_one_deposit_each():
    """copy_huge_pmd (reference 3): the child's PMD maps the same folio (folio_ref_add 1,
    folio_try_dup_anon_rmap_pmd: entire_mapcount 2, PageAnonExclusive cleared), both PMDs
    are write-protected (pmdp_set_wrprotect; the child's copy also old), and the child
    gets a freshly allocated table deposited under its own PMD table (nr_ptes 1 each)."""
    async def fn(m, k):
        p, c, a = await forked(m, k)
        pt, ppmd = pmd_at(m, p.task.mm, a)
        ct, cpmd = pmd_at(m, c.task.mm, a)
        assert pt != ct
        assert pmd_trans_huge(ppmd) and pmd_trans_huge(cpmd)
        assert pmd_pfn(ppmd) == pmd_pfn(cpmd)
        assert not pmd_write(ppmd) and not pmd_write(cpmd)
        assert pmd_young(ppmd) and not pmd_young(cpmd)
        folio = m.physmem.page(pmd_pfn(ppmd))
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount) == (2, 2, 2)
        assert not folio.flags & PG_anon_exclusive
        (pdep,), (cdep,) = deposits(m, pt), deposits(m, ct)
        assert pdep != cdep
        assert p.task.mm.nr_ptes == 1 and c.task.mm.nr_ptes == 1
        assert c.task.mm.rss_anon == NR
        assert ev(m, "thp_split_pmd") == 0 and ev(m, "thp_fault_alloc") == 1
        assert await c.verify() == []
    run(fn)


def test_child_write_splits_only_the_child_pmd_then_parent_reuses_after_child_exit():
    """5.8+ COW of a shared THP (reference 2.5): the child's write finds the folio shared
    (refcount 2), so do_huge_pmd_wp_page splits only the child's PMD (thp_split_pmd 1)
    and do_wp_page copies one 4 KiB page; the parent's PMD still maps the THP. Once the
    child exits the parent's write finds refcount 1 and reuses the THP in place: same
    pfn, writable PMD, no new THP, no split, no page allocated."""
    async def fn(m, k):
        p, c, a = await forked(m, k)
        pt, ppmd = pmd_at(m, p.task.mm, a)
        head = pmd_pfn(ppmd)
        folio = m.physmem.page(head)
        await c.touch(a + 3 * PAGE_SIZE, 1, value=2)
        assert ev(m, "thp_split_pmd") == 1
        ct, cpmd = pmd_at(m, c.task.mm, a)
        assert not pmd_trans_huge(cpmd)
        cpte = m.physmem.tables[table_pfn(cpmd)]
        copied = (cpte[3] >> 12) & ((1 << 40) - 1)
        assert not head <= copied < head + NR  # a new 4 KiB page
        assert m.physmem.page(copied).order == 0
        assert all((cpte[i] >> 12) & ((1 << 40) - 1) == head + i for i in range(NR) if i != 3)
        # the split carried the child's PMD bits: copy_huge_pmd left it old and
        # write-protected, and dirty from the parent's writes
        assert all(not cpte[i] & (_PAGE_ACCESSED | _PAGE_RW) and cpte[i] & _PAGE_DIRTY
                   for i in range(NR) if i != 3)
        assert cpte[3] & _PAGE_RW and cpte[3] & _PAGE_DIRTY  # wp_page_copy's new page
        assert pmd_at(m, p.task.mm, a)[1] == ppmd  # the parent's PMD is untouched
        # parent PMD (1) + child's 511 PTEs
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount) == (1 + NR - 1, 1, NR)
        assert await p.verify() == [] and await c.verify() == []
        await c.exit()
        assert (folio.refcount, folio.entire_mapcount, folio.large_mapcount) == (1, 1, 1)
        allocs = ev(m, "pgalloc_normal")
        await p.touch(a, 2 * MiB, value=3)
        _, ppmd2 = pmd_at(m, p.task.mm, a)
        assert pmd_trans_huge(ppmd2) and pmd_write(ppmd2) and pmd_pfn(ppmd2) == head
        assert folio.flags & PG_anon_exclusive
        assert ev(m, "thp_split_pmd") == 1 and ev(m, "thp_fault_alloc") == 1
        assert ev(m, "pgalloc_normal") == allocs
        assert await p.verify() == []
    run(fn)


def test_parent_write_while_child_still_maps_the_thp_splits_the_parent_pmd():
    """do_huge_pmd_wp_page: the folio is not exclusive and its refcount is above 1, so the
    parent's write falls back too: __split_huge_pmd + do_wp_page copying 4 KiB. The
    child's PMD keeps mapping the THP with the old bytes (fork_parent_writes)."""
    async def fn(m, k):
        p, c, a = await forked(m, k)
        head = pmd_pfn(pmd_at(m, p.task.mm, a)[1])
        await p.touch(a + MiB, 1, value=9)
        assert ev(m, "thp_split_pmd") == 1
        assert not pmd_trans_huge(pmd_at(m, p.task.mm, a)[1])
        _, cpmd = pmd_at(m, c.task.mm, a)
        assert pmd_trans_huge(cpmd) and pmd_pfn(cpmd) == head
        assert await c.touch(a + MiB, 1, write=False, value=1) == 0
        assert await p.verify() == [] and await c.verify() == []
    run(fn)


# -------------------------------------------------------------- huge zero
def test_write_to_huge_zero_pmd_allocates_a_thp_keeping_the_deposit():
    """A read fault maps the huge zero folio (set_huge_zero_folio: special, read-only,
    one deposited table, nr_ptes 1, no rmap and no Rss; thp_zero_page_alloc 1). A write
    then goes to do_huge_zero_wp_pmd (6.13+, reference 2.5): a new THP replaces the
    zero PMD (thp_fault_alloc 1, no split) and the table deposited for the zero PMD
    stays deposited."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        assert await p.touch(a, 2 * MiB, write=False, value=0) == 0
        mm = p.task.mm
        t, zpmd = pmd_at(m, mm, a)
        assert pmd_trans_huge(zpmd) and zpmd & _PAGE_SPECIAL and not pmd_write(zpmd)
        assert pmd_pfn(zpmd) == m.huge_zero_pfn
        (dep,) = deposits(m, t)
        assert mm.nr_ptes == 1 and mm.rss_anon == 0
        assert smaps_range(m, mm, a, a + 2 * MiB) == (0, 0)
        assert ev(m, "thp_zero_page_alloc") == 1 and ev(m, "thp_fault_alloc") == 0
        await p.touch(a + 7 * PAGE_SIZE, 1, value=4)
        _, pmd = pmd_at(m, mm, a)
        assert pmd_trans_huge(pmd) and pmd_write(pmd) and not pmd & _PAGE_SPECIAL
        assert pmd_pfn(pmd) != m.huge_zero_pfn
        assert deposits(m, t) == [dep]
        assert ev(m, "thp_fault_alloc") == 1 and ev(m, "thp_split_pmd") == 0
        assert mm.nr_ptes == 1 and mm.rss_anon == NR
        folio = m.physmem.page(pmd_pfn(pmd))
        assert (folio.refcount, folio.entire_mapcount) == (1, 1)
        assert smaps_range(m, mm, a, a + 2 * MiB) == (2048, 2048)
        assert await p.touch(a, 2 * MiB, write=False, value=0) == 1
        assert await p.verify() == []
    run(fn)


# ------------------------------------------------------------------ exit
def test_exit_frees_every_page_and_the_huge_zero_folio_stays():
    """exit_mmap: zap every mapping (zap_huge_pmd frees each deposit), free every page
    table, drop the mm's huge zero reference. After every process exited, the buddy
    allocator holds exactly what it held at boot but for the huge zero folio, which
    nothing frees without the shrinker (huge_zero_refcount keeps its global reference)."""
    async def fn(m, k):
        boot = m.zone.nr_free
        p, a = await thp_region(k, size=6 * MiB)
        b = await p.mmap(4 * MiB)
        await p.madvise(b, 4 * MiB, "nohugepage")
        await p.touch(b, 4 * MiB, value=3)
        z = await p.mmap(2 * MiB)
        await p.madvise(z, 2 * MiB, "hugepage")
        await p.touch(z, 2 * MiB, write=False, value=0)       # huge zero PMD
        await p.madvise(a + PAGE_SIZE, PAGE_SIZE, "dontneed")  # a PTE-mapped THP
        await p.munmap(a + 2 * MiB + 5 * PAGE_SIZE, 3 * PAGE_SIZE)
        c = await p.fork("child")
        await c.touch(a, 6 * MiB, value=8, stride=64 * 1024)  # COW splits in the child
        g = await c.fork("grandchild")
        await g.touch(b, MiB, value=6)
        assert m.huge_zero_pfn >= 0 and m.huge_zero_refcount == 1 + 3
        for proc in (c, p, g):  # not in fork order: the last exit frees what is shared
            await proc.exit()
            check_invariants(m, k)
        assert m.huge_zero_refcount == 1          # only the global reference is left
        assert not m.zone.is_free(m.huge_zero_pfn)
        assert m.zone.nr_free == boot - NR        # everything else came back
        assert not m.deferred_split_queue
        assert m.zone.check() == []
        assert m.vmstat.node == {"nr_anon_pages": 0, "nr_anon_transparent_hugepages": 0,
                                 "nr_page_table_pages": 0}
    run(fn)


def test_exit_without_huge_zero_returns_to_the_boot_free_count():
    """With no read fault on a THP-eligible PMD the huge zero folio is never allocated,
    so after exit nr_free equals the boot count exactly: no page, table or deposit leaks."""
    async def fn(m, k):
        boot = m.zone.nr_free
        p, a = await thp_region(k, size=4 * MiB)
        await p.madvise(a + 3 * MiB, MiB, "dontneed")
        c = await p.fork("child")
        await c.touch(a, 4 * MiB, value=5, stride=256 * 1024)
        await p.exit()
        await c.exit()
        assert m.huge_zero_pfn == -1
        assert m.zone.nr_free == boot
        assert ev(m, "pgalloc_normal") == ev(m, "pgfree")
    run(fn)


