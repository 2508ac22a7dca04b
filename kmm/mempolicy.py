"""NUMA memory policy: mm/mempolicy.c.

A policy (struct mempolicy) says where a task's or a VMA's pages are allocated:
``MPOL_DEFAULT`` (no policy of its own: the VMA falls back to the task's, the task to
local), ``MPOL_LOCAL`` (the node of the CPU that allocates), ``MPOL_PREFERRED`` (one
node first, then the usual fallback), ``MPOL_BIND`` (only the given nodes) and
``MPOL_INTERLEAVE`` (round robin over the nodes: a VMA's pages by their index, a
task's other allocations in turn). ``set_mempolicy`` sets the task's, ``mbind`` a
range's (splitting VMAs, with MPOL_MF_STRICT / MPOL_MF_MOVE acting on the pages
already there). ``vma_alloc_folio`` is where the fault path and THP allocation meet
the policy (``alloc_pages_mpol``: a PMD-size folio of a non-interleave policy that
allows the local or preferred node is first tried there alone, __GFP_THISNODE |
__GFP_NORETRY).

Nodemasks are Python sets (or None: no mask). The syscalls take a list of node ids
where the kernel takes a bitmap: an id outside 0..MAX_NUMNODES-1 is EINVAL as a bit
above the bitmap would be (get_nodes); ids of nodes the machine does not have are
dropped (nodes_and with the nodes that have memory) and a mask left empty is EINVAL.
Left out: MPOL_PREFERRED_MANY and MPOL_WEIGHTED_INTERLEAVE (EINVAL here), the mode
flags MPOL_F_STATIC_NODES / RELATIVE_NODES / NUMA_BALANCING, home nodes
(set_mempolicy_home_node), cpusets, shared (shmem) policies, and get_mempolicy.
MPOL_MF_MOVE moves order-0 folios (kmm.migrate.migrate_pages); a large folio that
would have to move counts as not moved.
"""

from __future__ import annotations

from kmm import mmzone, page_alloc
from kmm.gfp import (
    GFP, __GFP_COMP, __GFP_DIRECT_RECLAIM, __GFP_NORETRY, __GFP_RETRY_MAYFAIL,
    __GFP_THISNODE,
)
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SHIFT, PAGE_SIZE

# include/uapi/linux/mempolicy.h
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE, MPOL_MAX = 5, 6, 7
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2
MPOL_MF_VALID = MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL
MAX_NUMNODES = 1 << 10  # CONFIG_NODES_SHIFT=10, as the distributions' x86-64 kernels
NO_INTERLEAVE_INDEX = -1

MODES = {"default": MPOL_DEFAULT, "preferred": MPOL_PREFERRED, "bind": MPOL_BIND,
         "interleave": MPOL_INTERLEAVE, "local": MPOL_LOCAL}
MODE_NAMES = {v: k for k, v in MODES.items()}
FLAGS = {"strict": MPOL_MF_STRICT, "move": MPOL_MF_MOVE, "move_all": MPOL_MF_MOVE_ALL}


class Mempolicy:
    """struct mempolicy: the mode and its nodes (a frozenset)."""

    __slots__ = ("mode", "nodes")

    def __init__(self, mode: int, nodes=frozenset()) -> None:
        self.mode = mode
        self.nodes = frozenset(nodes)

    def __eq__(self, other) -> bool:  # mpol_equal
        return (isinstance(other, Mempolicy) and self.mode == other.mode
                and self.nodes == other.nodes)

    def __hash__(self) -> int:
        return hash((self.mode, self.nodes))

    def __repr__(self) -> str:
        return f"<mempolicy {MODE_NAMES.get(self.mode, self.mode)} {sorted(self.nodes)}>"


# default_policy: local allocation (get_task_policy's preferred_node_policy[nid] is
# MPOL_PREFERRED on the running node, which allocates the same way)
default_policy = Mempolicy(MPOL_LOCAL)


def mode_number(mode) -> int:
    """A mode by name (``"bind"``) or number (MPOL_BIND)."""
    if isinstance(mode, str):
        return MODES.get(mode, -1) if mode in MODES else -1
    return mode


# ------------------------------------------------------------- making one
def get_nodes(nodes) -> set | str:
    """get_nodes: the user's nodemask as a set; EINVAL for an id no bitmap of
    MAX_NUMNODES bits can hold."""
    out = set()
    for n in nodes or ():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < MAX_NUMNODES:
            return "EINVAL"
        out.add(n)
    return out


def mpol_new(m, mode: int, nodes: set) -> Mempolicy | None | str:
    """mpol_new + mpol_set_nodemask: None for MPOL_DEFAULT (no policy); MPOL_PREFERRED
    with no nodes is MPOL_LOCAL; MPOL_LOCAL takes no nodes; BIND and INTERLEAVE need
    some. The nodes are cut to the machine's (N_MEMORY): none left is EINVAL;
    MPOL_PREFERRED keeps the first. An errno name on bad input."""
    if not 0 <= mode < MPOL_MAX or mode in (MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE):
        return "EINVAL"  # sanitize_mpol_flags; the two left-out modes too
    if mode == MPOL_DEFAULT:
        return "EINVAL" if nodes else None
    if mode == MPOL_PREFERRED and not nodes:
        mode = MPOL_LOCAL
    elif mode == MPOL_LOCAL:
        if nodes:
            return "EINVAL"
    elif not nodes:
        return "EINVAL"
    if mode == MPOL_LOCAL:
        return Mempolicy(MPOL_LOCAL)
    have = {n for n in nodes if n < mmzone.nr_node_ids(m)}  # nodes_and(N_MEMORY)
    if not have:
        return "EINVAL"  # mpol_new_nodemask / mpol_new_preferred
    if mode == MPOL_PREFERRED:
        have = {min(have)}
    return Mempolicy(mode, have)


async def do_set_mempolicy(m, task, mode, nodes=()) -> int | str:
    """set_mempolicy(2) (kernel_set_mempolicy -> do_set_mempolicy): the task's policy
    for its allocations outside VMAs with one of their own. 0 or an errno name."""
    mode = mode_number(mode)
    nodes = get_nodes(nodes)
    if isinstance(nodes, str):
        return nodes
    new = mpol_new(m, mode, nodes)
    if isinstance(new, str):
        return new
    task.mempolicy = new
    task.il_prev = mmzone.MAX_NUMNODES - 1 if new is not None else 0  # il_prev reset
    return 0


def get_task_policy(task) -> Mempolicy:
    """get_task_policy: the task's policy, else the default (local)."""
    pol = getattr(task, "mempolicy", None) if task is not None else None
    return pol if pol is not None else default_policy


def get_vma_policy(m, vma, addr: int, order: int) -> tuple[Mempolicy, int]:
    """get_vma_policy: the VMA's policy, else its task's; for interleave the index of
    the folio in the VMA (vm_pgoff, then the offset, both in folios of ``order``).
    Returns (policy, ilx)."""
    pol = vma.vm_policy if vma is not None else None
    if pol is None:
        pol = get_task_policy(m.tasks.get(vma.mm.owner) if vma is not None else None)
    ilx = 0
    if pol.mode == MPOL_INTERLEAVE and vma is not None:
        ilx = (vma.pgoff >> order) + ((addr - vma.start) >> (PAGE_SHIFT + order))
    return pol, ilx


# ---------------------------------------------------------------- allocating
def interleave_nid(pol: Mempolicy, ilx: int) -> int:
    """interleave_nid: the (ilx mod n)-th node of the policy's n nodes."""
    nodes = sorted(pol.nodes)
    return nodes[ilx % len(nodes)]


def interleave_nodes(m, pol: Mempolicy, task=None) -> int:
    """interleave_nodes: the task's next node after il_prev, round robin (an
    allocation outside a VMA: NO_INTERLEAVE_INDEX; the fault path always has one)."""
    nodes = sorted(pol.nodes)
    prev = getattr(task, "il_prev", -1) if task is not None else -1
    nid = next((n for n in nodes if n > prev), nodes[0])  # next_node_in
    if task is not None:
        task.il_prev = nid
    return nid


def policy_nodemask(m, gfp: int, pol: Mempolicy, ilx: int, nid: int) -> tuple[set | None, int]:
    """policy_nodemask: the nodemask the allocation is confined to (BIND's nodes;
    None otherwise) and the preferred node (PREFERRED's node, INTERLEAVE's node for
    ilx, else the given one). Returns (nodemask, nid)."""
    if pol.mode == MPOL_PREFERRED:
        return None, min(pol.nodes)
    if pol.mode == MPOL_BIND:
        return set(pol.nodes), nid
    if pol.mode == MPOL_INTERLEAVE:
        return None, (interleave_nodes(m, pol) if ilx == NO_INTERLEAVE_INDEX
                      else interleave_nid(pol, ilx))
    return None, nid


async def alloc_pages_mpol(m, gfp: int, order: int, pol: Mempolicy, ilx: int, nid: int,
                           purpose: str) -> int:
    """alloc_pages_mpol: allocate following the policy. A PMD-order folio of a policy
    that is not interleave and allows ``nid`` is first tried on that node alone without
    reclaim ("don't reclaim unnecessarily, just compact"); only a mask that allows
    direct reclaim then tries again the ordinary way (any node of the zonelist within
    the mask). An interleaved page that landed on its node counts numa_interleave.
    Returns the pfn, or -1."""
    nodemask, nid = policy_nodemask(m, gfp, pol, ilx, nid)
    if order == HPAGE_PMD_ORDER and ilx != NO_INTERLEAVE_INDEX:
        if pol.mode != MPOL_INTERLEAVE and (nodemask is None or nid in nodemask):
            pfn = await page_alloc.alloc_pages(m, order, gfp | __GFP_THISNODE | __GFP_NORETRY,
                                               "thp", nid)
            if pfn >= 0 or not gfp & __GFP_DIRECT_RECLAIM:
                return pfn
    pfn = await page_alloc.alloc_pages(m, order, gfp, purpose, nid, nodemask)
    if pol.mode == MPOL_INTERLEAVE and pfn >= 0 and mmzone.page_to_nid(m, pfn) == nid:
        mmzone.count_numa_event(mmzone.page_zone(m, pfn), "numa_interleave")
    return pfn


async def vma_alloc_folio(m, gfp, order: int, vma, addr: int) -> int:
    """vma_alloc_folio: a folio of ``order`` for the fault at addr in vma, following the
    VMA's (else the task's) policy, preferring the running CPU's node. Returns the
    pfn, or -1."""
    if isinstance(gfp, str):
        gfp = GFP[gfp]
    pol, ilx = get_vma_policy(m, vma, addr, order)
    return await alloc_pages_mpol(m, gfp, order, pol, ilx, mmzone.numa_node_id(m),
                                  "thp" if order else "anon")


# ------------------------------------------------------------------- mbind
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
    nodes = get_nodes(nodes)
    if isinstance(nodes, str):
        return nodes
    new = mpol_new(m, mode, nodes)
    if isinstance(new, str):
        return new
    if end == start:
        return 0
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
            if not folio.order and await swap.folio_isolate_lru(m, folio):
                misplaced.append((vma, addr, folio))
            else:
                nr_failed += 1  # a large folio: whole-THP migration is issue 14 item 3
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


async def migrate_misplaced_to_policy(m, queued: list, pol: Mempolicy) -> int:
    """The migrate half of do_mbind (after mmap_lock is dropped, as there): move each
    isolated order-0 folio to a folio that ``pol`` allocates
    (alloc_migration_target_by_mpol: the folio's interleave index,
    GFP_HIGHUSER_MOVABLE | __GFP_RETRY_MAYFAIL) with kmm.migrate.migrate_pages (reason
    "mempolicy_mbind"). Returns the folios not moved."""
    from kmm import migrate, swap
    failed = 0
    for vma, addr, folio in queued:
        _, ilx = get_vma_policy(m, vma, addr, folio.order) if pol.mode == MPOL_INTERLEAVE \
            else (pol, 0)
        gfp = GFP["GFP_HIGHUSER_MOVABLE"] | __GFP_RETRY_MAYFAIL | __GFP_COMP
        new = await alloc_pages_mpol(m, gfp, 0, pol, ilx, mmzone.numa_node_id(m), "anon")
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
