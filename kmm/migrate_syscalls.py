"""The migration system calls: move_pages(2) (mm/migrate.c) and migrate_pages(2)
(mm/mempolicy.c's kernel_migrate_pages and do_migrate_pages).

``kernel_move_pages`` with a node per address runs ``do_pages_move``: each address's
folio is isolated (``add_folio_for_migration``) and queued for its node; the queue is
migrated (``migrate_pages``, reason "syscall") whenever the node changes or a page
is not queued, and the status array gets the node reached or a negative errno per
address (-EFAULT: no VMA or the zero page; -ENOENT: nothing present; -EACCES: shared
without MPOL_MF_MOVE_ALL; -EBUSY: not isolated, e.g. the other pages of a THP the
same call already queued). Without nodes it only reports where each page is
(``do_pages_stat``). A node that does not exist fails the call with -ENODEV.
``kernel_migrate_pages`` moves every folio of the mm on an old node to the matching
new node (``do_migrate_pages``); a new node that does not exist is -EINVAL.

Left out: pids other than the caller's, cpusets (every node is allowed), hugetlb,
and MIGRATE_SYNC's waiting for a folio lock (the syscalls migrate as MIGRATE_ASYNC
does: a locked folio fails at once).
"""

from __future__ import annotations

from errno import EACCES, EBUSY, EFAULT, EINVAL, ENODEV, ENOENT

from kmm import atomic, memory, mmzone, page_alloc, rmap, swap
from kmm.pgtable import (
    HPAGE_PMD_ORDER, pmd_index, pmd_pfn, pmd_trans_huge, pte_index, pte_pfn,
    pte_present, pte_special,
)

MAX_NUMNODES = 1024  # CONFIG_NODES_SHIFT=10
NUMA_NO_NODE = -1
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2
ZERO = "zero"  # folio_walk_start found the shared zero page or the huge zero folio


# --------------------------------------------------------------- node view
def node_states_memory(m) -> range:
    """node_states[N_MEMORY]: every node of the machine has memory."""
    return range(mmzone.nr_node_ids(m))


def folio_nid(m, folio) -> int:
    """folio_nid (kmm.mmzone)."""
    return mmzone.folio_nid(m, folio)


async def alloc_migration_target(m, src, nid: int) -> int:
    """alloc_migration_target (mtc.nid = nid, GFP_HIGHUSER_MOVABLE | __GFP_THISNODE):
    a folio of the source's order on that node only; a large one with GFP_TRANSHUGE
    less the reclaim bits ("consistent with regular THP allocations")."""
    from kmm.gfp import GFP, __GFP_RECLAIM, __GFP_THISNODE
    gfp = GFP["GFP_HIGHUSER_MOVABLE"] | __GFP_THISNODE
    if src.order:
        gfp = (gfp & ~__GFP_RECLAIM) | GFP["GFP_TRANSHUGE"]
    purpose = "thp" if src.order == HPAGE_PMD_ORDER else "anon"
    return await page_alloc.alloc_pages(m, src.order, gfp, purpose, nid)


# ------------------------------------------------------------ folio_walk
async def folio_walk_start(m, vma, addr: int):
    """folio_walk_start(FW_ZEROPAGE): the folio mapped at addr and the page-table lock
    that keeps it mapped, (folio, ptl); (ZERO, None) for the zero page or the huge
    zero folio; (None, None) when nothing is present (none, swap or migration entry).
    Context: mmap_lock held; returns with ptl held when a folio is found."""
    pmd_tbl = memory.pmd_lookup(m, vma.mm, addr)
    if pmd_tbl < 0:
        return None, None
    idx = pmd_index(addr)
    if pmd_trans_huge(await atomic.entry_read(m, "pmd", pmd_tbl, idx)):
        ptl = m.table_lock(pmd_tbl)
        await ptl.lock("folio_walk_start")
        pmd = await atomic.entry_read(m, "pmd", pmd_tbl, idx)
        if pmd_trans_huge(pmd):
            if m.is_huge_zero_pfn(pmd_pfn(pmd)):
                await ptl.unlock()
                return ZERO, None
            return m.physmem.folio(pmd_pfn(pmd)), ptl
        await ptl.unlock()  # split meanwhile: look at the PTE
    res = await memory.pte_offset_map_lock(m, pmd_tbl, idx)
    if res is None:
        return None, None
    tbl, ptl = res
    pte = await atomic.entry_read(m, "pte", tbl, pte_index(addr))
    if pte_present(pte):
        if pte_special(pte):
            await ptl.unlock()
            return ZERO, None
        return m.physmem.folio(pte_pfn(pte)), ptl
    await ptl.unlock()
    return None, None


# ------------------------------------------------------------- move_pages
async def add_folio_for_migration(m, mm, addr: int, node: int, pagelist: list,
                                  migrate_all: bool) -> int:
    """add_folio_for_migration: 1 when the folio at addr was isolated onto pagelist, 0
    when it is on ``node`` already, else -EFAULT / -ENOENT / -EACCES / -EBUSY.
    Context: takes mmap_lock for read and the page-table lock."""
    await mm.mmap_lock.down_read("add_folio_for_migration")
    err = -EFAULT
    vma = mm.find_vma(addr)
    if vma is not None and vma.start <= addr and vma.vm_file is None:
        folio, ptl = await folio_walk_start(m, vma, addr)
        if folio is None:
            err = -ENOENT
        elif folio is ZERO:
            err = -EFAULT
        else:
            err = await __add_folio_for_migration(m, folio, node, pagelist, migrate_all)
            await ptl.unlock()  # folio_walk_end
    await mm.mmap_lock.up_read()
    return err


async def __add_folio_for_migration(m, folio, node: int, pagelist: list,
                                    migrate_all: bool) -> int:
    if folio_nid(m, folio) == node:
        return 0
    if rmap.folio_maybe_mapped_shared(m, folio) and not migrate_all:
        return -EACCES
    if await swap.folio_isolate_lru(m, folio):
        pagelist.append(folio)
        return 1
    return -EBUSY


async def move_pages_and_store_status(m, node: int, pagelist: list, status: list,
                                      start: int, i: int, nr_pages: int) -> int:
    """move_pages_and_store_status: migrate the queue to node; on success the queued
    entries [start, i) of status become node; else the number not migrated, plus the
    pages not yet tried."""
    from kmm import migrate
    if not pagelist:
        return 0
    folios = list(pagelist)
    pagelist.clear()
    _, err = await migrate.migrate_pages(
        m, folios, lambda f: alloc_migration_target(m, f, node), "syscall")
    if err:
        return err + nr_pages - i
    status[start:i] = [node] * (i - start)
    return 0


async def do_pages_move(m, mm, pages: list[int], nodes: list[int], flags: int,
                        status: list[int]) -> int:
    """do_pages_move: 0, the number of pages not migrated, or -ENODEV for a node
    without memory (status filled up to it)."""
    memory_nodes = node_states_memory(m)
    pagelist: list = []
    current_node = NUMA_NO_NODE
    start = 0
    nr = len(pages)
    err = 0
    i = 0
    while i < nr:
        addr, node = pages[i], nodes[i]
        if node < 0 or node >= MAX_NUMNODES or node not in memory_nodes:
            err = -ENODEV
            break
        if current_node == NUMA_NO_NODE:
            current_node, start = node, i
        elif node != current_node:
            err = await move_pages_and_store_status(m, current_node, pagelist, status,
                                                    start, i, nr)
            if err:
                return err
            current_node, start = node, i
        err = await add_folio_for_migration(m, mm, addr, current_node, pagelist,
                                            bool(flags & MPOL_MF_MOVE_ALL))
        if err > 0:  # queued
            i += 1
            continue
        status[i] = err if err else current_node
        err = await move_pages_and_store_status(m, current_node, pagelist, status,
                                                start, i, nr)
        if err:
            return err - 1 if err > 0 else err  # "we have accounted for page i"
        current_node = NUMA_NO_NODE
        i += 1
    if not pagelist:
        return err
    err1 = await move_pages_and_store_status(m, current_node, pagelist, status, start, i, nr)
    return err1 if err >= 0 else err


async def do_pages_stat(m, mm, pages: list[int], status: list[int]) -> None:
    """do_pages_stat_array: the node of each page, -EFAULT (no VMA, zero page) or
    -ENOENT (nothing present). Context: takes mmap_lock for read."""
    await mm.mmap_lock.down_read("do_pages_stat_array")
    for i, addr in enumerate(pages):
        err = -EFAULT
        vma = mm.find_vma(addr)
        if vma is not None and vma.start <= addr:
            folio, ptl = await folio_walk_start(m, vma, addr)
            if folio is None:
                err = -ENOENT
            elif folio is not ZERO:
                err = folio_nid(m, folio)
                await ptl.unlock()
        status[i] = err
    await mm.mmap_lock.up_read()


async def kernel_move_pages(m, task, pages: list[int], nodes: list[int] | None,
                            flags: int) -> tuple[int, list[int]]:
    """kernel_move_pages(pid 0, ...): (the return value, the status array). Entries the
    kernel does not write stay 0."""
    status = [0] * len(pages)
    if flags & ~(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL):
        return -EINVAL, status
    if nodes is None:
        await do_pages_stat(m, task.mm, pages, status)
        return 0, status
    return await do_pages_move(m, task.mm, pages, nodes, flags, status), status


# ---------------------------------------------------------- migrate_pages
async def migrate_to_node(m, mm, source: int, dest: int, flags: int) -> int:
    """migrate_to_node: queue every folio of the mm on node source (queue_pages_range
    over all VMAs; a shared one only with MPOL_MF_MOVE_ALL) and migrate the queue to
    dest. Returns the number of folios not migrated."""
    from kmm import migrate, pagewalk
    pagelist: list = []
    seen: set[int] = set()
    await mm.mmap_lock.down_read("migrate_to_node")
    for vma in list(mm.vmas):
        if vma.vm_file is not None:
            continue
        for addr, _level, _e in list(pagewalk.walk_leaves(m, mm, vma.start, vma.end)):
            folio, ptl = await folio_walk_start(m, vma, addr)
            if folio is None or folio is ZERO:
                continue
            if folio.pfn not in seen and folio_nid(m, folio) == source and (
                    flags & MPOL_MF_MOVE_ALL or not rmap.folio_maybe_mapped_shared(m, folio)):
                seen.add(folio.pfn)
                if await swap.folio_isolate_lru(m, folio):  # migrate_folio_add
                    pagelist.append(folio)
            await ptl.unlock()
    await mm.mmap_lock.up_read()
    if not pagelist:
        return 0
    _, failed = await migrate.migrate_pages(
        m, pagelist, lambda f: alloc_migration_target(m, f, dest), "syscall")
    return failed


async def kernel_migrate_pages(m, task, old_nodes: list[int], new_nodes: list[int]) -> int:
    """kernel_migrate_pages(pid 0, ...) -> do_migrate_pages: each old node's folios go
    to the new node at the same position (node_remap); the number not migrated, or
    -EINVAL when no new node has memory."""
    memory_nodes = node_states_memory(m)
    old = sorted({n for n in old_nodes if 0 <= n < MAX_NUMNODES})
    new = sorted({n for n in new_nodes if n in memory_nodes})  # nodes_and(mems_allowed)
    if not new:
        return -EINVAL
    nr_failed = 0
    tmp = list(old)
    while tmp:
        source = dest = NUMA_NO_NODE
        for s in tmp:
            if len(old) != len(new) and s in new:
                continue
            d = new[old.index(s) % len(new)]  # node_remap
            if s == d:
                continue
            source, dest = s, d
            break
        if source == NUMA_NO_NODE:
            break
        tmp.remove(source)
        nr_failed += await migrate_to_node(m, task.mm, source, dest, MPOL_MF_MOVE_ALL)
    return nr_failed
