"""The mutants of ``kmm mutate``: source-level removals of the THP paths' safeguards.

Each mutant is one edit of one kernel function in kmm/ (a textual replacement inside
that function's source, every ``old`` text occurring exactly once there), applied to a
copy of the tree, never to the working tree. The classes: removed
rechecks after re-taking a lock (pmd_same, pmd_none, pte_same, pte_none), removed TLB
flushes, removed lock/unlock pairs, removed references (folio_get / folio_try_get),
removed revalidations after a relock, a swapped lock order, a removed refcount freeze,
a removed unqueue.
``programs`` are the race programs explored first (the ones whose race reaches the
site), ``tests`` the test files run if exploration does not kill it.

Unlike kmm.bugs (switches designed together with the checker), these are written from
the kernel's safeguards alone: what the lab catches of them measures the lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str           # recheck, tlb-flush, lock, reference, revalidate, lock-order, freeze,
                        # unqueue
    file: str           # under the repository root
    function: str       # the function edited ("Class.method" for a method)
    edits: tuple[tuple[str, str], ...]
    why: str            # the safeguard removed and the race it closes
    programs: tuple[str, ...] = ()
    tests: tuple[str, ...] = field(default=())


MUTANTS: tuple[Mutant, ...] = (
    Mutant("anon_write_no_pte_none_recheck", "recheck", "kmm/memory.py", "do_anonymous_page",
           (('        changed = not pte_none(await m.entry_read("pte", tbl, idx))',
             '        changed = False'),),
           "do_anonymous_page's pte_none recheck under the PTE lock (vmf_pte_changed): two "
           "write faults on one PTE both allocate; the second overwrites the first's page",
           ("race_pte_fault.py",), ("tests/mm/test_fault_concurrency.py",)),
    Mutant("anon_read_no_pte_none_recheck", "recheck", "kmm/memory.py", "do_anonymous_page",
           (('        if not pte_none(await m.entry_read("pte", tbl, idx)):\n'
             '            await ptl.unlock()\n'
             '            return 0',
             '        if False:\n'
             '            await ptl.unlock()\n'
             '            return 0'),),
           "the read fault's pte_none recheck: the zero page replaces a page a racing "
           "write fault just mapped",
           ("race_pte_fault.py",), ("tests/mm/test_fault_concurrency.py",)),
    Mutant("wp_copy_no_pte_same", "recheck", "kmm/memory_wp.py", "wp_page_copy",
           (('        if await m.entry_read("pte", tbl, vmf.pte_idx) == vmf.orig_pte:',
             '        if True:'),),
           "wp_page_copy's pte_same after re-taking the PTE lock: the copy replaces an "
           "entry another fault (or a zap) changed while the page was copied",
           ("race_fork_reuse.py", "race_cow_split.py", "race_dontneed_fault.py"),
           ("tests/mm/test_fault_concurrency.py",)),
    Mutant("huge_wp_no_pmd_same_after_sleep", "recheck", "kmm/huge_memory.py",
           "do_huge_pmd_wp_page",
           (('            if await m.entry_read("pmd", vmf.pmd_tbl, vmf.pmd_idx) != orig '
             'and recheck:\n                await ptl.unlock()\n                await lk.unlock()',
             '            if False:\n                await ptl.unlock()\n'
             '                await lk.unlock()'),),
           "do_huge_pmd_wp_page's pmd_same after sleeping on the folio lock with the PMD "
           "lock dropped: the split that held the folio lock replaced the PMD meanwhile",
           ("race_wp_lock_zap.py", "race_cow_split.py", "race_fork_reuse.py"),
           ("tests/mm/test_split.py",)),
    Mutant("huge_fault_no_pmd_none_recheck_src", "recheck", "kmm/huge_memory.py",
           "__do_huge_pmd_anonymous_page",
           (('    if (not pmd_none(await m.entry_read("pmd", vmf.pmd_tbl, vmf.pmd_idx))\n'
             '            and (not bugs or "huge_fault_no_pmd_none_recheck" not in bugs)):',
             '    if False:'),),
           "the huge fault's pmd_none under the PMD lock (the source-level twin of the "
           "injected bug): a second THP overwrites the first",
           ("race_fault_fault.py",), ("tests/test_workloads.py",)),
    Mutant("split_huge_pmd_no_recheck", "recheck", "kmm/huge_memory.py",
           "split_huge_pmd_locked",
           (('    if pmd_trans_huge(pmd) or is_pmd_migration_entry(pmd):',
             '    if True:'),),
           "split_huge_pmd_locked's check that the PMD is still huge under its lock: a "
           "PMD already split (or zapped) by a racing path is split again",
           ("race_cow_split.py", "race_fault_split.py", "race_dontneed_fault.py"),
           ("tests/mm/test_split.py",)),
    Mutant("pte_offset_map_lock_no_pmd_recheck", "recheck", "kmm/memory.py",
           "pte_offset_map_lock",
           (('        same = await m.entry_read("pmd", pmd_tbl, idx) == pmdval',
             '        same = True'),),
           "pte_offset_map_lock's pmd_same after taking the PTE lock: the table may have "
           "been detached by a collapse or freed by a zap meanwhile",
           ("race_fault_collapse.py", "race_munmap_collapse.py", "race_pte_fault.py"),
           ("tests/mm/test_khugepaged.py",)),
    Mutant("swapin_no_pte_same", "recheck", "kmm/memory.py", "do_swap_page",
           (('            same = await m.entry_read("pte", res[0], vmf.pte_idx) == orig',
             '            same = True'),),
           "do_swap_page's pte_same under the PTE lock: another fault (or the collapse's "
           "swap-in) mapped the page first; the second maps it again",
           ("race_swapin_shared.py", "race_collapse_rmap.py"), ("tests/mm/test_swap.py",)),
    Mutant("wp_copy_no_tlb_flush", "tlb-flush", "kmm/memory_wp.py", "wp_page_copy",
           (('            await tlb.flush_tlb_page(m, mm, vmf.address)\n',
             ''),),
           "ptep_clear_flush in wp_page_copy: another CPU of the process keeps writing "
           "through the old translation into the page it no longer maps",
           ("race_fork_reuse.py", "race_cow_split.py"), ("tests/mm/test_fault_concurrency.py",)),
    Mutant("zap_no_tlb_flush", "tlb-flush", "kmm/memory_zap.py", "MmuGather.finish",
           (('            await tlb.flush_tlb_mm_range(m, self.mm, self.start, self.end)',
             '            pass'),),
           "tlb_finish_mmu's flush before the pages are freed (munmap, MADV_DONTNEED, "
           "exit): a CPU writes through a stale entry into a freed page",
           ("race_pte_fault.py", "race_dontneed_fault.py", "race_munmap_collapse.py"),
           ("tests/mm/test_huge_memory.py",)),
    Mutant("split_pmd_no_invalidate", "tlb-flush", "kmm/huge_memory.py",
           "__split_huge_pmd_locked",
           (('        old = await pgg.pmdp_invalidate(m, vma, haddr, pmd_tbl, idx)',
             '        old = await m.entry_read("pmd", pmd_tbl, idx)'),),
           "pmdp_invalidate in __split_huge_pmd_locked: the huge PMD stays present and "
           "cached while its PTEs are built; writes go through the 2 MiB translation",
           ("race_reclaim_split.py", "race_cow_split.py", "race_fault_split.py"),
           ("tests/mm/test_split.py",)),
    Mutant("huge_fault_no_ptl", "lock", "kmm/huge_memory.py", "__do_huge_pmd_anonymous_page",
           (('    await ptl.lock("__do_huge_pmd_anonymous_page")\n', ''),
            ('        # a racing fault installed a PTE table or a THP first: refault onto it\n'
             '        await ptl.unlock()\n',
             '        # a racing fault installed a PTE table or a THP first: refault onto it\n'),
            ('        mm.nr_ptes += 1\n    await ptl.unlock()\n', '        mm.nr_ptes += 1\n')),
           "the PMD lock around the huge fault's recheck and install: two faults both "
           "pass the recheck",
           ("race_fault_fault.py", "race_fault_split.py"), ("tests/test_workloads.py",)),
    Mutant("collapse_no_anon_vma_lock", "lock", "kmm/khugepaged_collapse.py",
           "_collapse_write_locked",
           (('    await anon_rwsem.down_write("collapse_huge_page")  # stops rmap walkers\n',
             ''),
            ('        await pmd_ptl.unlock()\n        await anon_rwsem.up_write()\n'
             '        return result',
             '        await pmd_ptl.unlock()\n        return result'),
            ('    await anon_rwsem.up_write()\n    result = await __collapse_huge_page_copy',
             '    result = await __collapse_huge_page_copy')),
           "the anon_vma write lock over the PMD switch and the isolation: rmap walkers "
           "(migration, reclaim) reach the pages while the collapse takes them",
           ("race_collapse_rmap.py", "race_reclaim_split.py"), ("tests/mm/test_khugepaged.py",)),
    # (was deferred_split_queue_unlocked, split_queue_lock removed from
    # deferred_split_folio: an equivalent mutant here, since every split_queue_lock
    # section is one step with no point inside, so the lock orders nothing the list
    # operations do not; the kernel's lock keeps the list itself from corrupting, which
    # kmm's queue cannot. What the shrinker's scan vs the free path needs of the queue
    # in kmm is the free path's unqueue, below.)
    Mutant("free_no_deferred_unqueue", "unqueue", "kmm/swap.py", "_free_folio",
           (('    if folio.on_deferred_list:\n'
             '        await m.split_queue_lock.lock("__folio_unqueue_deferred_split")',
             '    if False:\n'
             '        await m.split_queue_lock.lock("__folio_unqueue_deferred_split")'),),
           "folio_unqueue_deferred_split in __folio_put: a queued folio freed by munmap or "
           "exit stays on the deferred split queue, and the shrinker's next scan takes "
           "memory back in the buddy (or reallocated) for a queued THP",
           ("race_shrinker_last_put.py", "race_shrinker_exit.py"), ("tests/mm/test_split.py",)),
    Mutant("huge_wp_no_folio_get", "reference", "kmm/huge_memory.py", "do_huge_pmd_wp_page",
           (('            await m.folio_ref_add(folio, 1)\n            await ptl.unlock()',
             '            await ptl.unlock()'),
            ('                await lk.unlock()\n                await m.folio_put(folio)\n'
             '                return 0\n            await m.folio_put(folio)\n',
             '                await lk.unlock()\n                return 0\n')),
           "the folio_get before sleeping on the folio lock with the PMD lock dropped: "
           "the THP may be split or freed while the fault waits for its lock",
           ("race_wp_lock_zap.py", "race_cow_split.py", "race_fork_reuse.py"),
           ("tests/mm/test_split.py",)),
    Mutant("deferred_split_no_try_get", "reference", "kmm/huge_memory_split.py",
           "deferred_split_scan",
           (('        if folio.refcount > 0:  # folio_try_get', '        if True:'),),
           "folio_try_get in deferred_split_scan: the shrinker takes a reference on a "
           "folio whose last reference is being dropped (munmap, exit) and splits freed "
           "memory",
           ("race_shrinker_last_put.py", "race_shrinker_exit.py", "race_reclaim_split.py"),
           ("tests/mm/test_split.py",)),
    Mutant("collapse_isolate_no_refcount_check", "reference", "kmm/khugepaged_collapse.py",
           "__collapse_huge_page_isolate",
           (('            if not khugepaged.is_refcount_suitable(folio):',
             '            if False:'),),
           "is_refcount_suitable in the isolation: a page someone else holds a reference "
           "on (migration's isolation, GUP, the swap cache) is collapsed anyway",
           ("race_collapse_rmap.py", "race_cow_collapse.py"), ("tests/mm/test_khugepaged.py",)),
    Mutant("collapse_no_revalidate_after_relock", "revalidate", "kmm/khugepaged_collapse.py",
           "_collapse_write_locked",
           (('    result, vma = khugepaged.hugepage_vma_revalidate(m, mm, address, True, cc)',
             '    result, vma = R.SCAN_SUCCEED, mm.find_vma(address)'),),
           "hugepage_vma_revalidate after re-taking the mmap lock for write: the VMA "
           "was unmapped, split or changed while the lock was dropped to allocate",
           ("race_munmap_collapse.py", "race_collapse_range_munmap.py"),
           ("tests/mm/test_khugepaged.py",)),
    Mutant("collapse_no_pmd_still_valid", "revalidate", "kmm/khugepaged_collapse.py",
           "_collapse_write_locked",
           (('        result = check_pmd_still_valid(m, mm, address, pmd_tbl)',
             '        result = R.SCAN_SUCCEED'),),
           "check_pmd_still_valid after the relock: the PMD found before the allocation "
           "may be gone (munmap freed the table, MADV_DONTNEED's pt_reclaim emptied it) "
           "or be a THP now",
           ("race_collapse_dontneed.py", "race_collapse_range_munmap.py",
            "race_munmap_collapse.py"),
           ("tests/mm/test_khugepaged.py",)),
    Mutant("madvise_collapse_no_revalidate", "revalidate", "kmm/khugepaged.py",
           "madvise_collapse",
           (('            result, v = hugepage_vma_revalidate(m, mm, addr, False, cc)',
             '            result, v = R.SCAN_SUCCEED, mm.find_vma(addr)'),),
           "madvise_collapse's revalidation of the VMA when it re-takes the mmap lock "
           "for the next block: the VMA is looked up again but not checked, so a range "
           "whose rest was unmapped meanwhile has none there (a NULL dereference). "
           "Keeping the old VMA instead (the kernel's use after free) shows nothing in "
           "kmm, whose VMAs are never freed and whose collapse revalidates by itself",
           ("race_collapse_tail_munmap.py", "race_collapse_range_munmap.py",
            "race_munmap_collapse.py"),
           ("tests/mm/test_khugepaged.py",)),
    Mutant("collapse_ptl_before_anon_vma", "lock-order", "kmm/khugepaged_collapse.py",
           "_collapse_write_locked",
           (('    await anon_rwsem.down_write("collapse_huge_page")  # stops rmap walkers\n'
             '    idx = pmd_index(address)\n'
             '    pmd_ptl = m.table_lock(pmd_tbl)\n'
             '    await pmd_ptl.lock("collapse_huge_page")\n',
             '    idx = pmd_index(address)\n'
             '    pmd_ptl = m.table_lock(pmd_tbl)\n'
             '    await pmd_ptl.lock("collapse_huge_page")\n'
             '    await anon_rwsem.down_write("collapse_huge_page")  # stops rmap walkers\n'),),
           "the order anon_vma rwsem, then the PMD lock: a sleeping lock taken under a "
           "spinlock, against the order every rmap walker uses",
           ("race_fault_collapse.py", "race_collapse_rmap.py"), ("tests/mm/test_khugepaged.py",)),
    # The freeze (folio_ref_freeze to the expected count: __folio_migrate_mapping; in
    # kmm the refcount check in _migrate_one, which serves order 0, mTHPs and THPs
    # alike) is what refuses a folio someone else holds a reference on. Of kmm's
    # holders, the deferred-split shrinker is the one that acts on the folio without
    # its lock excluding migration: it takes a queued folio off the queue with
    # folio_try_get, so a move meanwhile finds the source unqueued and does not
    # requeue the destination, which stays partially mapped on no queue (and the
    # shrinker splits the old copy). race_migrate_shrinker.py sees the escape: after a
    # quiet reclaim a 64 KiB folio is left (hugepages-64kB/stats/nr_anon); random and
    # pct kill it within 2 schedules, pct-focus in 14 (preempt: survives 300). (kmm used
    # to requeue a flagged folio on every unmap, which hid the escape; 6.18's
    # __folio_remove_rmap does not, and neither does rmap.py now.) The others
    # are harmless: the LRU isolation of reclaim, compaction, MADV_PAGEOUT and the other
    # migrations excludes it; the split paths and MADV_COLD/PAGEOUT hold the folio lock
    # or wait for it and then work on an unmapped copy their put frees; wp_page_copy and
    # do_huge_pmd_wp_page only read it and then find the PTE/PMD changed; a zap's
    # mmu_gather only drops its reference. GUP pins are not modelled.
    Mutant("migrate_no_ref_freeze", "freeze", "kmm/migrate.py", "_migrate_one",
           (('    moved = not rmap.folio_mapped(folio) and folio.refcount == 1  '
             '# folio_ref_freeze',
             '    moved = not rmap.folio_mapped(folio)'),),
           "folio_ref_freeze in migration: a folio someone still holds a reference on is "
           "moved; the deferred-split shrinker's (folio_try_get, off the queue) leaves "
           "the partially mapped destination on no queue",
           ("race_migrate_shrinker.py", "race_collapse_rmap.py"),
           ("tests/mm/test_migrate.py",)),
    # The paths of mTHP, NUMA balancing, shmem and hugetlb (issues 11 to 14), written
    # after the catalogue above: their safeguards, from the kernel's functions alone.
    Mutant("mthp_no_pte_range_none_recheck", "recheck", "kmm/memory.py", "do_anonymous_page",
           (('        changed = not await memory_anon.pte_range_none(m, tbl, idx, nr)',
             '        changed = False'),),
           "the mTHP fault's pte_range_none under the PTE lock (vmf_pte_changed for nr "
           "pages): a racing fault mapped a page of the range while the folio was "
           "allocated, and set_ptes overwrites it",
           ("race_mthp_fault.py",), ("tests/mm/test_mthp.py",)),
    Mutant("numa_page_no_pte_same", "recheck", "kmm/memory_numa.py", "do_numa_page",
           (('    if old != vmf.orig_pte:  # pte_same: someone fixed or changed it meanwhile',
             '    if False:'),),
           "do_numa_page's pte_same under the PTE lock: the PROT_NONE entry read without "
           "the lock was zapped, migrated or fixed meanwhile, and the fault restores the "
           "protection of whatever is there now",
           ("race_numa_fault_dontneed.py", "race_numa_fault_write.py"),
           ("tests/mm/test_numa_balancing.py",)),
    Mutant("finish_fault_no_pte_none_recheck", "recheck", "kmm/memory_file.py",
           "finish_fault",
           (('    if busy:\n        await ptl.unlock()\n'
             '        return memory.VM_FAULT_NOPAGE  # another fault mapped it first',
             '    if False:\n        await ptl.unlock()\n'
             '        return memory.VM_FAULT_NOPAGE  # another fault mapped it first'),),
           "finish_fault's pte_none check under the PTE lock: two faults on one page-cache "
           "page (or a fault and filemap_map_pages) both map it, counting one mapping "
           "twice",
           ("race_shmem_fault_fault.py",), ("tests/mm/test_shmem.py",)),
    # Not in the catalogue, because kmm cannot tell them from the correct code:
    # do_set_pmd's pmd_none under the PMD lock (every mapper of a file THP's PMD range,
    # the fault, fault-around and collapse_pte_mapped_thp alike, holds the folio lock,
    # which already orders them); collapse_file's reference check after the unmap
    # (whoever else could hold a reference and use the page, GUP above all, is not
    # modelled: a mapper must lock the folio first, and the collapse holds it); and the
    # truncation's folio->mapping recheck after the folio lock (find_lock_entries'; the
    # kernel's truncate_inode_folio checks the mapping again, and so does kmm's); and
    # hugetlb_wp's pte_same after the copy (every writer of a private hugetlb entry
    # while the copy has the PMD lock dropped is excluded: other faults and COWs of the
    # page by the fault mutex, parent and child alike, since they share the file and
    # index; zaps by the hugetlb VMA lock; munmap and fork by the mmap lock).
    Mutant("collapse_file_no_filled_recheck", "recheck", "kmm/khugepaged_file.py",
           "_replace_in_page_cache",
           (('    if held + nr_none != HPAGE_PMD_NR or any(\n'
             '            (mapping.i_pages.get(i) is not None and m.physmem.folio('
             'mapping.i_pages[i])\n'
             '             not in pagelist) or i in mapping.swapped\n'
             '            for i in range(start, start + HPAGE_PMD_NR)):',
             '    if held + nr_none != HPAGE_PMD_NR:'),),
           "collapse_file's SCAN_PAGE_FILLED recheck under the i_pages lock: a fault put "
           "a new folio into a hole while the block was copied, and the new THP replaces "
           "it in the page cache: what the fault wrote is lost",
           ("race_shmem_punch_collapse.py", "race_shmem_collapse_fault.py"),
           ("tests/mm/test_shmem.py",)),
    Mutant("lazyfree_no_dirty_recheck", "recheck", "kmm/rmap.py", "try_to_unmap_one",
           (('                    if any(pte_dirty(o) for o in olds):\n'
             '                        atomic.folio_set_flags_locked(folio, PG_dirty)\n',
             ''),),
           "try_to_unmap_one's look at the cleared PTEs' dirty bits for a lazyfree folio: "
           "a page written after MADV_FREE (its PTE dirty, the folio still clean) is "
           "discarded by reclaim, and the write is lost",
           ("race_lazyfree_reclaim.py",), ("tests/mm/test_vmscan.py",)),
    Mutant("shmem_swapin_no_confirm_swap", "recheck", "kmm/filemap.py", "filemap_add_folio",
           (('        taken = any(mapping.swapped.get(i) != expected or i in mapping.i_pages',
             '        taken = any(i in mapping.i_pages'),
            ('                del mapping.swapped[i]',
             '                mapping.swapped.pop(i, None)')),
           "shmem_swapin_folio's shmem_confirm_swap and shmem_add_to_page_cache's expected "
           "entry: a punch freed the swap entry (and its slot) while the page was read, "
           "and the old page comes back into the hole",
           ("race_shmem_swapin_punch.py",), ("tests/mm/test_shmem.py",)),
    Mutant("mremap_no_rmap_locks", "lock", "kmm/mremap.py", "move_page_tables",
           (('    if anon is not None:\n        await anon.down_write("move_page_tables")',
             '    if False:\n        await anon.down_write("move_page_tables")'),
            ('        if anon is not None:\n            await anon.up_write()',
             '        if False:\n            await anon.up_write()')),
           "take_rmap_locks in move_page_tables: an rmap walk without the mmap lock "
           "(migration's remove_migration_ptes) looks for an entry mremap is moving, "
           "finds it in neither place, and leaves a migration entry behind",
           ("race_mremap_migrate.py",), ("tests/mm/test_khugepaged.py",)),
    Mutant("mthp_swapin_no_pte_batch_recheck", "recheck", "kmm/memory.py", "do_swap_page",
           (('                if await memory_swapin.swap_pte_batch(m, res[0], pte_idx, nr, '
             'first) != nr:',
             '                if False:'),),
           "do_swap_page's swap_pte_batch under the PTE lock for a large folio: a PTE of "
           "the block was zapped or swapped in by another fault while the folio was "
           "read, and the whole folio is mapped over it",
           ("race_mthp_swapin_dontneed.py", "race_mthp_reclaim.py"), ("tests/mm/test_mthp.py",)),
    Mutant("huge_zero_wp_no_pmd_same", "recheck", "kmm/huge_memory.py",
           "do_huge_zero_wp_pmd",
           (('    if await atomic.entry_read(m, "pmd", vmf.pmd_tbl, vmf.pmd_idx) != '
             'vmf.orig_pmd:',
             '    if False:'),),
           "do_huge_zero_wp_pmd's pmd_same under the PMD lock: two writes to the huge "
           "zero PMD both allocate a THP, and the second replaces the first's, with what "
           "was written into it",
           ("race_huge_zero_write.py",), ("tests/mm/test_huge_memory.py",)),
    Mutant("shmem_free_swap_whole_entry", "revalidate", "kmm/shmem.py", "shmem_free_swap",
           (('    if got is None or base < start or base + nr > end:',
             '    if got is None:'),),
           "shmem_free_swap's check that a large swap entry lies inside the truncated "
           "range: a punch inside a swapped-out THP frees the whole entry, and the rest "
           "of the THP's pages with it (what an upstream fix of January 2026, marked for "
           "stable, stopped)",
           ("race_shmem_thp_swapin_punch.py",), ("tests/mm/test_shmem.py",)),
    Mutant("huge_pmd_share_no_pud_recheck", "recheck", "kmm/hugetlb_pmd_share.py",
           "huge_pmd_share",
           (('        if not await atomic.entry_read(m, "pud", pud, pud_index(addr)):',
             '        if True:'),),
           "huge_pmd_share's pud_none under the shared table's lock: a racing fault of "
           "this mm populated the PUD entry meanwhile, and the shared table replaces "
           "it (a table leaked, a share count never dropped)",
           ("race_hugetlb_share_fault_fault.py", "race_hugetlb_pmd_share.py"),
           ("tests/mm/test_hugetlb_pmd_share.py",)),
)

BY_NAME = {mu.name: mu for mu in MUTANTS}
