"""Multi-size anonymous THP (mTHP): which orders a VMA may use, and the per-size stats.

mm/huge_memory.c and include/linux/huge_mm.h (6.8+). Every order from 2 (16 KiB) to
PMD order (2 MiB) has its own folder ``hugepages-<size>kB`` with an ``enabled`` knob
(always | inherit | madvise | never; "inherit" follows the global ``enabled``) and a
``stats/`` folder. ``thp_vma_allowable_orders`` turns the knobs and the VMA's flags into
a bit mask of orders; ``thp_vma_suitable_orders`` drops the orders whose naturally
aligned block around the fault address does not fit in the VMA. Sub-PMD orders are
always mapped by PTEs (memory_anon.alloc_anon_folio); the PMD order keeps its own
fault path (huge_memory.do_huge_pmd_anonymous_page).

The stats are counted where the kernel counts them (count_mthp_stat / mod_mthp_stat)
and kept per order on ``m.vmstat.mthp``; ``mthp_report`` gives the report's ``mthp``
section (design.md section 5, extended: the change of every file that moved).
Left out: shmem/file sizes (their knobs are stored only), zswap (zswpout never moves),
memcg charging (anon_fault_fallback_charge and swpin_fallback_charge never move).
"""

from __future__ import annotations

from kmm.mm_types import VM_HUGEPAGE, VM_HUGETLB, VM_NOHUGEPAGE
from kmm.sysfs import ANON_ORDERS, HPAGE_PMD_ORDER, size_dir
from kmm.vmstat import MTHP_ANON_STATS, MTHP_FILE_STATS

PAGE_SIZE = 4096

# hugepages-<size>kB/stats/ (kept on m.vmstat, whose mod_mthp_stat counts them)
ANON_STATS = MTHP_ANON_STATS
FILE_ONLY_STATS = MTHP_FILE_STATS
GAUGES = frozenset({"nr_anon", "nr_anon_partially_mapped"})
THP_ORDERS_ALL_ANON = sum(1 << o for o in ANON_ORDERS)  # orders 2..PMD_ORDER


def stat_names(order: int) -> tuple[str, ...]:
    return ANON_STATS if order in ANON_ORDERS else FILE_ONLY_STATS


def mod_mthp_stat(m, order: int, item: str, delta: int) -> None:
    """mod_mthp_stat: orders 0 and above PMD order have no folder."""
    m.vmstat.mod_mthp_stat(order, item, delta)


def count_mthp_stat(m, order: int, item: str) -> None:
    mod_mthp_stat(m, order, item, 1)


def mthp_stats(m) -> dict[str, dict[str, int]]:
    """Every hugepages-<size>kB/stats/ file, by folder."""
    out = {}
    for order in range(1, HPAGE_PMD_ORDER + 1):
        got = m.vmstat.mthp.get(order, {})
        out[size_dir(order)] = {n: got.get(n, 0) for n in stat_names(order)}
    return out


def mthp_report(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """The report's ``mthp``: per folder, the files whose value changed, by how much;
    folders where nothing moved are left out (so old recordings stay valid)."""
    out: dict[str, dict[str, int]] = {}
    for folder, stats in after.items():
        prev = before.get(folder, {})
        moved = {n: v - prev.get(n, 0) for n, v in stats.items() if v != prev.get(n, 0)}
        if moved:
            out[folder] = moved
    return out


# ------------------------------------------------------------------ eligibility
def highest_order(orders: int) -> int:
    return orders.bit_length() - 1


def next_order(orders: int, prev: int) -> tuple[int, int]:
    """next_order: drop ``prev`` from the mask; return (mask, the next highest order)."""
    orders &= ~(1 << prev)
    return orders, highest_order(orders)


def hugepage_global_enabled(m) -> bool:
    return m.sysfs.enabled != "never"


def thp_vma_allowable_orders(m, vma, tva: str, orders: int) -> int:
    """thp_vma_allowable_orders for an anonymous VMA: the orders of ``orders`` the
    per-size knobs allow (always; madvise with VM_HUGEPAGE; inherit when the global
    knob is always, or madvise with VM_HUGEPAGE), then __thp_vma_allowable_orders.

    tva is "smaps", "pagefault", "khugepaged" or "forced_collapse" (enum tva_type);
    forced collapse (MADV_COLLAPSE) ignores the knobs.
    """
    flags = vma.flags
    if tva != "forced_collapse":
        sysfs = m.sysfs
        mask = sysfs.anon_orders_always
        if flags & VM_HUGEPAGE:
            mask |= sysfs.anon_orders_madvise
        enabled = sysfs.enabled
        if enabled == "always" or (flags & VM_HUGEPAGE and enabled != "never"):
            mask |= sysfs.anon_orders_inherit
        orders &= mask
        if not orders:
            return 0
    return __thp_vma_allowable_orders(m, vma, tva, orders)


def __thp_vma_allowable_orders(m, vma, tva: str, orders: int) -> int:
    """__thp_vma_allowable_orders: anonymous orders only (THP_ORDERS_ALL_ANON);
    VM_NOHUGEPAGE refuses all; outside faults the VMA must hold a whole block of some
    order ending at vm_end, and (except smaps) have an anon_vma."""
    orders &= THP_ORDERS_ALL_ANON
    if not orders or vma.flags & (VM_NOHUGEPAGE | VM_HUGETLB):
        return 0  # VM_HUGETLB: hugetlb VMAs are never THP-eligible
    if tva != "pagefault":
        order = highest_order(orders)
        while orders:
            if thp_vma_suitable_order(vma, vma.end - (PAGE_SIZE << order), order):
                break
            orders, order = next_order(orders, order)
        if not orders:
            return 0
        if tva != "smaps" and vma.anon_vma is None:
            return 0
    return orders


def thp_vma_suitable_order(vma, addr: int, order: int) -> bool:
    """thp_vma_suitable_order: the naturally aligned block of ``order`` around addr
    lies inside the VMA."""
    size = PAGE_SIZE << order
    haddr = addr & ~(size - 1)
    return vma.start <= haddr and haddr + size <= vma.end


def thp_vma_suitable_orders(vma, addr: int, orders: int) -> int:
    """thp_vma_suitable_orders: keep the orders whose aligned block fits the VMA."""
    out = 0
    o = orders
    while o:
        order = highest_order(o)
        o &= ~(1 << order)
        if thp_vma_suitable_order(vma, addr, order):
            out |= 1 << order
    return out


# ------------------------------------------------------------------- views
def region_folio_kb(m, mm, start: int, end: int) -> dict[str, int]:
    """What tools/mm/thpmaps shows of a range: kB mapped by PTEs of anonymous large
    folios below PMD order, per folio size ("64kB": 192). PMD-mapped THPs are
    AnonHugePages already; PTE-mapped pages of order-0 and PMD-order folios are not
    listed, so ranges without mTHPs give {} (and the report omits the field)."""
    from kmm import pagewalk
    from kmm.pgtable import pte_pfn, pte_present, pte_special
    out: dict[int, int] = {}
    pm = m.physmem
    for _addr, level, entry in pagewalk.walk_leaves(m, mm, start, end):
        if level != "pte" or not pte_present(entry) or pte_special(entry):
            continue
        folio = pm.folio(pte_pfn(entry))
        if 2 <= folio.order < HPAGE_PMD_ORDER and folio.anon_vma is not None:
            out[folio.order] = out.get(folio.order, 0) + 4
    return {f"{4 << o}kB": kb for o, kb in sorted(out.items())}


def folio_clear_partially_mapped(m, folio) -> None:
    """folio_clear_partially_mapped, with the nr_anon_partially_mapped gauge.
    Context: split_queue_lock held (or the folio frozen)."""
    from kmm import atomic
    from kmm.mm_types import PG_partially_mapped
    if folio.flags & PG_partially_mapped:
        atomic.folio_clear_flags_locked(folio, PG_partially_mapped)
        mod_mthp_stat(m, folio.order, "nr_anon_partially_mapped", -1)
