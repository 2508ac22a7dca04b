"""shmem THP mechanics (issue 12): the page cache's references, file PMDs without a
deposit, fork copying no file PMD, truncation splitting a page-cache THP, collapse_file
replacing small folios, and the order policy. Expected values of host-visible behaviour
come from the host recordings (workloads/shmem_*.oracle.json, memfd_*.oracle.json); these
tests pin the internal state those recordings imply."""

from __future__ import annotations

from kmm import errno_name, filemap, shmem
from kmm.pgtable import HPAGE_PMD_NR, pmd_pfn, pmd_trans_huge
from kmm.testing import check_between_ops, run_machine

MiB = 1 << 20


def _pmd(m, mm, addr):
    from kmm.memory import pmd_lookup
    from kmm.pgtable import pmd_index
    t = pmd_lookup(m, mm, addr)
    return t, (m.physmem.tables[t][pmd_index(addr)] if t >= 0 else 0)


def test_shared_write_maps_a_page_cache_thp_by_pmd_without_a_deposit():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 4096, value=7)
        t, e = _pmd(m, p.task.mm, a)
        folio = m.physmem.page(pmd_pfn(e))
        inode = p.task.mm.vma_lookup(a).vm_file
        return (pmd_trans_huge(e), m.physmem.pages[t].pt_deposit, folio.refcount,
                folio.entire_mapcount, folio.mapping is inode.mapping,
                inode.mapping.nrpages, p.task.mm.rss_shmem, p.task.mm.rss_anon,
                m.vmstat.events["thp_file_alloc"], m.vmstat.events["thp_file_mapped"])
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    # 512 page-cache references + 1 for the PMD mapping; nothing deposited (x86)
    assert r == (True, None, HPAGE_PMD_NR + 1, 1, True, HPAGE_PMD_NR, HPAGE_PMD_NR, 0, 1, 1)


def test_fork_copies_no_file_pmd_and_the_child_refaults_it():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 4096, value=1)
        c = await p.fork("c1")
        before = _pmd(m, c.task.mm, a)[1]
        await c.touch(a + 8192, 1, value=2)   # the child's write reaches the parent
        got = await p.load(a + 8192)
        folio = m.physmem.page(pmd_pfn(_pmd(m, p.task.mm, a)[1]))
        return before, got[0], folio.entire_mapcount, m.vmstat.events["thp_file_mapped"]
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    assert r == (0, 2, 2, 2)


def test_partial_dontneed_zaps_the_file_pmd_whole_and_keeps_the_data():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 2 * MiB, value=3, stride=64 << 10)
        await p.madvise(a + MiB, 4096, "dontneed")
        gone = _pmd(m, p.task.mm, a)[1]
        rss = k.smaps(p, a, 2 * MiB)[0]
        inode = p.task.mm.vma_lookup(a).vm_file
        folio = filemap.filemap_get_entry(m, inode.mapping, 0)
        ref = folio.refcount  # the page cache's only
        back = await p.load(a + (64 << 10))  # refaults the whole PMD
        return gone, rss, folio.order, ref, back[0], m.vmstat.events["thp_split_pmd"]
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    assert r == (0, 0, 9, HPAGE_PMD_NR, 3, 1)


def test_punch_hole_splits_the_page_cache_thp_and_drops_the_hole():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        await p.touch(a, 2 * MiB, value=4, stride=64 << 10)
        r = await p.fallocate_punch_hole(a, MiB, 64 << 10)
        inode = p.task.files[a]
        mp = inode.mapping
        hole = [i for i in range(256, 272) if i in mp.i_pages]
        cached = mp.nrpages
        layout = _layout(m, mp)
        back = (await p.load(a + MiB))[0], (await p.load(a))[0]
        return (r, layout, hole, cached, m.vmstat.events["thp_split_page"],
                m.vmstat.node["nr_shmem_hugepages"], back, _splits(m))
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    # non-uniform (try_folio_split_to_order): the 2 MiB folio halved down to page 256,
    # then the order-4 folio holding page 272 (offset+length) halved down to it; the
    # host counts one split of each size (memfd_punch_hole_then_write.oracle.json)
    assert r == (0, [(0, 8), (272, 0), (273, 0), (274, 1), (276, 2), (280, 3), (288, 5),
                     (320, 6), (384, 7)], [], HPAGE_PMD_NR - 16, 1, 0, (0, 4),
                 {2048: 1, 64: 1})


def _layout(m, mp) -> list[tuple[int, int]]:
    """The page cache as (index, order) of each folio."""
    seen = {}
    for i in sorted(mp.i_pages):
        f = m.physmem.page(mp.i_pages[i])
        assert f.index <= i < f.index + f.nr_pages
        seen.setdefault(f.pfn, (f.index, f.order))
    return sorted(seen.values())


def _splits(m) -> dict[int, int]:
    """hugepages-<size>kB/stats/split, by size in KiB, where nonzero."""
    return {4 << o: st["split"] for o, st in sorted(m.vmstat.mthp.items()) if st.get("split")}


def test_folios_left_by_a_non_uniform_split_map_by_ptes_and_truncate_again():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        await p.touch(a, 2 * MiB, value=5, stride=4096)
        await p.fallocate_punch_hole(a, 0, 64 << 10)
        mp = p.task.files[a].mapping
        first = _layout(m, mp)
        await p.touch(a, 2 * MiB, value=6, stride=4096)  # refault: PTEs into the folios
        big = m.physmem.page(mp.i_pages[256])  # the order-8 folio, mapped by 256 PTEs
        refs = (big.order, big.refcount, big.large_mapcount,
                m.physmem.page(big.pfn + 255).head == big.pfn)
        await p.ftruncate(a, 1536 << 10)  # cuts the order-8 folio: split at page 384
        second = _layout(m, mp)
        back = (await p.load(a))[0], (await p.load(a + MiB))[0]
        await p.ftruncate(a, 0)
        return (first, refs, second, back, mp.nrpages, m.vmstat.node["nr_shmem"],
                _splits(m))
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    first, refs, second, back, nrpages, nr_shmem, splits = r
    assert first == [(16, 0), (17, 0), (18, 1), (20, 2), (24, 3), (32, 5), (64, 6),
                     (128, 7), (256, 8)]
    # the page cache's 256 references and one a PTE mapping; the tails point at it
    assert refs == (8, 256 + 256, 256, True)
    # the order-8 folio [256, 512) cut at 384: [256, 384) stays as an order-7 folio
    assert second[-1] == (256, 7) and all(i < 384 for i, _ in second)
    assert back == (6, 6) and nrpages == 0 and nr_shmem == 0
    assert splits == {2048: 1, 64: 1, 1024: 1}


def test_ftruncate_shrinks_and_the_inode_dies_with_its_last_user():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(4 * MiB, backing="memfd")
        await p.touch(a, 4 * MiB, value=5, stride=MiB)
        inode = p.task.files[a]
        await p.ftruncate(a, 3 * MiB)
        after = inode.mapping.nrpages, inode.i_size
        await p.exit()
        return after, inode.evicted, inode.mapping.nrpages, m.vmstat.node["nr_shmem"]
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"})
    assert r == ((HPAGE_PMD_NR + 256, 3 * MiB), True, 0, 0)


def test_madvise_collapse_replaces_small_folios_and_maps_the_pmd():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 2 * MiB, value=6, stride=32 << 10)
        mm = p.task.mm
        tables_before = mm.nr_ptes
        r = await p.madvise(a, 2 * MiB, "collapse")
        e = _pmd(m, mm, a)[1]
        folio = m.physmem.page(pmd_pfn(e))
        back = (await p.load(a + (32 << 10)))[0], (await p.load(a + 4096))[0]
        return (r, tables_before, mm.nr_ptes, folio.order, folio.refcount,
                m.vmstat.events["thp_collapse_alloc"], back)
    _, r = run_machine(fn, knobs={"shmem_enabled": "advise"})
    assert r == (0, 1, 0, 9, HPAGE_PMD_NR + 1, 1, (6, 0))


def test_order_policy_matches_the_kernel_table():
    """shmem_allowable_huge_orders for anonymous shmem and for a memfd, the per-size
    knobs at their defaults (so the global knob decides: the PMD order for a fault in a
    mapping, every file order for the write path), as the recordings show under each
    mode (memfd_within_size_unaligned: a 2 MiB folio and no 1 MiB one beyond it)."""
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(3 * MiB, backing="shmem")
        b = await p.mmap(3 * MiB, backing="memfd")
        va, vb = p.task.mm.vma_lookup(a), p.task.mm.vma_lookup(b)
        out = {}
        for mode in shmem.SHMEM_ENABLED if hasattr(shmem, "SHMEM_ENABLED") else (
                "always", "within_size", "advise", "never", "deny", "force"):
            m.sysfs.write("shmem_enabled", mode)
            out[mode] = tuple(
                shmem.shmem_allowable_huge_orders(m, v.vm_file, v, idx, 0, False)
                for v in (va, vb) for idx in (0, 512))
            out[mode] += (shmem.shmem_allowable_huge_orders(m, vb.vm_file, None, 0, 0, False),)
        return out
    _, r = run_machine(fn)
    pmd, allf = 1 << 9, shmem.ALL_FILE_ORDERS
    assert r["always"] == (pmd, pmd, pmd, pmd, allf)
    assert r["never"] == (0, 0, 0, 0, 0)
    assert r["deny"] == (0, 0, 0, 0, 0)
    assert r["force"] == (pmd, pmd, pmd, pmd, pmd)
    assert r["advise"] == (0, 0, 0, 0, 0)  # not madvised
    # anonymous shmem: the global within_size looks at the PMD order only in a fault,
    # which fits at 0 (the inherited PMD order allowed) and not at 512 (nothing)
    assert r["within_size"][0] == pmd and r["within_size"][1] == 0
    # a memfd fault at 512: the PMD block would end beyond i_size (768 pages), and the
    # smaller orders are for the write path only (order 8 fits there)
    assert r["within_size"][2] == pmd and r["within_size"][3] == 0
    assert r["within_size"][4] == allf  # the write path at 0: every order fits


def test_pageout_swaps_shmem_out_and_a_fault_reads_it_back_whole():
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        await p.touch(a, 2 * MiB, value=9, stride=64 << 10)
        await p.madvise(a, 2 * MiB, "pageout")
        mp = p.task.files[a].mapping
        out = (len(mp.swapped), mp.nrpages, m.vmstat.events["thp_swpout"],
               m.vmstat.events["pswpout"], m.swap_info.inuse_pages)
        back = (await p.load(a + (64 << 10)))[0]
        folio = filemap.filemap_get_entry(m, mp, 0)
        after = (len(mp.swapped), folio.order, m.vmstat.events["pswpin"],
                 m.swap_info.inuse_pages)
        await p.madvise(a, 2 * MiB, "pageout")
        await p.fallocate_punch_hole(a, 0, 2 * MiB)  # truncation frees the slots
        return out, back, after, (len(mp.swapped), m.swap_info.inuse_pages)
    _, r = run_machine(fn, knobs={"shmem_enabled": "always"}, swap=64 * MiB)
    assert r == ((HPAGE_PMD_NR, 0, 1, HPAGE_PMD_NR, HPAGE_PMD_NR), 9,
                 (0, 9, HPAGE_PMD_NR, 0), (0, 0))


def test_a_swap_in_whose_entry_a_punch_freed_meanwhile_drops_its_page(monkeypatch):
    """shmem_swapin_folio rechecks, under the folio lock and then as it replaces the
    entry in the page cache (shmem_confirm_swap, shmem_add_to_page_cache's expected
    entry), that the page cache still holds the swap entry it read: a punch that freed
    it while the page was read wins, the page read is dropped and the fault looks again
    and finds a hole (a zero page). Found by kmm explore: race_shmem_swapin_punch, pct:
    the hole read its old byte, a slot was freed twice, a KeyError in shmem_free_swap."""
    from kmm import page_io
    seen = {}

    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(4 * 4096, backing="memfd")
        for i in range(4):
            await p.store(a + i * 4096, bytes([0x10 + i]))
        await p.madvise(a, 4 * 4096, "pageout")
        mp = p.task.files[a].mapping
        assert sorted(mp.swapped) == [0, 1, 2, 3]
        read = page_io.swap_read_folio

        async def read_while_punched(m_, folio):
            seen["reading"] = True  # the fault has claimed the slot: let the punch run
            while "punched" not in seen:
                await m.sched.sleep(1000)
            return await read(m_, folio)

        async def fault(cpu):
            return await p.on(cpu).load(a + 4096)

        async def punch(cpu):
            while "reading" not in seen:
                await m.sched.sleep(1000)
            seen["punched"] = await p.on(cpu).fallocate_punch_hole(a, 4096, 4096)

        monkeypatch.setattr(page_io, "swap_read_folio", read_while_punched)
        seen["read"], _ = await k.parallel(fault, punch)
        monkeypatch.undo()
        seen["left"] = (sorted(mp.swapped), m.swap_info.inuse_pages)
        seen["others"] = [await p.load(a + i * 4096) for i in (0, 2, 3)]

    run_machine(fn, swap=64 * MiB, cpus=2, check=check_between_ops)
    assert seen == {"reading": True, "punched": 0, "read": b"\x00", "left": ([0, 2, 3], 3),
                    "others": [b"\x10", b"\x12", b"\x13"]}


def test_a_punch_inside_a_swapped_out_thp_reads_it_back_then_cuts_the_hole():
    """shmem_undo_range leaves a large swap entry only partly inside the range to the
    partial-folio step (find_lock_entries omits it), whose shmem_get_partial_folio
    reads the THP back from swap whole so truncate_inode_partial_folio can zero and
    split it: the hole reads zero, every other byte its value, no slot is left. (kmm
    used to free the entry's slots one index at a time, so the rest of the THP kept
    a large entry a swap-in could never match: the next read looked again forever.)"""
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        for i in range(0, 512, 16):
            await p.store(a + i * 4096, bytes([i // 16 + 1]))
        await p.madvise(a, 2 * MiB, "pageout")
        mp = p.task.files[a].mapping
        swapped = (len(mp.swapped), {order for _, order, _ in mp.swapped.values()})
        await p.fallocate_punch_hole(a, 16 * 4096, 2 * 4096)  # pages 16 and 17
        got = [(await p.load(a + i * 4096))[0] for i in range(0, 512, 16)]
        return (swapped, m.vmstat.events["pswpin"], len(mp.swapped),
                m.swap_info.inuse_pages, got)

    _, r = run_machine(fn, knobs={"shmem_enabled": "always"}, swap=64 * MiB)
    assert r == ((HPAGE_PMD_NR, {9}), HPAGE_PMD_NR, 0, 0,
                 [0 if i == 16 else i // 16 + 1 for i in range(0, 512, 16)])


def test_a_lookup_never_sees_neither_the_swap_entry_nor_the_folio():
    """The swap-in's replacement of the swap entry by its folio is one store per index
    under the i_pages lock, and shmem_free_swap takes that lock (xa_cmpxchg): a punch
    that ran while the swap-in was between the two (kmm used to drop the entry, pass a
    point, then store the folio) found neither, and the old page came back in the
    hole. The schedule kmm explore found (race_shmem_swapin_punch, pct, schedule 6471
    of 10,000) runs clean."""
    summ = _race_schedule("race_shmem_swapin_punch.py", "pct", 6471)
    assert (summ.schedules, summ.first) == (1, None), summ.first_violation


def test_a_swap_in_takes_a_folio_still_in_the_swap_cache_back():
    """A shmem swap entry whose folio reclaim wrote but could not free (a fault held
    its lock or a reference) is still in the swap cache, and its slot claimed by it:
    shmem_swapin_folio takes that folio back (swap_cache_get_folio, after its write
    has ended). kmm's swap-in knew only the direct read, failed to claim the slot and
    waited forever (kmm explore: race_shmem_swapout_fault, random, schedule 96)."""
    summ = _race_schedule("race_shmem_swapout_fault.py", "random", 96)
    assert (summ.schedules, summ.first) == (1, None), summ.first_violation


def _race_schedule(program: str, mode: str, i: int):
    """Schedule i of kmm explore's run of a race program (seed 1, the mode's default
    depth), as the campaign ran it: its explore Summary."""
    import pathlib
    from kmm.tools import explore as ex
    root = pathlib.Path(__file__).resolve().parents[2]
    cfg = ex.Config(program=str(root / "workloads" / program), mode=mode, seed=1,
                    depth=ex.DEFAULT_DEPTH[mode])
    return ex.explore(cfg, 1, start=i)


def test_a_collapse_whose_hole_was_filled_and_swapped_out_meanwhile_backs_out(monkeypatch):
    """collapse_file's last check before the new folio takes the block (6.18: every
    hole must still be a NULL entry, else SCAN_PAGE_FILLED) counts a swap entry as
    filled: a fault that wrote into the hole after the copy, and reclaim that then
    wrote that page out, leave a swap entry, not a hole. The collapse backs out
    (MADV_COLLAPSE: EAGAIN) and the byte written reads back from swap. (kmm used to
    look for folios only: the new folio, zero there, took the index over the swap
    entry and the write was lost.)"""
    from kmm import khugepaged_file
    seen = {}
    hole = 5

    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        for i in range(HPAGE_PMD_NR):
            if i != hole:
                await p.store(a + i * 4096, b"\x01")
        replace = khugepaged_file._replace_in_page_cache

        async def replace_after_the_fill(*args):
            seen["copied"] = True  # the hole is zero in the new folio now
            while "filled" not in seen:
                await m.sched.sleep(1000)
            return await replace(*args)

        async def collapse(cpu):
            return await errno_name(p.on(cpu).madvise(a, 2 * MiB, "collapse"))

        async def fill(cpu):
            while "copied" not in seen:
                await m.sched.sleep(1000)
            await p.on(cpu).store(a + hole * 4096, b"\x77")
            await p.on(cpu).madvise(a + hole * 4096, 4096, "pageout")
            seen["filled"] = hole in p.task.files[a].mapping.swapped

        monkeypatch.setattr(khugepaged_file, "_replace_in_page_cache", replace_after_the_fill)
        seen["collapse"], _ = await k.parallel(collapse, fill)
        monkeypatch.undo()
        seen["back"] = await p.load(a + hole * 4096), await p.load(a)
        seen["thps"] = (m.vmstat.events["thp_collapse_alloc"],
                        shmem.shmem_meminfo(m).get("ShmemHugePages", 0))

    run_machine(fn, swap=64 * MiB, cpus=2, check=check_between_ops)
    assert seen["filled"] is True
    assert seen["collapse"] == "EAGAIN"
    assert seen["back"] == (b"\x77", b"\x01")
    assert seen["thps"] == (1, 0)  # allocated, then freed with the rollback


def test_collapse_reads_swapped_pages_back_without_a_major_fault():
    """collapse_file reads the swapped pages of its block back through shmem_get_folio
    (no fault_type): pswpin counts them, pgmajfault does not (the host, 6.18.44 with a
    zram swap: 16 pages paged out of a 2 MiB shmem block, MADV_COLLAPSE returned 0 with
    pswpin +16, pgmajfault +0, thp_collapse_alloc +1). A fault's swap-in is major."""
    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 2 * MiB, value=1)
        await p.madvise(a, 64 << 10, "pageout")
        ev = m.vmstat.events
        before = ev["pswpin"], ev["pgmajfault"], ev["thp_collapse_alloc"]
        r = await p.madvise(a, 2 * MiB, "collapse")
        collapsed = (r, ev["pswpin"] - before[0], ev["pgmajfault"] - before[1],
                     ev["thp_collapse_alloc"] - before[2])
        await p.madvise(a, 2 * MiB, "pageout")  # the THP goes out whole
        await p.load(a)
        return collapsed, (ev["pswpin"] - before[0], ev["pgmajfault"] - before[1])
    _, r = run_machine(fn, knobs={"shmem_enabled": "advise"}, swap=64 * MiB)
    assert r == ((0, 16, 0, 1), (16 + HPAGE_PMD_NR, 1))


def test_a_swap_in_without_memory_fails_and_leaves_the_entry(monkeypatch):
    """shmem_swapin_folio with no folio to read into returns -ENOMEM, and the swap
    entry stays: MADV_COLLAPSE fails (SCAN_FAIL: EINVAL), a later read gets the page
    back, and a fault that cannot get one is VM_FAULT_OOM (the out-of-memory path
    ends the process). (kmm used to take the failure for a lost race and look again,
    forever.)"""
    from kmm.uapi import OomKilled
    seen = {}

    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="memfd")
        await p.touch(a, 2 * MiB, value=3)
        await p.madvise(a, 8192, "pageout")
        monkeypatch.setattr(shmem, "shmem_alloc_folio", _no_folio)
        seen["collapse"] = await errno_name(p.madvise(a, 2 * MiB, "collapse"))
        seen["swapped"] = sorted(p.task.files[a].mapping.swapped)
        monkeypatch.undo()
        seen["back"] = await p.load(a)
        monkeypatch.setattr(shmem, "shmem_alloc_folio", _no_folio)
        try:
            await p.load(a + 4096)
        except OomKilled:
            seen["fault"] = "OomKilled"

    run_machine(fn, knobs={"shmem_enabled": "advise"}, swap=64 * MiB,
                check=check_between_ops)
    assert seen == {"collapse": "EINVAL", "swapped": [0, 1], "back": b"\x03",
                    "fault": "OomKilled"}


async def _no_folio(*args):
    return None
