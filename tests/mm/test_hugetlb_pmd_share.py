"""hugetlb PMD table sharing (mm/hugetlb.c huge_pmd_share / huge_pmd_unshare,
kmm.hugetlb_pmd_share) and mremap of hugetlb mappings (kmm.hugetlb_mremap).

What the host shows of sharing (Shared_Hugetlb of a child that touched one page of its
parent's populated 1 GiB; unsharing on MADV_DONTNEED, mprotect, VMA split, exit) is
pinned by workloads/hugetlb_pmd_*.toml; these tests pin the mechanism behind it: the
share count, the page-table accounting, the checker's invariants, and the mremap
figures recorded on the host by tests/mm/hugetlb_mremap_probe.py."""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm import checks_hugetlb
from kmm.machine import KernelBug
from kmm.memory import pmd_lookup
from kmm.pgtable import PAGE_SIZE, pmd_pfn
from kmm.testing import invariant_errors, run_machine
from kmm.uapi import KmmError

MiB = 1 << 20
GiB = 1 << 30
BASE = 0x2000_0000_0000  # PUD-aligned
HERE = pathlib.Path(__file__).resolve().parent


async def shared_pair(k, touch_child=True):
    """A parent and a child mapping one PUD-aligned 1 GiB MAP_SHARED|MAP_HUGETLB range
    (MAP_NORESERVE, pool of 4); the parent wrote page 0, the child read it."""
    await k.set_hugetlb_pool(4)
    p = await k.process("main")
    a = await p.mmap(GiB, addr=BASE, backing="hugetlb_shared", noreserve=True)
    await p.store(a, b"\x5a")
    c = await p.fork("child")
    if touch_child:
        assert await c.load(a) == b"\x5a"
    return p, c, a


def test_child_fault_shares_the_parents_pmd_table_and_accounts_it_once():
    """huge_pmd_share: the child's PUD entry points at the parent's PMD table,
    pt_share_count 1; the child's page-table bytes (VmPTE, mm_inc_nr_pmds) count it,
    the node's NR_PAGETABLE (meminfo PageTables) does not count it again."""
    async def fn(m, k):
        p, c, a = await shared_pair(k, touch_child=False)
        pt0 = k.meminfo()["PageTables"]
        cb0 = c.status()["VmPTE"]
        await c.load(a)
        t = pmd_lookup(m, p.task.mm, a)
        return (t == pmd_lookup(m, c.task.mm, a), m.physmem.page(t).pt_share_count,
                c.status()["VmPTE"] - cb0, k.meminfo()["PageTables"] - pt0)
    _, got = run_machine(fn)
    # the child allocated a PUD table and shares the PMD table: two pages (8 kB) of
    # VmPTE, one new page-table page (4 kB) on the node
    assert got == (True, 1, 8, 4)


def test_dontneed_unshares_only_the_callers_pud_entry():
    """__unmap_hugepage_range: huge_pmd_unshare clears the child's PUD entry (its
    VmPTE drops a page), the share count drops to 0, the parent keeps the table and
    the folio its one mapping."""
    async def fn(m, k):
        p, c, a = await shared_pair(k)
        t = pmd_lookup(m, p.task.mm, a)
        cb0 = c.task.mm.pgtables_bytes
        await c.madvise(a + 2 * MiB, 2 * MiB, "dontneed")
        folio = m.physmem.folio(pmd_pfn(m.physmem.tables[t][0]))
        return (pmd_lookup(m, c.task.mm, a), m.physmem.page(t).pt_share_count,
                cb0 - c.task.mm.pgtables_bytes, folio.entire_mapcount,
                await c.load(a))
    _, got = run_machine(fn)
    assert got == (-1, 0, PAGE_SIZE, 1, b"\x5a")


def test_checker_catches_a_wrong_share_count():
    """The checker's PMD-sharing invariant: pt_share_count is the number of PUD
    entries mapping the table less one (fails without the invariant)."""
    async def fn(m, k):
        p, c, a = await shared_pair(k)
        t = pmd_lookup(m, p.task.mm, a)
        clean = checks_hugetlb.shared_pmd_errors(m)
        pg = m.physmem.page(t)
        object.__setattr__(pg, "pt_share_count", 2)  # the corruption under test
        bad = invariant_errors(m, k)
        object.__setattr__(pg, "pt_share_count", 1)
        return clean, bad
    _, (clean, bad) = run_machine(fn, check=lambda m, k: None)
    assert clean == []
    assert any("pt_share_count 2 but 2 PUD entries map it" in e for e in bad), bad


def test_checker_catches_a_share_count_on_a_freed_table():
    """Never freed while shared: a share count on a page that is no live PMD table is
    reported (fails without the invariant)."""
    async def fn(m, k):
        p, c, a = await shared_pair(k)
        pg = m.physmem.page(p.task.mm.pgd)  # a live table, but a PGD: not a PMD table
        object.__setattr__(pg, "pt_share_count", 1)
        bad = invariant_errors(m, k)
        object.__setattr__(pg, "pt_share_count", 0)
        return bad
    _, bad = run_machine(fn, check=lambda m, k: None)
    assert any("no live PMD table (freed while shared)" in e for e in bad), bad


def test_freeing_a_shared_pmd_table_is_a_kernel_bug():
    """pte_free of a PMD table another mm still maps (its share count nonzero)."""
    async def fn(m, k):
        p, c, a = await shared_pair(k)
        t = pmd_lookup(m, p.task.mm, a)
        with pytest.raises(KernelBug, match="still shared by 1 more mm"):
            await m.pte_free(p.task.mm, t)
        return True
    run_machine(fn, check=lambda m, k: None)


def test_private_hugetlb_and_unaligned_shared_ranges_never_share():
    """want_pmd_share: only a shared VMA covering the whole PUD-aligned 1 GiB; a
    mapping one 2 MiB page short of it gets its own PMD table in the child."""
    async def fn(m, k):
        await k.set_hugetlb_pool(4)
        p = await k.process("main")
        a = await p.mmap(GiB - 2 * MiB, addr=BASE, backing="hugetlb_shared", noreserve=True)
        await p.store(a, b"\x01")
        c = await p.fork("child")
        await c.load(a)
        return pmd_lookup(m, p.task.mm, a) == pmd_lookup(m, c.task.mm, a)
    _, same = run_machine(fn)
    assert same is False


# ------------------------------------------------------------------------ mremap
PROBE = json.loads((HERE / "hugetlb_mremap.host.json").read_text())
CASES = {
    "move_private": (False, 4 * MiB, 0, 4 * MiB, 4 * MiB, BASE + GiB),
    "move_shared": (True, 4 * MiB, 0, 4 * MiB, 4 * MiB, BASE + GiB),
    "shrink_private": (False, 4 * MiB, 0, 4 * MiB, 2 * MiB, BASE + GiB),
    "move_second_page": (False, 4 * MiB, 2 * MiB, 2 * MiB, 2 * MiB, BASE + GiB),
    "new_addr_unaligned": (False, 4 * MiB, 0, 4 * MiB, 4 * MiB, BASE + GiB + 4096),
    "old_addr_unaligned": (False, 4 * MiB, 4096, 2 * MiB, 2 * MiB, BASE + GiB),
    "grow": (False, 4 * MiB, 0, 4 * MiB, 6 * MiB, BASE + GiB),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mremap_of_hugetlb_matches_the_host(name):
    """mremap of MAP_HUGETLB (mm/mremap.c's hugetlb checks, move_hugetlb_page_tables,
    clear_vma_resv_huge_pages): errno, bytes at the new place, HugePages_Free/Rsvd
    after the move and after unmapping, as the host probe recorded them."""
    shared, size, off, old_len, new_len, new = CASES[name]
    want = PROBE[name]

    def free_rsvd(k):
        mi = k.meminfo()
        return [mi["HugePages_Free"], mi["HugePages_Rsvd"]]

    async def fn(m, k):
        await k.set_hugetlb_pool(4)
        p = await k.process("main")
        a = await p.mmap(size, addr=BASE, backing="hugetlb_shared" if shared else "hugetlb")
        for i in range(0, size, 2 * MiB):
            await p.store(a + i, bytes([0x10 + i // (2 * MiB)]))
        try:
            await p.mremap(a + off, old_len, new_len, new)
            err = 0
        except KmmError as e:
            err = e.errno_name
        got = [] if err else [(await p.load(new + i))[0] for i in range(0, new_len, 2 * MiB)]
        after = free_rsvd(k)
        await p.munmap(a, size)
        if not err:
            await p.munmap(new, new_len)
        return err, got, after, free_rsvd(k)
    _, (err, got, after, end) = run_machine(fn)
    assert err == want["errno_name"]
    assert (got, after, end) == (want["read"], want["free_rsvd_after"], want["free_rsvd_end"])


# ------------------------------------------------------- page-table accounting (host)
SHARE_PROBE = json.loads((HERE / "hugetlb_pmd_share.host.json").read_text())["stages"]


def test_vmpte_and_pool_follow_the_host_through_share_and_unshare():
    """VmPTE (mm_pgtables_bytes: mm_inc_nr_pmds in huge_pmd_share, mm_dec_nr_pmds in
    huge_pmd_unshare) and HugePages_Free/Rsvd at each stage of the host probe
    tests/mm/hugetlb_pmd_share_probe.py: a parent populating a PUD-aligned shared 1 GiB
    gains a PUD and a PMD table; its child's first touch gains a PUD table and the
    shared PMD table; the child's MADV_DONTNEED of 2 MiB gives the PMD table back."""
    def host(a, b):
        return SHARE_PROBE[b]["VmPTE"] - SHARE_PROBE[a]["VmPTE"]

    def pool(k):
        mi = k.meminfo()
        return mi["HugePages_Free"], mi["HugePages_Rsvd"]

    async def fn(m, k):
        await k.set_hugetlb_pool(512)
        p = await k.process("main")
        a = await p.mmap(GiB, addr=BASE, backing="hugetlb_shared")
        kb = {"parent_mapped": (p.status()["VmPTE"], pool(k))}
        await p.touch(a, GiB, stride=2 * MiB, value=5)
        kb["parent_populated"] = (p.status()["VmPTE"], pool(k))
        c = await p.fork("child")
        kb["child_forked"] = (c.status()["VmPTE"], pool(k))
        await c.load(a)
        kb["child_touched"] = (c.status()["VmPTE"], pool(k))
        await c.madvise(a + 2 * MiB, 2 * MiB, "dontneed")
        kb["child_dontneed"] = (c.status()["VmPTE"], pool(k))
        return kb
    _, kb = run_machine(fn, memory=3 * GiB, check=lambda m, k: None)
    for a, b in (("parent_mapped", "parent_populated"), ("child_forked", "child_touched"),
                 ("child_touched", "child_dontneed")):
        assert kb[b][0] - kb[a][0] == host(a, b), (a, b)
    for stage, (_, got) in kb.items():
        assert got == (SHARE_PROBE[stage]["HugePages_Free"],
                       SHARE_PROBE[stage]["HugePages_Rsvd"]), stage


def test_partial_mprotect_splits_the_vma_and_unshares_first():
    """hugetlb_split (__split_vma): an mprotect of the first 2 MiB splits the child's
    VMA inside the shared PUD range, so its PMD table is unshared before the split;
    neither half covers the PUD, so the next fault gets a table of its own."""
    async def fn(m, k):
        p, c, a = await shared_pair(k)
        t = pmd_lookup(m, p.task.mm, a)
        await c.mprotect(a, 2 * MiB, "r")
        gone = (pmd_lookup(m, c.task.mm, a), m.physmem.page(t).pt_share_count)
        await c.load(a + 2 * MiB)
        return gone, pmd_lookup(m, c.task.mm, a) not in (-1, t)
    _, got = run_machine(fn)
    assert got == ((-1, 0), True)


def test_copy_hugetlb_page_range_copies_nothing_into_a_shared_table():
    """copy_hugetlb_page_range: when huge_pte_alloc gives the child a shared PMD table
    (a shared mapping: dup_mmap itself never copies one, it has no anon_vma), nothing
    is copied and no page gains a reference or a mapping."""
    from kmm import hugetlb_fault

    async def fn(m, k):
        p, c, a = await shared_pair(k, touch_child=False)
        src = p.task.mm.vma_lookup(a)
        dst = c.task.mm.vma_lookup(a)
        t = pmd_lookup(m, p.task.mm, a)
        folio = m.physmem.folio(pmd_pfn(m.physmem.tables[t][0]))
        before = (folio.refcount, folio.entire_mapcount)
        ok = await hugetlb_fault.copy_hugetlb_page_range(m, dst, src)
        return (ok, pmd_lookup(m, c.task.mm, a) == t, m.physmem.page(t).pt_share_count,
                (folio.refcount, folio.entire_mapcount) == before)
    _, got = run_machine(fn)
    assert got == (True, True, 1, True)


def test_a_hardware_walk_through_a_table_unshared_and_freed_under_it_walks_again(
        monkeypatch):
    """The hardware walk is one instruction: huge_pmd_unshare's tlb_remove_table_sync_one
    IPI is taken before or after it, so a CPU never reads a shared PMD table after
    another mm unshared it and the last sharer freed it. kmm's walk spans points, so a
    walk that had read its PUD entry when the child unshared and the parent's munmap
    freed the table walks again (found by kmm explore: race_hugetlb_pmd_share, pct,
    seed 5266 of 10,000: KeyError in fault._walk's PMD read)."""
    from kmm import atomic, fault
    from kmm.pgtable import table_pfn
    seen = {}

    async def fn(m, k):
        p, c, a = await shared_pair(k, touch_child=False)
        shared = pmd_lookup(m, p.task.mm, a)

        class Atomic:  # kmm.atomic as fault.py sees it, with one interleaving forced
            def __getattr__(self, name):
                return getattr(atomic, name)

            async def entry_read(self, m_, kind, table, idx):
                e = await atomic.entry_read(m_, kind, table, idx)
                if kind == "pud" and e and table_pfn(e) == shared and "fired" not in seen:
                    seen["fired"] = True  # the walk has the table: unshare, then free it
                    assert await c.madvise(a + 4 * MiB, 2 * MiB, "dontneed") == 0
                    assert await p.munmap(a, GiB) == 0
                    seen["freed"] = shared not in m.physmem.tables
                return e

        monkeypatch.setattr(fault, "atomic", Atomic())
        await c.store(a + 2 * MiB, b"\xc2")  # faults (shares the table), then walks
        monkeypatch.undo()
        seen["read"] = (await c.load(a), await c.load(a + 2 * MiB))

    run_machine(fn, mode="random")
    assert seen == {"fired": True, "freed": True, "read": (b"\x5a", b"\xc2")}
