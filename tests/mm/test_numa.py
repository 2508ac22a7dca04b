"""NUMA nodes (issue 14 item 1): the node layout, pfn and CPU to node, the allocator's
preferred node and zonelist fallback, the numa_* counters, per-node daemons, and the
[machine] keys. The host has one node: what it shows (numa_hit/numa_local moving,
the others not) is recorded below; the multi-node expectations come from the 6.18
source, named in each docstring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kmm import mmzone, page_alloc
from kmm.machine import Machine, MachineConfig
from kmm.testing import run_machine
from kmm.tools.runner import run_program

MiB = 1 << 20


def two_nodes(fn, **kw):
    kw.setdefault("memory", 256 * MiB)
    kw.setdefault("cpus", 2)
    return run_machine(fn, nodes=2, **kw)


def test_node_layout_even_split_and_cpus():
    """Node n holds the pfns after node n-1's (pglist_data node_start_pfn), memory and
    CPUs split evenly; page_to_nid/cpu_to_node answer from that layout; each node has
    its own zone, actor and lock (node 0's keep the one-node names)."""
    m = Machine(MachineConfig(memory=1 << 30, cpus=4, nodes=2))
    assert [(pg.zone.zone_start_pfn, pg.zone.nr_pages) for pg in m.node_data] == \
        [(0, 131072), (131072, 131072)]
    assert m.cpu_node == [0, 0, 1, 1]
    assert mmzone.page_to_nid(m, 131071) == 0 and mmzone.page_to_nid(m, 131072) == 1
    assert [pg.zone.actor.name for pg in m.node_data] == ["page_alloc", "page_alloc1"]
    assert m.node_data[1].zonelist == [1, 0]


def test_uneven_node_memory_and_cpus():
    """node_memory and node_cpus give each node's share (the last node may end on a
    partial order-10 block, as a node's end need not be aligned)."""
    m = Machine(MachineConfig(memory=(64 + 30) * MiB, cpus=3, nodes=2,
                              node_memory=(64 * MiB, 30 * MiB), node_cpus=(1, 2)))
    assert [(pg.zone.zone_start_pfn, pg.zone.nr_pages) for pg in m.node_data] == \
        [(0, 16384), (16384, 7680)]
    assert m.cpu_node == [0, 1, 1]
    assert not m.node_data[1].zone.check()


def test_watermarks_shared_by_managed_pages():
    """__setup_per_zone_wmarks gives each zone min_free_kbytes * its managed pages /
    all managed pages; set_recommended_min_free_kbytes counts every populated zone
    (2 * pageblock + 9 * pageblock per zone, capped at 5% of memory)."""
    m = Machine(MachineConfig(memory=1 << 30, nodes=2))
    one = Machine(MachineConfig(memory=1 << 30))
    assert m.zone.min_free_kbytes == 512 * 2 * 11 * 4  # two zones' recommendation
    assert one.zone.min_free_kbytes == 512 * 11 * 4
    assert [pg.zone.wmark["min"] for pg in m.node_data] == [5632, 5632]


def test_allocation_prefers_the_running_cpus_node():
    """__alloc_pages with numa_node_id() preferred: a fault on CPU 1 allocates on node 1
    (get_page_from_freelist takes the zonelist's first zone with room); zone_statistics
    counts numa_hit and numa_local there."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(4 * MiB)
        await p.madvise(a, 4 * MiB, "nohugepage")
        before = k.numastat(1)
        await p.on(1).touch(a, 64 * 4096)
        return p.numa_maps(a, 4 * MiB), before, k.numastat(1)
    _, (maps, before, after) = two_nodes(fn)
    assert maps == {"pages": {"1": 64}}
    assert after["numa_hit"] - before["numa_hit"] >= 64
    assert after["numa_local"] - before["numa_local"] == after["numa_hit"] - before["numa_hit"]
    assert after["numa_miss"] == after["numa_other"] == 0


def test_full_node_falls_back_with_miss_and_foreign():
    """get_page_from_freelist walks node 0's zonelist: node 0 below its low watermark,
    the page comes from node 1; zone_statistics: numa_miss (and numa_other: the CPU is
    on node 0) on node 1, numa_foreign on node 0, the preferred zone."""
    async def fn(m, k):
        while await k.alloc_kernel_pages(0, reserves=True, node=0) >= 0:
            pass
        p = await k.process()
        a = await p.mmap(4 * MiB)
        await p.madvise(a, 4 * MiB, "nohugepage")
        n0, n1 = k.numastat(0), k.numastat(1)
        await p.on(0).touch(a, 16 * 4096)
        return p.numa_maps(a, 4 * MiB), n0, n1, k.numastat(0), k.numastat(1)
    _, (maps, n0, n1, a0, a1) = two_nodes(fn, memory=64 * MiB)
    assert maps == {"pages": {"1": 16}}
    assert a1["numa_miss"] - n1["numa_miss"] >= 16
    assert a1["numa_other"] - n1["numa_other"] == a1["numa_miss"] - n1["numa_miss"]
    assert a0["numa_foreign"] - n0["numa_foreign"] == a1["numa_miss"] - n1["numa_miss"]
    assert a0["numa_hit"] == n0["numa_hit"]


def test_thisnode_never_falls_back():
    """__GFP_THISNODE selects ZONELIST_NOFALLBACK (node_zonelist): node 0 full, the
    allocation fails although node 1 is free."""
    async def fn(m, k):
        while await k.alloc_kernel_pages(0, reserves=True, node=0) >= 0:
            pass
        return (await k.alloc_kernel_pages(0, node=0),
                mmzone.page_to_nid(m, await k.alloc_kernel_pages(0)))
    _, (thisnode, anynode) = two_nodes(fn, memory=64 * MiB)
    assert thisnode == -1 and anynode == 1


def test_one_node_counters_move_as_on_the_host():
    """The host (one node, Linux 6.18) moved numa_hit and numa_local by 4282 for 4096
    4K faults (page tables and other tasks' allocations included), numa_miss,
    numa_foreign and numa_other by 0; with mbind(MPOL_INTERLEAVE, {0}), numa_interleave
    by exactly 4096 for 4096 faults (alloc_pages_mpol: the page landed on its
    interleave node). A one-node kmm machine: the same, counting only its own."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(32 * MiB)
        await p.madvise(a, 32 * MiB, "nohugepage")
        s0 = k.numastat()
        await p.touch(a, 4096 * 4096)
        s1 = k.numastat()
        b = await p.mmap(32 * MiB)
        await p.madvise(b, 32 * MiB, "nohugepage")
        await p.mbind(b, 32 * MiB, "interleave", [0])
        await p.touch(b, 4096 * 4096)
        return s0, s1, k.numastat()
    m, (s0, s1, s2) = run_machine(fn, memory=256 * MiB)
    d = {e: s1[e] - s0[e] for e in s1}
    assert d["numa_hit"] == d["numa_local"] >= 4096
    assert d["numa_miss"] == d["numa_foreign"] == d["numa_other"] == d["numa_interleave"] == 0
    assert s2["numa_interleave"] - s1["numa_interleave"] == 4096
    assert len(m.node_data) == 1


def test_one_node_report_has_no_numa_keys(tmp_path):
    """The report contract: a one-node machine's report is the report before nodes
    existed (no ``numa`` key, no ``numa_maps`` per region); two nodes add both."""
    prog = tmp_path / "p.py"
    prog.write_text("async def main(k):\n    p = await k.process()\n"
                    "    a = await p.mmap(2 << 20)\n    await p.touch(a, 4096)\n")
    rep = run_program(str(prog))
    assert "numa" not in rep and all("numa_maps" not in r for r in rep["regions"].values())
    prog.write_text('MACHINE = {"nodes": 2, "memory": "64MiB"}\n' + prog.read_text())
    rep = run_program(str(prog))
    assert set(rep["numa"]["nodes"]) == {"0", "1"}
    (region,) = rep["regions"].values()
    assert region["numa_maps"] == {"pages": {"0": 1}}


def test_per_node_kswapd_and_kcompactd(tmp_path):
    """Each node runs its own kswapd and kcompactd (kswapd_run / kcompactd_run per
    online node): the actors kswapd1 and kcompactd1 exist beside node 0's."""
    prog = tmp_path / "p.py"
    prog.write_text('MACHINE = {"nodes": 2, "memory": "64MiB"}\n'
                    "async def main(k):\n"
                    "    return sorted(a.name for a in k.machine.sched.actors "
                    "if a.kind == 'daemon')\n")
    rep = run_program(str(prog))
    assert {"kswapd", "kswapd1", "kcompactd", "kcompactd1"} <= set(rep["result"])


def test_remote_node_pressure_wakes_that_nodes_kswapd():
    """wake_all_kswapds wakes the kswapd of each node in the zonelist
    (wakeup_kswapd(zone)): an allocation failing its fast path on node 1 records the
    order in node 1's pgdat and wakes kswapd_wait:1."""
    from kmm import vmscan_node

    async def fn(m, k):
        await vmscan_node.wakeup_kswapd(m, 3, "GFP_KERNEL", 1)
        return m.node_data[1].kswapd_order, m.node_data[0].kswapd_order
    _, (o1, o0) = two_nodes(fn)
    assert (o1, o0) == (3, 0)


@pytest.mark.parametrize("machine, msg", [
    ('nodes = 0', "[machine] nodes: must be 1..64, got 0"),
    ('nodes = 2\nnode_cpus = [1]', "[machine] node_cpus: has 1 entries, the machine has 2 nodes"),
    ('nodes = 2\nnode_cpus = [1, 2]', "[machine] node_cpus: node_cpus adds up to 3 CPUs"),
    ('memory = "64MiB"\nnodes = 2\nnode_memory = ["32MiB", "16MiB"]',
     "[machine] node_memory: adds up to 50331648 bytes, memory is 67108864"),
    ('memory = "16MiB"\nnodes = 4', "[machine] nodes: node 0 would have 4194304 bytes"),
    ('nodes = 2\nnode_memory = ["30MiB", "34MiB"]',
     "[machine] node_memory: node_memory[0] must be a multiple of 4MiB"),
])
def test_bad_machine_keys_exit_2(tmp_path, machine, msg):
    """Bad [machine] node keys: exit 2 and one line naming the file, table and key."""
    f = tmp_path / "s.toml"
    f.write_text(f'[machine]\n{machine}\n[[steps]]\nop = "mmap"\nregion = "a"\n'
                 'size = "2MiB"\n')
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"{f}: {msg}" in r.stderr


def test_two_node_scenario_report(tmp_path):
    """A scenario on two nodes: the fault on CPU 0 fills node 0 (local first), the
    report's numa section and the region's numa_maps say so."""
    f = tmp_path / "s.toml"
    f.write_text('[machine]\nmemory = "128MiB"\nnodes = 2\n[thp]\nenabled = "always"\n'
                 '[[steps]]\nop = "mmap"\nregion = "a"\nsize = "4MiB"\n'
                 '[[steps]]\nop = "touch"\nregion = "a"\n')
    r = subprocess.run([sys.executable, "-m", "kmm", "run", "--json", str(f)],
                       capture_output=True, text=True, check=True)
    rep = json.loads(r.stdout)
    assert rep["regions"]["main/a"]["numa_maps"] == {"pages": {"0": 1024}, "huge": {"0": 2}}
    assert rep["numa"]["vmstat"]["numa_miss"] == 0
    assert rep["numa"]["nodes"]["1"]["cpus"] == [1]


def test_free_goes_back_to_the_pages_node():
    """__free_pages returns a page to its own zone (page_zone): node 1's free count is
    back after freeing a node-1 page."""
    async def fn(m, k):
        z1 = m.node_data[1].zone
        before = z1.nr_free
        pfn = await page_alloc.alloc_pages(m, 0, "GFP_KERNEL", "unmovable", 1)
        mid = z1.nr_free
        await k.free_kernel_pages(pfn)
        return before, mid, z1.nr_free, mmzone.page_to_nid(m, pfn)
    _, (before, mid, after, nid) = two_nodes(fn)
    assert nid == 1 and mid == before - 1 and after == before


def test_kcompactd_request_is_per_node():
    """wakeup_kcompactd(pgdat, order): the order is recorded in that node's pgdat
    (kcompactd_max_order) and only its kcompactd has work (kcompactd_work_requested)."""
    from kmm import compaction
    from kmm.daemon import DaemonContext

    async def fn(m, k):
        compaction.wakeup_kcompactd(m, 9, 1)
        return (compaction.kcompactd_work_requested(m, 0),
                DaemonContext(m, "kcompactd1", 1).kcompactd_work_requested(),
                m.node_data[1].zone.kcompactd_max_order)
    _, got = two_nodes(fn)
    assert got == (False, True, 9)
