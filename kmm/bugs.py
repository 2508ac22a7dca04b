"""Injectable bugs: switches that each remove one real safeguard of the THP code.

The race laboratory (``kmm explore``) needs bugs it can find: each entry below names
the kernel function whose safeguard the switch removes, what the safeguard is, why the
kernel needs it (the race it closes, with the commit where there is one), the race program that exposes it, and what the
violation looks like. A machine's ``m.bugs`` is a frozenset of these names, empty by
default; mechanism code tests ``"name" in m.bugs`` at the one site it concerns, so a run
without bugs follows exactly the kernel's path.

    kmm.tools.runner.run_program("workloads/race_fault_fault.py", mode="random", seed=1,
                                 check=kmm.testing.check_between_ops,
                                 inject=["huge_fault_no_pmd_none_recheck"])
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    function: str      # the kernel function whose safeguard is removed
    safeguard: str     # what the kernel does there
    reasoning: str     # why: the race it closes
    program: str       # the race program (workloads/) that exposes it
    violation: str     # what the checker or the program then reports


BUGS: dict[str, Bug] = {b.name: b for b in (
    Bug("huge_fault_no_pmd_none_recheck",
        "__do_huge_pmd_anonymous_page",
        "after allocating the THP and the deposit table with no lock held, take the PMD "
        "lock and install only if the PMD is still none (else free both and refault)",
        "two threads faulting the same 2 MiB both see pmd_none locklessly; the recheck "
        "under pmd_lock lets exactly one install (allocate outside the spinlock, install "
        "only into a still-empty slot). Without it the second "
        "overwrites the first's PMD: the first THP and the bytes written into it are lost, "
        "its mapcount and deposit leak",
        "race_fault_fault.py",
        "InvariantError: a folio with an entire mapcount but not PMD-mapped, two tables "
        "deposited for one huge PMD; lost_bytes > 0"),
    Bug("huge_wp_no_pmd_same_recheck",
        "do_huge_pmd_wp_page",
        "pmd_same(orig_pmd, *pmd) after taking the PMD lock, and again after sleeping "
        "in folio_lock with the PMD lock dropped",
        "orig_pmd was read locklessly in __handle_mm_fault; a split "
        "(split_huge_page's try_to_migrate freeze, remap) may have replaced the huge PMD "
        "by a PTE table meanwhile, and the fault may even have slept on the folio lock "
        "the split held. Without the recheck the reuse path writes the stale huge PMD "
        "back over the PTE table: a mapping resurrected from before the split (the "
        "pattern every huge handler follows, 7.3.1)",
        "race_cow_split.py",
        "InvariantError: a huge PMD without its deposited table, PTE mappings that no "
        "table holds any more (mapcount and nr_ptes mismatches)"),
    Bug("collapse_no_tlb_flush",
        "pmdp_collapse_flush",
        "flush_tlb_mm_range over the 2 MiB after clearing the PMD, before "
        "__collapse_huge_page_isolate and the copy",
        "another CPU may still hold a TLB entry for one of the small pages; the flush "
        "(an IPI shootdown) makes its next store walk the page tables, find the PMD "
        "cleared and fault, waiting on the mmap lock until the THP is in. Without it "
        "the store goes through the stale entry into the old page after it was copied "
        "and freed: a lost write (the kernel's collapse relies on it as GUP-fast relies "
        "on tlb_remove_table_sync_one, 7.4 item 6)",
        "race_fault_collapse.py",
        "InvariantError: a written byte reads back as its value before the collapse; "
        "lost_bytes > 0"),
    Bug("collapse_mmap_read_lock",
        "collapse_huge_page",
        "mmap_write_lock (and vma_start_write) before clearing the PMD",
        "the write lock excludes every page fault (they take the mmap lock for read) "
        "while the PMD is cleared and the table detached; under a read lock a fault "
        "on the block sees pmd_none and installs a new PTE table, which the collapse then "
        "overwrites: the kernel's BUG_ON(!pmd_none(*pmd)) before it installs the THP "
        "(a fault installing into a table being removed is 7.4 item 8's race on the "
        "file side); vma_start_write's mmap_assert_write_locked reports it at once",
        "race_fault_collapse.py",
        "KernelBug: collapse_huge_page (vma_start_write): mmap_assert_write_locked"),
    Bug("huge_fault_no_deposit",
        "__do_huge_pmd_anonymous_page (pgtable_trans_huge_deposit)",
        "pre-allocate a PTE table and deposit it behind the new huge PMD",
        "a PMD split runs under the PMD spinlock (and in reclaim's rmap walks), where "
        "it may not allocate; the deposit guarantees it never needs to (section 3). "
        "Without it the split must allocate a table under the spinlock: with "
        "CONFIG_DEBUG_ATOMIC_SLEEP, 'BUG: sleeping function called from invalid "
        "context'; nr_ptes and the deposit count no longer match the huge PMDs",
        "race_fault_split.py",
        "InvariantError: a huge PMD with no deposited table (the checker); without the "
        "checker, KernelBug: sleeping function called from invalid context, at the split"),
    Bug("zap_huge_pmd_no_recheck",
        "zap_huge_pmd (__pmd_trans_huge_lock)",
        "after taking the PMD lock, proceed only if the PMD is still a huge PMD or a "
        "PMD migration entry",
        "zap_pmd_range tested pmd_trans_huge locklessly under the mmap read lock "
        "(MADV_DONTNEED); a concurrent fault may have split the PMD (a COW write to a "
        "THP shared with a child) before the zap got the lock. Without the recheck the "
        "zap clears a PTE-table PMD as if it were huge and withdraws a deposit that is "
        "not there (the MADV_DONTNEED-vs-fault family, 7.4 items 1 and 2)",
        "race_dontneed_fault.py",
        "KernelBug: pgtable_trans_huge_withdraw: nothing deposited"),
    Bug("split_pmd_no_tlb_flush",
        "__split_huge_pmd_locked (pmdp_invalidate)",
        "pmdp_invalidate: mark the PMD not present and flush the 2 MiB TLB range on "
        "every CPU before the PTEs (here migration entries: the freeze) replace it",
        "the freeze is what stops accesses during a split: an access meets a migration "
        "entry and waits for the folio lock. It only holds if no CPU can still write "
        "through a cached 2 MiB translation. Without the flush a CPU keeps storing into "
        "the folio after remap_page judged a subpage zero-filled, mapped the shared "
        "zero page there and freed the subpage (RMP_USE_SHARED_ZEROPAGE): a lost write "
        "(also AMD erratum 383: 2 MiB and 4 KiB translations for one address)",
        "race_reclaim_split.py",
        "InvariantError: a written byte reads back as 0 (the zero page); lost_bytes > 0"),
    Bug("split_no_ref_freeze",
        "__folio_split (folio_ref_freeze)",
        "after unmapping into migration entries, freeze the refcount at exactly "
        "1 + extra pins, else put the mappings back and fail with -EAGAIN",
        "a reference taken after can_split_folio (a fault about to sleep on the folio "
        "lock, a shrinker's folio_try_get) must make the split fail, since the split "
        "rewrites every page's refcount. Without the freeze that reference is lost in "
        "the split; when its holder drops it, the head page loses one its mapping owns "
        "and is freed while still mapped",
        "race_cow_split.py",
        "InvariantError: refcount below the mappings, or a mapped page on a free list"),
    Bug("mthp_no_pte_range_recheck",
        "do_anonymous_page (pte_range_none under the PTE lock)",
        "after allocating an mTHP for a block found all none without the lock, take the "
        "PTE lock and map it only if every PTE of the block is still none (else free it "
        "and refault)",
        "alloc_anon_folio reads the block's PTEs locklessly; a fault on another CPU may "
        "map a page inside the block (the zero page, then a COW copy) before the PTE "
        "lock is taken. Without the recheck set_ptes overwrites that PTE: the other "
        "page stays counted as mapped with no PTE, and the byte written to it is lost "
        "(the same allocate-outside, install-into-still-empty pattern as 7.3.1, over "
        "a range)",
        "race_mthp_fault.py",
        "InvariantError: a page with a mapcount but not mapped; lost_bytes > 0"),
    Bug("hugetlb_fault_no_mutex",
        "hugetlb_fault (hugetlb_fault_mutex_table)",
        "take the fault mutex hashed from (mapping, index) before reading the entry, and "
        "hold it until the page is mapped",
        "two faults on one hugetlb page would both go to hugetlb_no_page: the first "
        "consumes the page's reservation and takes the pool's only page; the second, "
        "finding the reservation consumed and the pool empty, fails the allocation and, "
        "the entry still being none, sends SIGBUS although the page is being mapped "
        "(the 'false unable to allocate errors' hugetlb_no_page's comment names)",
        "race_hugetlb_fault.py",
        "AssertionError: a writer died: Sigbus"),
    Bug("hugetlb_pmd_share_no_i_mmap_lock",
        "huge_pmd_share",
        "hold the file's i_mmap_rwsem for read from the i_mmap lookup of another VMA's "
        "PMD table to the populate of this mm's PUD entry",
        "the other VMA's final zap (munmap, exit) and its free_pgtables take the "
        "i_mmap_rwsem for write, and the zap frees the VMA's hugetlb lock so "
        "page_table_shareable refuses it afterwards; without the read lock the whole "
        "munmap can run between the lookup and the share-count increment: the zap finds "
        "the table unshared, clears it and free_pgtables frees it, and the sharer then "
        "takes a reference on a freed page table (or the table is freed while shared) "
        "and maps its PUD to it",
        "race_hugetlb_pmd_share.py",
        "KernelBug: ptdesc_pmd_pts_inc: page ... is no PMD table (freed while being "
        "shared), or: freeing PMD table ... still shared"),
    Bug("numa_huge_no_pmd_same",
        "do_huge_pmd_numa_page",
        "pmd_same(old_pmd, vmf->orig_pmd) right after taking the PMD lock (back out if "
        "the PMD changed since __handle_mm_fault read it)",
        "the NUMA hinting fault read the PROT_NONE huge PMD without its lock; a "
        "MADV_DONTNEED or split_huge_page on another CPU (mmap lock held for read too) "
        "may have split it into a PTE table meanwhile, or zapped it. Without the recheck "
        "the fault treats the table pointer as a huge PMD: it \"restores\" it with "
        "pmd_modify (losing the table's pfn bits) or migrates whatever page that names",
        "race_numa_fault_split.py",
        "InvariantError or KernelBug: a PMD that is neither a table nor a huge mapping of "
        "a THP, PTEs and mapcounts no table holds, bytes that no longer read back"),
    Bug("shmem_fault_no_truncate_recheck",
        "shmem_get_folio_gfp",
        "after folio_lock, check that the folio is still in this mapping and still "
        "covers the index (\"Has the folio been truncated or swapped out?\"), else "
        "unlock, put and look it up again",
        "the lookup takes no lock: a hole punch or truncate may hold the folio lock "
        "meanwhile, split the folio and drop pages from the page cache. The fault then "
        "holds a folio that is no longer the one at its index (a head split off, or a "
        "page truncated away); mapping it puts a page outside the page cache, or the "
        "wrong page, into the process, with the reference counted on another folio",
        "race_shmem_punch_read.py",
        "InvariantError: a page outside the page cache mapped in a shmem VMA (the Rss "
        "counters disagree with the mappings)"),
)}


class UnknownBug(ValueError):
    """A bug name that kmm.bugs does not define."""


def validate(names) -> frozenset[str]:
    """The set of bug names, each checked against BUGS; an unknown one is an error
    naming it and listing the known ones."""
    if isinstance(names, str):
        names = [names]
    out = frozenset(names)
    unknown = sorted(out - BUGS.keys())
    if unknown:
        raise UnknownBug(f"unknown injected bug {unknown[0]!r}; known: "
                         f"{', '.join(sorted(BUGS))}")
    return out


def describe(name: str) -> str:
    """One paragraph on a bug, for ``kmm explore --inject`` listings."""
    b = BUGS[validate([name]) and name]
    return (f"{b.name}: removes, in {b.function}, {b.safeguard}. Why: {b.reasoning}. "
            f"Found by workloads/{b.program}: {b.violation}.")


__all__ = ["Bug", "BUGS", "UnknownBug", "validate", "describe"]
