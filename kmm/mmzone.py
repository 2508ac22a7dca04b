"""NUMA nodes: the node layout, pfn and CPU to node, zonelists and the numa_* counters.

include/linux/mmzone.h (pglist_data, NODE_DATA, page_to_nid), include/linux/topology.h
(cpu_to_node, numa_node_id, node_distance), mm/page_alloc.c (build_zonelists,
zone_statistics) and mm/vmstat.c (the numa_* lines of /proc/vmstat).

Each node is a ``vmscan.PgData`` (``m.node_data[nid]``, NODE_DATA) holding one zone
(ZONE_NORMAL; the model has no other zone), its reclaim state and its kswapd and
kcompactd. Node ``nid`` owns the pfns ``[node_start_pfn, node_start_pfn + pages)``;
nodes are laid out one after the other. Memory is split evenly (in whole 4 MiB blocks,
the last node taking the rest) unless ``node_memory`` gives each node's size; CPUs are
split evenly in ascending blocks (cpu i on node i * nodes // cpus) unless ``node_cpus``
gives each node's count. A one-node machine (the default) has exactly the zone it had
before nodes existed: the same actor, lock and watermarks.

Distances are the SLIT defaults (10 local, 20 remote); ``build_zonelists`` orders the
fallback nodes by distance, then by nid counting up from the local node (the kernel's
find_next_best_node breaks ties by node load, which spreads the fallback of equally
distant nodes round-robin: for two nodes both orders are the same).

The numa_* events are counted per zone (``zone.numa_events``) as the kernel's
``zone->per_cpu_zonestats->vm_numa_event`` are, and summed for /proc/vmstat. They are
kept on a one-node machine too (the host's single node moves numa_hit and numa_local on
every allocation), but the report shows them only for machines of more than one node,
so one-node reports stay as they were.
"""

from __future__ import annotations

from bisect import bisect_right

from kmm.gfp import __GFP_THISNODE

MAX_NUMNODES = 64
NUMA_NO_NODE = -1
LOCAL_DISTANCE = 10
REMOTE_DISTANCE = 20
# enum numa_stat_item, in /proc/vmstat's order
NUMA_EVENTS = ("numa_hit", "numa_miss", "numa_foreign", "numa_interleave", "numa_local",
               "numa_other")
NODE_ALIGN_PAGES = 1 << 10  # MAX_ORDER_NR_PAGES: nodes start on a whole buddy block
MIN_NODE_PAGES = 2 * NODE_ALIGN_PAGES  # 8 MiB: room for the watermarks of a small node


def node_layout(nr_pages: int, nodes: int, node_memory: tuple = ()) -> list[tuple[int, int]]:
    """The nodes' pfn ranges as (node_start_pfn, node_present_pages): ``node_memory``
    bytes each if given, else an even split in whole MAX_ORDER blocks (the last node
    takes what is left). Raises ValueError with a one-line reason."""
    if nodes < 1 or nodes > MAX_NUMNODES:
        raise ValueError(f"nodes must be 1..{MAX_NUMNODES}, got {nodes}")
    if node_memory:
        if len(node_memory) != nodes:
            raise ValueError(f"node_memory has {len(node_memory)} entries for {nodes} nodes")
        sizes = [b // 4096 for b in node_memory]
        for i, n in enumerate(sizes[:-1]):
            if n % NODE_ALIGN_PAGES:
                raise ValueError(f"node_memory[{i}] must be a multiple of 4MiB (a node "
                                 "starts on a whole order-10 block)")
    else:
        per = (nr_pages // nodes) & ~(NODE_ALIGN_PAGES - 1)
        sizes = [per] * (nodes - 1) + [nr_pages - per * (nodes - 1)]
    for i, n in enumerate(sizes):
        if nodes > 1 and n < MIN_NODE_PAGES:
            raise ValueError(f"node {i} would have {n * 4096} bytes; each node needs at "
                             f"least {MIN_NODE_PAGES * 4096} (8MiB)")
    out, start = [], 0
    for n in sizes:
        out.append((start, n))
        start += n
    return out


def cpu_layout(cpus: int, nodes: int, node_cpus: tuple = ()) -> list[int]:
    """cpu_to_node for every CPU: ``node_cpus[nid]`` CPUs per node in ascending order if
    given, else cpu i on node i * nodes // cpus."""
    if node_cpus:
        if len(node_cpus) != nodes:
            raise ValueError(f"node_cpus has {len(node_cpus)} entries for {nodes} nodes")
        if sum(node_cpus) != cpus:
            raise ValueError(f"node_cpus adds up to {sum(node_cpus)} CPUs, the machine "
                             f"has {cpus}")
        return [nid for nid, n in enumerate(node_cpus) for _ in range(n)]
    return [i * nodes // cpus for i in range(cpus)]


# ------------------------------------------------------------------ lookups
def nr_node_ids(m) -> int:
    """nr_node_ids: how many nodes the machine has (all online, all with memory)."""
    return len(m.node_data)


def NODE_DATA(m, nid: int = 0):
    """NODE_DATA(nid): the node's pglist_data (kmm.vmscan.PgData)."""
    return m.node_data[nid]


def page_to_nid(m, pfn: int) -> int:
    """page_to_nid: the node whose memory holds the frame."""
    starts = m.node_starts
    if len(starts) == 1:
        return 0
    return bisect_right(starts, pfn) - 1


def folio_nid(m, folio) -> int:
    """folio_nid: the node of the folio's head page."""
    return page_to_nid(m, folio.pfn)


def page_zone(m, pfn: int):
    """page_zone: the zone holding the frame (each node has one)."""
    return m.node_data[page_to_nid(m, pfn)].zone


def cpu_to_node(m, cpu: int) -> int:
    """cpu_to_node: the node a CPU belongs to."""
    return m.cpu_node[cpu]


def numa_node_id(m) -> int:
    """numa_node_id: the node of the CPU the current actor runs on. A thread's access
    made through ``Proc.on(cpu)`` runs on that CPU (kmm.fault.user_access records it);
    a per-node kernel thread (kswapd1, kcompactd1) on its own node; anything else on
    its actor's CPU (CPU 0 when it has none)."""
    if len(m.node_data) == 1:
        return 0
    actor = m.sched.current
    cpu = m.running_cpu.get(actor)
    if cpu is None:
        nid = m.actor_node.get(actor.name)
        if nid is not None:
            return nid
        cpu = actor.cpu or 0
    return m.cpu_node[cpu]


def node_distance(a: int, b: int) -> int:
    """node_distance: the SLIT defaults."""
    return LOCAL_DISTANCE if a == b else REMOTE_DISTANCE


def build_zonelists(nodes: int, nid: int) -> list[int]:
    """build_zonelists: the node order of ``nid``'s fallback zonelist (itself first,
    then by distance, then by nid counting up from it)."""
    return sorted(range(nodes), key=lambda n: (node_distance(nid, n), (n - nid) % nodes))


def node_zonelist(m, nid: int, gfp: int) -> list:
    """node_zonelist: ZONELIST_FALLBACK of ``nid``, or ZONELIST_NOFALLBACK (the node
    alone) for __GFP_THISNODE. A list of zones."""
    pg = m.node_data[nid]
    if gfp & __GFP_THISNODE:
        return [pg.zone]
    return [m.node_data[n].zone for n in pg.zonelist]


def node_wq(name: str, nid: int) -> str:
    """The name of a per-node waitqueue (pgdat->kswapd_wait, pgdat->kcompactd_wait):
    node 0's keeps the one-node name, node N's is ``name:N``."""
    return f"{name}:{nid}" if nid else name


class AllZones:
    """The zones of a machine of several nodes seen as one buddy allocator, for the
    invariant checker (kmm.checks): their free blocks, untouched ranges, is_free and
    check. ``all_zones`` gives node 0's zone itself on a one-node machine."""

    def __init__(self, m) -> None:
        self.m = m
        self.zones = [pg.zone for pg in m.node_data]

    @property
    def free_order(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for z in self.zones:
            out.update(z.free_order)
        return out

    @property
    def untouched(self) -> tuple:
        return tuple(z.untouched for z in self.zones)

    @property
    def untouched_end(self) -> tuple:
        return tuple(z.untouched_end for z in self.zones)

    @property
    def nr_free(self) -> int:
        return sum(z.nr_free for z in self.zones)

    def is_free(self, pfn: int) -> bool:
        return page_zone(self.m, pfn).is_free(pfn)

    def free_block_at(self, pfn: int):
        return page_zone(self.m, pfn).free_block_at(pfn)

    def check(self) -> list[str]:
        return [f"node {z.nid}: {e}" for z in self.zones for e in z.check()]


def all_zones(m):
    """Node 0's zone on a one-node machine, else an AllZones over every node's."""
    return m.zone if len(m.node_data) == 1 else AllZones(m)


# --------------------------------------------------------------- statistics
def zone_statistics(m, preferred_zone, z, nr_account: int = 1) -> None:
    """zone_statistics: a hit on the preferred node, else a miss on the zone used and a
    foreign on the preferred one; local or other by the allocating CPU's node."""
    ev = z.numa_events
    if z.nid == preferred_zone.nid:
        ev["numa_hit"] += nr_account
    else:
        ev["numa_miss"] += nr_account
        preferred_zone.numa_events["numa_foreign"] += nr_account
    if z.nid == numa_node_id(m):
        ev["numa_local"] += nr_account
    else:
        ev["numa_other"] += nr_account


def count_numa_event(zone, item: str, n: int = 1) -> None:
    """__count_numa_event: one numa_* event on a zone (numa_interleave)."""
    zone.numa_events[item] += n


def numa_vmstat(m) -> dict[str, int]:
    """The numa_* lines of /proc/vmstat: each event summed over the zones."""
    return {item: sum(pg.zone.numa_events[item] for pg in m.node_data)
            for item in NUMA_EVENTS}


def numa_report(m) -> dict | None:
    """Extension of the report (machines of more than one node): per node its memory,
    CPUs, free pages, buddyinfo and numa_* events (/sys/devices/system/node/nodeN/
    numastat, meminfo, and the node's line of /proc/buddyinfo). None on one node."""
    if len(m.node_data) == 1:
        return None
    out = {}
    for pg in m.node_data:
        z = pg.zone
        out[str(pg.node_id)] = {
            "start_pfn": z.zone_start_pfn, "present_pages": z.nr_pages,
            "cpus": [c for c, n in enumerate(m.cpu_node) if n == pg.node_id],
            "nr_free": z.nr_free, "buddyinfo": z.buddyinfo(), "watermarks": dict(z.wmark),
            "numastat": dict(z.numa_events),
        }
    return out
