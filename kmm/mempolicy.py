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

Page tables (alloc_pages outside a VMA) follow the owning task's policy, interleave
by its il_prev in turn. mbind's side (do_mbind, queue_pages_range and the moves) is
kmm/mempolicy_mbind.py.

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
from kmm.gfp import GFP, __GFP_DIRECT_RECLAIM, __GFP_NORETRY, __GFP_THISNODE
from kmm.pgtable import HPAGE_PMD_ORDER, PAGE_SHIFT

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
    prev = getattr(task, "il_prev", -1) if task is not None else mmzone.MAX_NUMNODES
    nid = next((n for n in nodes if n > prev), nodes[0])  # next_node_in
    if task is not None:
        task.il_prev = nid
    return nid


def policy_nodemask(m, gfp: int, pol: Mempolicy, ilx: int, nid: int,
                    task=None) -> tuple[set | None, int]:
    """policy_nodemask: the nodemask the allocation is confined to (BIND's nodes;
    None otherwise) and the preferred node (PREFERRED's node, INTERLEAVE's node for
    ilx, else the given one). Returns (nodemask, nid)."""
    if pol.mode == MPOL_PREFERRED:
        return None, min(pol.nodes)
    if pol.mode == MPOL_BIND:
        return set(pol.nodes), nid
    if pol.mode == MPOL_INTERLEAVE:
        return None, (interleave_nodes(m, pol, task) if ilx == NO_INTERLEAVE_INDEX
                      else interleave_nid(pol, ilx))
    return None, nid


async def alloc_pages_mpol(m, gfp: int, order: int, pol: Mempolicy, ilx: int, nid: int,
                           purpose: str, task=None) -> int:
    """alloc_pages_mpol: allocate following the policy. A PMD-order folio of a policy
    that is not interleave and allows ``nid`` is first tried on that node alone without
    reclaim ("don't reclaim unnecessarily, just compact"); only a mask that allows
    direct reclaim then tries again the ordinary way (any node of the zonelist within
    the mask). An interleaved page that landed on its node counts numa_interleave.
    Returns the pfn, or -1."""
    nodemask, nid = policy_nodemask(m, gfp, pol, ilx, nid, task)
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
