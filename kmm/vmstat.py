"""/proc/vmstat event counters and the smaps figures of a VMA.

mm/vmstat.c and include/linux/vm_event_item.h: ``count_vm_event`` bumps one named event.
``THP_EVENTS`` lists every thp_* line of Linux 6.18's /proc/vmstat in the kernel's order
(read off the host's /proc/vmstat), so a report names exactly the kernel's counters.
"""

from __future__ import annotations

THP_EVENTS: tuple[str, ...] = (
    "thp_migration_success",
    "thp_migration_fail",
    "thp_migration_split",
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_fault_fallback_charge",
    "thp_collapse_alloc",
    "thp_collapse_alloc_failed",
    "thp_file_alloc",
    "thp_file_fallback",
    "thp_file_fallback_charge",
    "thp_file_mapped",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_deferred_split_page",
    "thp_underused_split_page",
    "thp_split_pmd",
    "thp_scan_exceed_none_pte",
    "thp_scan_exceed_swap_pte",
    "thp_scan_exceed_share_pte",
    "thp_split_pud",
    "thp_zero_page_alloc",
    "thp_zero_page_alloc_failed",
    "thp_swpout",
    "thp_swpout_fallback",
)

# Counters that grow with every khugepaged pass over a refused range (mm/khugepaged.c
# rescans it on every pass): the host and the emulator agree on whether they moved, not
# by how much.
PER_PASS_EVENTS = frozenset(
    {"thp_scan_exceed_none_pte", "thp_scan_exceed_swap_pte", "thp_scan_exceed_share_pte"}
)

# Other vm events and node stats the machine keeps (not part of the thp_* report).
OTHER_EVENTS: tuple[str, ...] = (
    "pgfault",
    "pgmajfault",
    "pgalloc_normal",
    "pgfree",
    "cow_ksm",
    # compaction (mm/compaction.c, mm/page_alloc.c), in /proc/vmstat's order
    "compact_migrate_scanned",
    "compact_free_scanned",
    "compact_isolated",
    "compact_stall",
    "compact_fail",
    "compact_success",
    "compact_daemon_wake",
    "compact_daemon_migrate_scanned",
    "compact_daemon_free_scanned",
    "pgmigrate_success",
    "pgmigrate_fail",
    # swap and reclaim (mm/page_io.c, mm/vmscan.c, mm/shrinker.c)
    "pswpin",
    "pswpout",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pglazyfreed",
    "pgrefill",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgscan_anon",
    "pgscan_file",
    "pgsteal_anon",
    "pgsteal_file",
    "slabs_scanned",
    "kswapd_low_wmark_hit_quickly",
    "kswapd_high_wmark_hit_quickly",
    "pageoutrun",
    "allocstall_normal",
    # hugetlb pool growth from the buddy allocator (mm/hugetlb.c)
    "htlb_buddy_alloc_success",
    "htlb_buddy_alloc_fail",
    # NUMA balancing (CONFIG_NUMA_BALANCING: kmm.numa_balancing), in /proc/vmstat's order
    "numa_pte_updates",
    "numa_huge_pte_updates",
    "numa_hint_faults",
    "numa_hint_faults_local",
    "numa_pages_migrated",
)


# hugepages-<size>kB/stats/ (mm/huge_memory.c's mthp_stats), as the host lists them for
# an anonymous-capable size; order 1 (hugepages-8kB) has the file/shmem and swap ones.
MTHP_ANON_STATS: tuple[str, ...] = (
    "anon_fault_alloc", "anon_fault_declined", "anon_fault_fallback",
    "anon_fault_fallback_charge", "nr_anon", "nr_anon_partially_mapped", "shmem_alloc",
    "shmem_fallback", "shmem_fallback_charge", "split", "split_deferred", "split_failed",
    "swpin", "swpin_fallback", "swpin_fallback_charge", "swpout", "swpout_fallback",
    "zswpout",
)
MTHP_FILE_STATS: tuple[str, ...] = (
    "shmem_alloc", "shmem_fallback", "shmem_fallback_charge", "split", "split_failed",
    "swpin", "swpin_fallback", "swpin_fallback_charge", "swpout", "swpout_fallback",
    "zswpout",
)
MTHP_MAX_ORDER = 9  # PMD order: the highest folder


class VmStat:
    """The machine's event counters (vm_event_states) and node stats (vm_node_stat)."""

    __slots__ = ("events", "node", "mthp")

    def __init__(self) -> None:
        self.events: dict[str, int] = dict.fromkeys(THP_EVENTS + OTHER_EVENTS, 0)
        self.node: dict[str, int] = {
            "nr_anon_pages": 0,
            "nr_anon_transparent_hugepages": 0,
            "nr_page_table_pages": 0,
            # shared memory (meminfo Shmem, ShmemHugePages, ShmemPmdMapped; pages)
            "nr_shmem": 0,
            "nr_shmem_hugepages": 0,
            "nr_shmem_pmdmapped": 0,
            "nr_file_mapped": 0,
            "nr_file_hugepages": 0,
            "nr_file_pmdmapped": 0,
        }
        # mthp_stats: order -> the files of hugepages-<size>kB/stats/ (huge_memory_mthp)
        self.mthp: dict[int, dict[str, int]] = {}

    def mod_mthp_stat(self, order: int, item: str, delta: int) -> None:
        """mod_mthp_stat / count_mthp_stat: one file of hugepages-<size>kB/stats/;
        orders 0 and above PMD order have no folder."""
        if order <= 0 or order > MTHP_MAX_ORDER:
            return
        stats = self.mthp.get(order)
        if stats is None:
            names = MTHP_FILE_STATS if order == 1 else MTHP_ANON_STATS
            stats = self.mthp[order] = dict.fromkeys(names, 0)
        stats[item] += delta

    def count_vm_event(self, item: str, delta: int = 1) -> None:
        """count_vm_event / count_vm_events: bump one named event."""
        self.events[item] += delta

    def mod_node_page_state(self, item: str, delta: int) -> None:
        self.node[item] += delta

    def thp_lines(self) -> dict[str, int]:
        """The thp_* lines of /proc/vmstat, in the kernel's order."""
        ev = self.events
        return {name: ev[name] for name in THP_EVENTS}
