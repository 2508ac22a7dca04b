"""mbind(2): mm/mempolicy.c's do_mbind, queue_pages_range and the MPOL_MF_MOVE
migration (alloc_migration_target_by_mpol), beside kmm/mempolicy.py (the policies and
the allocation that follows them).

Only the program API and the scenario runner call in here: the range's VMAs are split
(kmm.mmap.split_vma) and the misplaced order-0 folios moved with
kmm.migrate.migrate_pages; a large folio that would have to move counts as not moved.
"""

from __future__ import annotations

from kmm import mmzone
from kmm.gfp import GFP, __GFP_COMP, __GFP_RETRY_MAYFAIL
from kmm.mempolicy import (
    FLAGS, MPOL_DEFAULT, MPOL_INTERLEAVE, MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, MPOL_MF_STRICT,
    MPOL_MF_VALID, MPOL_MAX, Mempolicy, alloc_pages_mpol, get_nodes, get_task_policy,
    get_vma_policy, mode_number, mpol_new,
)
from kmm.pgtable import PAGE_SIZE


async def do_mbind(m, task, start: int, length: int, mode, nodes=(), flags=0) -> int | str:
    """mbind(2) (do_mbind): give [start, start + len) the policy, splitting VMAs at
    the ends (mbind_range), after checking the pages already there against the new
    nodes: with MPOL_MF_MOVE (MOVE_ALL: shared pages too) those on other nodes move
    (migrate_pages to pages the new policy allocates); with MPOL_MF_STRICT a page left
    on another node makes the call fail with EIO (the policy is set all the same).
    0 or an errno name: EINVAL for bad flags, an unaligned start, or a bad mode/nodemask;
    EFAULT when the range has a hole. Context: takes mmap_lock for write."""
    from kmm import mmap as mmap_mod, swap
    mode = mode_number(mode)
    nodes = get_nodes(nodes)  # kernel_mbind: sanitize_mpol_flags, get_nodes
    if not 0 <= mode < MPOL_MAX or isinstance(nodes, str):
        return "EINVAL"
    if isinstance(flags, (list, tuple, set, frozenset)):
        bits = 0
        for f in flags:
            if f not in FLAGS:
                return "EINVAL"
            bits |= FLAGS[f]
        flags = bits
    if flags & ~MPOL_MF_VALID or start & (PAGE_SIZE - 1):
        return "EINVAL"
    if mode == MPOL_DEFAULT:
        flags &= ~MPOL_MF_STRICT
    length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    end = start + length
    if end < start:
        return "EINVAL"
    if end == start:
        return 0
    new = mpol_new(m, mode, nodes)
    if isinstance(new, str):
        return new
    mm = task.mm
    await mm.mmap_lock.down_write("do_mbind")
    try:
        vmas = [v for v in mm.vmas if v.start < end and v.end > start]
        if _has_hole(vmas, start, end):  # queue_pages_test_walk
            return "EFAULT"
        # MPOL_DEFAULT's NULL becomes the task's policy for the moves
        target = new if new is not None else get_task_policy(task)
        queued, nr_failed = _queue_pages(m, vmas, start, end, nodes, flags)
        misplaced = []
        for vma, addr, folio in queued:  # migrate_folio_add: isolate under the lock
            if mbind_can_move(folio) and await swap.folio_isolate_lru(m, folio):
                misplaced.append((vma, addr, folio))
            else:
                nr_failed += 1
        for vma in vmas:  # mbind_range -> vma_modify_policy
            s, e = max(start, vma.start), min(end, vma.end)
            if vma.start < s:
                vma = await mmap_mod.split_vma(m, vma, s)
            if vma.end > e:
                await mmap_mod.split_vma(m, vma, e)
            vma.vm_policy = new
            mmap_mod.vma_merge_around(mm, vma)
    finally:
        await mm.mmap_lock.up_write()
    if misplaced:
        nr_failed += await migrate_misplaced_to_policy(m, misplaced, target)
    if nr_failed and flags & MPOL_MF_STRICT:
        return "EIO"
    return 0


def _has_hole(vmas: list, start: int, end: int) -> bool:
    at = start
    for v in vmas:
        if v.start > at:
            return True
        at = v.end
    return at < end


def _queue_pages(m, vmas: list, start: int, end: int, nodes: set, flags: int):
    """queue_pages_range (the check half): the folios mapped in the range that sit on a
    node outside the user's nodemask (MPOL_MF_INVERT; for local/default the mask is
    empty, so every folio). Without MPOL_MF_MOVE they only count (nr_failed, for
    MPOL_MF_STRICT); a folio mapped by another mm stays without MPOL_MF_MOVE_ALL.
    Nothing is looked at without any of the three flags. Returns
    ([(vma, addr, folio)] to move, how many misplaced folios cannot move)."""
    from kmm import pagewalk, rmap
    from kmm.pgtable import pmd_pfn, pmd_present, pte_pfn, pte_present, pte_special
    if not flags & (MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL):
        return [], 0
    allowed = nodes
    move = bool(flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL))
    seen, out, failed = set(), [], 0
    for vma in vmas:
        s, e = max(start, vma.start), min(end, vma.end)
        for addr, level, entry in pagewalk.walk_leaves(m, vma.mm, s, e):
            if level == "pmd":
                if not pmd_present(entry) or m.is_huge_zero_pfn(pmd_pfn(entry)):
                    continue
                pfn = pmd_pfn(entry)
            elif pte_present(entry) and not pte_special(entry):
                pfn = pte_pfn(entry)
            else:
                continue
            folio = m.physmem.folio(pfn)
            if folio.pfn in seen or mmzone.folio_nid(m, folio) in allowed:
                continue
            seen.add(folio.pfn)
            if not move:
                failed += 1
                if flags & MPOL_MF_STRICT:
                    return [], failed  # strictly_unmovable: stop at the first
                continue
            if not flags & MPOL_MF_MOVE_ALL and rmap.folio_maybe_mapped_shared(m, folio):
                continue  # migrate_folio_add: a shared folio stays, not a failure
            out.append((vma, addr, folio))
    return out, failed


def mbind_can_move(folio) -> bool:
    """Which folios MPOL_MF_MOVE moves: order-0 ones (kmm.migrate.migrate_pages does not
    move a PMD-size THP whole yet; once it does, this says yes to them and
    alloc_migration_target_by_mpol below already allocates at the folio's order)."""
    return not folio.order


async def alloc_migration_target_by_mpol(m, src, pol: Mempolicy, vma, addr: int) -> int:
    """alloc_migration_target_by_mpol: the destination of ``src`` under the new policy
    (its interleave index; GFP_TRANSHUGE for a large folio, else GFP_HIGHUSER_MOVABLE |
    __GFP_RETRY_MAYFAIL), preferring the running CPU's node. The pfn, or -1."""
    order = src.order
    ilx = get_vma_policy(m, vma, addr, order)[1] if pol.mode == MPOL_INTERLEAVE else 0
    if order:
        gfp = GFP["GFP_TRANSHUGE"]
    else:
        gfp = GFP["GFP_HIGHUSER_MOVABLE"] | __GFP_RETRY_MAYFAIL | __GFP_COMP
    return await alloc_pages_mpol(m, gfp, order, pol, ilx, mmzone.numa_node_id(m),
                                  "thp" if order else "anon")


async def migrate_misplaced_to_policy(m, queued: list, pol: Mempolicy) -> int:
    """The migrate half of do_mbind (after mmap_lock is dropped, as there): move each
    isolated folio to the folio alloc_migration_target_by_mpol gives, with
    kmm.migrate.migrate_pages (reason "mempolicy_mbind"). Returns the folios not
    moved."""
    from kmm import migrate, swap
    failed = 0
    for vma, addr, folio in queued:
        new = await alloc_migration_target_by_mpol(m, folio, pol, vma, addr)
        used = []

        def get_new_folio(_src, pfn=new, used=used):
            used.append(pfn)
            return pfn
        moved, _ = await migrate.migrate_pages(m, [folio], get_new_folio, "mempolicy_mbind")
        if new >= 0 and not used:
            await swap.folio_put(m, m.physmem.page(new))
        if not moved:
            failed += 1
    return failed
