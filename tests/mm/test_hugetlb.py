"""hugetlb (mm/hugetlb.c): the pool, reservations, faults, COW, zap, and how hugetlb
folios stay out of THP's and reclaim's way. Host behaviour is pinned by the recorded
workloads/hugetlb_*.toml (tests/test_conformance.py); these tests pin the mechanism
behind it: counts, events, locks and the states the host does not show."""

from __future__ import annotations

import pytest

from kmm import hugetlb
from kmm.fault import Sigbus
from kmm.mm_types import PG_lru, PGTY_hugetlb
from kmm.pgtable import pmd_index, pmd_pfn
from kmm.testing import run_machine, together
from kmm.uapi import KmmError
from kmm.tools.compare import fragment
from kmm.memory import pmd_lookup

MiB = 1 << 20


def NO_CHECK(m, k):
    """Set-up loops of many operations: the invariants are checked once, at the end."""


def pool(k):
    mi = k.meminfo()
    return (mi["HugePages_Total"], mi["HugePages_Free"], mi["HugePages_Rsvd"],
            mi["HugePages_Surp"])


def test_pool_grows_from_the_buddy_allocator_and_shrinks_back():
    # set_max_huge_pages: each page is an order-9 buddy allocation (htlb_buddy_alloc_
    # success); shrinking frees free pages straight back to the buddy allocator
    async def fn(m, k):
        free0 = m.zone.nr_free
        await k.set_hugetlb_pool(3)
        grown = (pool(k), k.meminfo()["Hugetlb"], free0 - m.zone.nr_free,
                 k.vmstat()["htlb_buddy_alloc_success"])
        await k.set_hugetlb_pool(1)
        return grown, pool(k), free0 - m.zone.nr_free
    _, (grown, shrunk, held) = run_machine(fn)
    assert grown == ((3, 3, 0, 0), 3 * 2048, 3 * 512, 3)
    assert shrunk == (1, 1, 0, 0)
    assert held == 512


def test_pool_growth_fails_on_a_fragmented_machine():
    # alloc_buddy_hugetlb_folio with __GFP_RETRY_MAYFAIL: compaction cannot move
    # unmovable pages, so with one pinned page in every 2 MiB block the pool cannot
    # grow at all, though most memory is free; the write still succeeds (fewer pages)
    async def fn(m, k):
        await fragment(k)  # one pinned page in every 2 MiB block
        free = m.zone.nr_free
        await k.set_hugetlb_pool(2)
        return pool(k), free, k.vmstat()["htlb_buddy_alloc_fail"]
    _, (counts, free, fail) = run_machine(fn, memory=32 * MiB, check=NO_CHECK)
    assert counts == (0, 0, 0, 0)
    assert free > 6_000  # most of the 32 MiB is free, just not in 2 MiB blocks
    assert fail == 1  # the first failure ends the pool growth


def test_gigantic_hstate_exists_but_is_not_allocated_at_runtime():
    # hstates for 2 MiB (default: Hugepagesize) and 1 GiB; alloc_contig_range is not
    # modelled, so writing the gigantic pool is refused
    async def fn(m, k):
        h = hugetlb.size_to_hstate(m, 1 << 30)
        r = await hugetlb.set_max_huge_pages(m, h, 1)
        return h.name, h.is_gigantic(), r, k.meminfo()["Hugepagesize"]
    _, got = run_machine(fn)
    assert got == ("hugepages-1048576kB", True, "EINVAL", 2048)


def test_shrinking_below_pages_in_use_leaves_surplus_until_freed():
    # set_max_huge_pages: pages in use above the new size become surplus and leave the
    # pool when freed (free_huge_folio sees surplus_huge_pages)
    async def fn(m, k):
        await k.set_hugetlb_pool(2)
        p = await k.process()
        a = await p.mmap(2 * MiB, backing="hugetlb")
        await p.touch(a, 2 * MiB)
        await k.set_hugetlb_pool(0)
        during = pool(k)
        await p.munmap(a, 2 * MiB)
        return during, pool(k)
    _, (during, after) = run_machine(fn)
    assert during == (1, 0, 0, 1)
    assert after == (0, 0, 0, 0)


def test_hugetlb_folio_is_a_pmd_leaf_off_the_lru_and_never_split():
    # a hugetlb page: PGTY_hugetlb, mapped by one PMD leaf (entire mapcount 1, no
    # deposited table), not on the LRU; debugfs split_huge_pages and reclaim skip it
    async def fn(m, k):
        await k.set_hugetlb_pool(1)
        p = await k.process()
        a = await p.mmap(2 * MiB, backing="hugetlb")
        await p.touch(a, 2 * MiB, value=3)
        t = pmd_lookup(m, p.task.mm, a)
        folio = m.physmem.page(pmd_pfn(m.physmem.tables[t][pmd_index(a)]))
        split = await p.split_huge_page(a, 2 * MiB)
        from kmm import vmscan_node
        await vmscan_node.memcg_reclaim(m)
        return (folio.page_type, folio.order, folio.entire_mapcount, bool(folio.flags & PG_lru),
                m.physmem.tables[t][pmd_index(a)] != 0, split,
                len(m.physmem.pages[t].pt_deposit or ()),
                await p.touch(a, 2 * MiB, write=False, value=3))
    _, got = run_machine(fn)
    assert got == (PGTY_hugetlb, 9, 1, False, True, 0, 0, 0)


def test_fault_takes_the_fault_mutex_then_the_vma_lock_then_the_pmd_lock():
    # rmap.c: hugetlb_fault_mutex -> vma_lock -> (page table lock); lockdep learns it
    async def fn(m, k):
        await k.set_hugetlb_pool(1)
        p = await k.process()
        a = await p.mmap(2 * MiB, backing="hugetlb")
        await p.touch(a, 4096)
        return m.locks.lockdep.graph()
    m, graph = run_machine(fn)
    edges = {(a, b) for a, b, _, _ in graph}
    assert ("hugetlb_fault_mutex", "hugetlb_vma_lock") in edges
    assert ("hugetlb_vma_lock", "ptlock_pmd") in edges
    assert ("hugetlb_fault_mutex", "hugetlb_lock") in edges
    classes = {row["class name"] for row in m.locks.lock_stat()}
    assert {"hugetlb_fault_mutex", "hugetlb_vma_lock", "hugetlb_lock"} <= classes


def test_two_cpus_fault_one_page_once():
    # the fault mutex serialises the two faults: one allocation, no spurious SIGBUS
    # even with exactly one reserved page (hugetlb_no_page's comment)
    async def fn(m, k):
        await k.set_hugetlb_pool(1)
        p = await k.process()
        a = await p.mmap(2 * MiB, backing="hugetlb")
        await together(m, cpu0=lambda: p.on(0).touch(a, 4096, value=1),
                       cpu1=lambda: p.on(1).touch(a + 4096, 4096, value=2))
        return pool(k), k.vmstat()["pgfault"]
    _, (counts, faults) = run_machine(fn, cpus=2, mode="random", seed=3)
    assert counts == (1, 0, 0, 0)


def test_sigbus_kills_the_process_and_releases_its_memory():
    # VM_FAULT_SIGBUS from hugetlb_no_page (no page, MAP_NORESERVE): the process dies,
    # its mapped page goes back to the pool
    async def fn(m, k):
        await k.set_hugetlb_pool(1)
        p = await k.process()
        a = await p.mmap(4 * MiB, backing="hugetlb", noreserve=True)
        try:
            await p.touch(a, 4 * MiB, stride=2 * MiB)
        except Sigbus as e:
            caught = e.signal
        return caught, p.task.alive, p.task.signal, pool(k)
    _, got = run_machine(fn)
    assert got == ("SIGBUS", False, "SIGBUS", (1, 1, 0, 0))


def test_private_reservation_restored_by_dontneed_and_returned_at_munmap():
    # __unmap_hugepage_range: the owner's freed page restores its reservation
    # (HPG_restore_reserve + the reserve map entry dropped); hugetlb_vm_op_close then
    # returns every unconsumed reservation of the range
    async def fn(m, k):
        await k.set_hugetlb_pool(2)
        p = await k.process()
        a = await p.mmap(4 * MiB, backing="hugetlb")
        seen = [pool(k)]
        await p.touch(a, 4 * MiB)
        seen.append(pool(k))
        await p.madvise(a, 2 * MiB, "dontneed")
        seen.append(pool(k))
        await p.munmap(a, 4 * MiB)
        seen.append(pool(k))
        return seen
    _, seen = run_machine(fn)
    assert seen == [(2, 2, 2, 0), (2, 0, 0, 0), (2, 1, 1, 0), (2, 2, 0, 0)]


def test_shared_mapping_pages_live_in_the_page_cache_until_the_last_unmap():
    # hugetlbfs: a shared page is in the file's page cache (one reference) and
    # survives MADV_DONTNEED; the inode's eviction at the last munmap frees it and
    # the remaining reservations (hugetlb_unreserve_pages)
    async def fn(m, k):
        await k.set_hugetlb_pool(2)
        p = await k.process()
        a = await p.mmap(4 * MiB, backing="hugetlb_shared")
        await p.touch(a, 2 * MiB, value=5)
        await p.madvise(a, 2 * MiB, "dontneed")
        kept = (pool(k), await p.touch(a, 2 * MiB, write=False, value=5))
        await p.munmap(a, 4 * MiB)
        return kept, pool(k)
    _, (kept, after) = run_machine(fn)
    assert kept == ((2, 1, 1, 0), 0)
    assert after == (2, 2, 0, 0)


def test_explore_finds_the_missing_fault_mutex_and_replays_it(tmp_path, capsys):
    # kmm.bugs hugetlb_fault_no_mutex: the explorer finds the spurious SIGBUS of two
    # faults on one page, writes the failure file, and replay reproduces it exactly
    import json
    import pathlib
    from kmm.tools import cli
    from kmm.tools import explore as ex
    prog = str(pathlib.Path(__file__).resolve().parents[2] / "workloads"
               / "race_hugetlb_fault.py")
    out = tmp_path / "f.jsonl"
    rc = cli.main(["explore", prog, "--schedules", "40", "--seed", "1", "--quiet",
                   "--inject", "hugetlb_fault_no_mutex", "--out", str(out),
                   "--minimize-budget", "40"])
    assert rc == 1
    head = json.loads(out.read_text().splitlines()[0])
    assert head["violation"]["kind"] == "assertion"
    assert "Sigbus" in head["violation"]["message"]
    capsys.readouterr()
    ok, _, again, _ = ex.replay(str(out))
    assert ok and again.kind == "assertion"


def test_pool_growth_compacts_before_it_fails():
    # alloc_buddy_hugetlb_folio's allocation is costly-order with __GFP_RETRY_MAYFAIL:
    # with one movable page in every 2 MiB block it stalls in direct compaction
    # (migrating pages, which keep their data) before the pool growth stops at the
    # first failure
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(10 * MiB)
        await p.touch(a, 10 * MiB)
        for off in range(0, 10 * MiB, 2 * MiB):  # keep one page per 2 MiB
            await p.madvise(a + off + 4096, 2 * MiB - 4096, "dontneed")
        ev0 = k.vmstat()
        await k.set_hugetlb_pool(16)
        ev = {n: v - ev0[n] for n, v in k.vmstat().items()}
        return (ev["compact_stall"] > 0, ev["pgmigrate_success"] > 0,
                ev["htlb_buddy_alloc_success"] == pool(k)[0], ev["htlb_buddy_alloc_fail"],
                await p.touch(a, 10 * MiB, write=False, stride=2 * MiB))
    _, got = run_machine(fn, memory=16 * MiB, check=NO_CHECK)
    assert got == (True, True, True, 1, 0)


@pytest.mark.parametrize("seed", [13, 50, 77])  # 50: a grandchild of unmap_ref_private
def test_random_hugetlb_operations_keep_every_invariant(seed):
    # A seeded fuzz over the hugetlb paths: private, shared and MAP_NORESERVE mappings,
    # writes and reads, DONTNEED, munmap and mprotect (aligned or not), fork and exit,
    # a small pool with overcommit; SIGBUS and SIGSEGV kill only their process. The
    # invariant checker (pool counts, mapcounts, refcounts, data) runs after every op.
    import random
    from kmm.fault import Segv

    async def fn(m, k):
        rng = random.Random(seed)
        await k.set_hugetlb_pool(3, 2)
        procs = [await k.process("p0")]
        regions: dict[str, list[tuple[int, int]]] = {"p0": []}
        n = 0
        for _ in range(120):
            live = [p for p in procs if p.task.alive]
            if not live:
                break
            p = rng.choice(live)
            mine = regions[p.name]
            op = rng.choice(["mmap", "touch", "touch", "read", "dontneed", "munmap",
                             "mprotect", "fork", "exit"] if mine else ["mmap"])
            try:
                if op == "mmap":
                    size = rng.choice([2, 4, 6]) * MiB
                    a = await p.mmap(size, backing=rng.choice(["hugetlb", "hugetlb_shared"]),
                                     noreserve=rng.random() < 0.3)
                    mine.append((a, size))
                    continue
                a, size = rng.choice(mine)
                off = rng.choice([0, 2 * MiB, 4 * MiB, 1 * MiB]) % size
                length = min(rng.choice([2 * MiB, 4096, 3 * MiB]), size - off)
                if op in ("touch", "read"):
                    await p.touch(a + off, length, write=op == "touch",
                                  value=rng.randrange(1, 255), stride=1 << 20)
                elif op == "dontneed":
                    await p.madvise(a + off, length, "dontneed")
                elif op == "munmap":
                    if await p.munmap(a + off, length) == 0 and (off, length) == (0, size):
                        mine.remove((a, size))
                elif op == "mprotect":
                    await p.mprotect(a + off, length, rng.choice(["r", "rw"]))
                elif op == "fork":
                    n += 1
                    c = await p.fork(f"c{n}")
                    procs.append(c)
                    regions[c.name] = list(mine)
                elif op == "exit" and p.name != "p0":
                    await p.exit()
            except (Sigbus, Segv, KmmError):  # the kernel's refusals are part of the game
                pass
        for p in procs:
            if p.task.alive:
                await p.exit()
        return pool(k)
    _, after = run_machine(fn, cpus=1)
    assert after == (3, 3, 0, 0)  # everything back in the persistent pool


def test_invariant_checker_catches_a_broken_pool_count():
    # kmm.testing.hugetlb_check: the free count must be the free list's length
    from kmm.testing import invariant_errors

    async def fn(m, k):
        await k.set_hugetlb_pool(2)
        p = await k.process()
        a = await p.mmap(2 * MiB, backing="hugetlb")
        await p.touch(a, 2 * MiB)
        clean = invariant_errors(m, k)
        m.hugetlb.default.free_huge_pages += 1  # a count that no longer adds up
        broken = invariant_errors(m, k)
        m.hugetlb.default.free_huge_pages -= 1
        return clean, broken
    _, (clean, broken) = run_machine(fn)
    assert clean == []
    assert broken == ["hugepages-2048kB: free_huge_pages 2 != free list 1"]
