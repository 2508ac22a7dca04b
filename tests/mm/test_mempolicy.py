"""NUMA memory policy (issue 14 items 2 and 7): set_mempolicy, mbind, the policy in
the fault path and THP allocation, MPOL_MF_MOVE/STRICT, khugepaged's target node, and
bad input. The one-node behaviour (bind/move to node 0 succeed, a missing node, an
empty mask or nodes with local are EINVAL, a hole is EFAULT) is the host's, recorded
in workloads/mempolicy_one_node.oracle.json and pinned there by the conformance test;
the multi-node expectations come from mm/mempolicy.c of 6.18, named per test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kmm.testing import run_machine
from kmm.tools.runner import run_program
from kmm.workload import KmmError, errno_name

from tests.mm.test_numa import MiB, two_nodes
from tests.test_workloads import WORKLOADS


async def _region(k, size=4 * MiB, thp=False):
    p = await k.process()
    a = await p.mmap(size)
    await p.madvise(a, size, "hugepage" if thp else "nohugepage")
    return p, a


def test_bind_remote_node():
    """policy_nodemask(MPOL_BIND) confines the zonelist to the policy's nodes; the
    preferred zone is the first of node 0's zonelist inside the mask (node 1), so
    the pages are numa_hit there, and numa_other (the CPU is on node 0)."""
    async def fn(m, k):
        p, a = await _region(k)
        await p.set_mempolicy("bind", [1])
        s0 = k.numastat(1)
        await p.on(0).touch(a, 32 * 4096)
        return p.numa_maps(a, 4 * MiB), s0, k.numastat(1)
    _, (maps, s0, s1) = two_nodes(fn)
    assert maps == {"pages": {"1": 32}}
    assert s1["numa_hit"] - s0["numa_hit"] >= 32
    assert s1["numa_other"] - s0["numa_other"] == s1["numa_hit"] - s0["numa_hit"]
    assert s1["numa_miss"] == 0


def test_preferred_falls_back():
    """MPOL_PREFERRED only changes the preferred node (policy_nodemask: nodemask NULL):
    with node 1 full the pages come from node 0 along node 1's zonelist, numa_miss on
    node 0."""
    async def fn(m, k):
        while await k.alloc_kernel_pages(0, reserves=True, node=1) >= 0:
            pass
        p, a = await _region(k)
        await p.set_mempolicy("preferred", [1])
        s0 = k.numastat(0)
        await p.touch(a, 8 * 4096)
        return p.numa_maps(a, 4 * MiB), s0, k.numastat(0)
    _, (maps, s0, s1) = two_nodes(fn, memory=64 * MiB)
    assert maps == {"pages": {"0": 8}}
    assert s1["numa_miss"] - s0["numa_miss"] >= 8


def test_thp_interleave_alternates_nodes():
    """get_vma_policy's interleave index for a PMD folio is vm_pgoff >> 9 plus the 2 MiB
    offset; interleave_nid takes it mod the node count; alloc_pages_mpol skips the
    THISNODE attempt for interleave and counts numa_interleave when the folio landed on
    its node: 8 THPs alternate over the two nodes."""
    async def fn(m, k):
        p, a = await _region(k, 16 * MiB, thp=True)
        await p.mbind(a, 16 * MiB, "interleave", [0, 1])
        s0 = k.numastat()
        await p.touch(a, 16 * MiB)
        nodes = [p.numa_maps(a + i * 2 * MiB, 2 * MiB)["huge"] for i in range(8)]
        return nodes, s0, k.numastat()
    _, (nodes, s0, s1) = two_nodes(fn)
    first = int(next(iter(nodes[0])))
    assert nodes == [{str((first + i) % 2): 1} for i in range(8)]
    assert s1["numa_interleave"] - s0["numa_interleave"] == 8


def test_fragmented_node_thp_falls_back_to_the_other_node():
    """alloc_pages_mpol for a PMD folio: first the local node alone (__GFP_THISNODE |
    __GFP_NORETRY); a madvised VMA's mask has __GFP_DIRECT_RECLAIM, so it then tries the
    whole zonelist (node 1: numa_miss there, numa_foreign on node 0); a plain VMA's
    GFP_TRANSHUGE_LIGHT does not: thp_fault_fallback and 4K pages on node 0."""
    rep = run_program(str(WORKLOADS / "numa_fragmented_fallback.py"))
    r = rep["result"]
    assert r["madvised"]["numa_maps"] == {"pages": {"1": 2048}, "huge": {"1": 4}}
    assert r["madvised"]["thp_fault_alloc"] == 4
    assert r["madvised"]["numastat"][1]["numa_miss"] == 4
    assert r["madvised"]["numastat"][0]["numa_foreign"] == 4
    assert r["plain"]["numa_maps"] == {"pages": {"0": 2048}}
    assert r["plain"]["thp_fault_fallback"] == 4


def test_mbind_move_migrates_pages_to_the_bound_node():
    """do_mbind with MPOL_MF_MOVE: queue_pages_range isolates the folios on nodes
    outside the mask, migrate_pages moves them to folios the new policy allocates
    (alloc_migration_target_by_mpol): every page on node 1, contents kept,
    pgmigrate_success per page."""
    async def fn(m, k):
        p, a = await _region(k)
        await p.on(0).touch(a, 16 * 4096, value=7)
        ev0 = k.vmstat()["pgmigrate_success"]
        await p.mbind(a, 4 * MiB, "bind", [1], ["move"])
        bad = await p.touch(a, 16 * 4096, write=False, value=7)
        return p.numa_maps(a, 4 * MiB), bad, k.vmstat()["pgmigrate_success"] - ev0
    _, (maps, bad, moved) = two_nodes(fn)
    assert maps == {"pages": {"1": 16}}
    assert bad == 0 and moved == 16


def test_mbind_strict_without_move_is_eio_but_sets_the_policy():
    """do_mbind: MPOL_MF_STRICT without MOVE counts a misplaced folio as nr_failed, the
    policy is still applied (mbind_range ran) and the call returns EIO; a later fault
    follows the new policy."""
    async def fn(m, k):
        p, a = await _region(k)
        await p.on(0).touch(a, 4096)
        err = await errno_name(p.mbind(a, 4 * MiB, "bind", [1], ["strict"]))
        await p.on(0).touch(a + 4096, 4096)
        return err, p.numa_maps(a, 4 * MiB)
    _, (err, maps) = two_nodes(fn)
    assert err == "EIO"
    assert maps == {"pages": {"0": 1, "1": 1}}


def test_mbind_splits_vmas_and_policies_follow_fork():
    """mbind_range splits the VMA at the range's ends (vma_modify_policy) and a VMA
    keeps its policy across fork (vma_dup_policy); the task policy is inherited
    (mpol_dup in copy_process)."""
    async def fn(m, k):
        p, a = await _region(k)
        await p.set_mempolicy("bind", [1])
        await p.mbind(a + MiB, MiB, "bind", [0])
        c = await p.fork("child")
        await c.on(1).touch(a, 4 * MiB)
        vmas = [(v.start - a, v.end - a) for v in p.task.mm.vmas]
        return vmas, c.numa_maps(a, MiB), c.numa_maps(a + MiB, MiB), c.task.mempolicy
    _, (vmas, first, second, pol) = two_nodes(fn)
    assert vmas == [(0, MiB), (MiB, 2 * MiB), (2 * MiB, 4 * MiB)]
    assert first == {"pages": {"1": 256}} and second == {"pages": {"0": 256}}
    assert sorted(pol.nodes) == [1]


@pytest.mark.parametrize("backing", ["anon", "shmem"])
def test_the_collapse_goes_to_the_node_with_most_pages(backing):
    """hpage_collapse_find_target_node: the collapse allocates on the node holding the
    most of the range's pages (cc->node_load, counted per PTE by hpage_collapse_scan_pmd
    and per page-cache folio by hpage_collapse_scan_file), not on the collapsing CPU's
    node."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(2 * MiB, backing=backing)
        await p.set_mempolicy("bind", [1])
        await p.on(0).touch(a, 300 * 4096)
        await p.set_mempolicy("bind", [0])
        await p.on(0).touch(a + 300 * 4096, 212 * 4096)
        await p.set_mempolicy("default")
        before = p.numa_maps(a, 2 * MiB)
        await p.on(0).madvise(a, 2 * MiB, "collapse")
        return before, p.numa_maps(a, 2 * MiB)
    _, (before, after) = two_nodes(fn, knobs={"enabled": "madvise"})
    assert before == {"pages": {"0": 212, "1": 300}}
    assert after == {"pages": {"1": 512}, "huge": {"1": 1}}


@pytest.mark.parametrize("call, errno", [
    (lambda p, a: p.set_mempolicy("bind", []), "EINVAL"),        # mpol_new: empty mask
    (lambda p, a: p.set_mempolicy("interleave", [5]), "EINVAL"),  # no such node
    (lambda p, a: p.set_mempolicy("local", [0]), "EINVAL"),      # LOCAL takes no nodes
    (lambda p, a: p.set_mempolicy("default", [1]), "EINVAL"),    # DEFAULT neither
    (lambda p, a: p.set_mempolicy("bind", [1 << 10]), "EINVAL"),  # beyond MAX_NUMNODES
    (lambda p, a: p.mbind(a + 1, 4096, "bind", [0]), "EINVAL"),  # start not aligned
    (lambda p, a: p.mbind(a, 8 * MiB, "bind", [0]), "EFAULT"),   # a hole in the range
    (lambda p, a: p.mbind(a, 4096, "preferred", [7]), "EINVAL"),
])
def test_bad_policy_is_the_kernels_errno(call, errno):
    """kernel_set_mempolicy / do_mbind refuse as mpol_new, get_nodes and
    queue_pages_test_walk do (the one-node cases are in the host recording)."""
    async def fn(m, k):
        p, a = await _region(k)
        return await errno_name(call(p, a))
    _, got = two_nodes(fn)
    assert got == errno


def test_existing_and_missing_nodes_mix():
    """mpol_set_nodemask ANDs the mask with the nodes that have memory: {0, 5} is {0}
    (no error), the allocation on node 0."""
    async def fn(m, k):
        p, a = await _region(k)
        await p.set_mempolicy("bind", [0, 5])
        await p.on(1).touch(a, 4096)
        return p.numa_maps(a, 4096), sorted(p.task.mempolicy.nodes)
    _, (maps, nodes) = two_nodes(fn)
    assert maps == {"pages": {"0": 1}} and nodes == [0]


def test_program_api_type_errors():
    """Argument checks before the kernel is entered: a mode name not known is a
    ValueError, nodes not a list of ints a TypeError."""
    async def fn(m, k):
        p, a = await _region(k)
        with pytest.raises(ValueError):
            await p.set_mempolicy("weighted", [0])
        with pytest.raises(TypeError):
            await p.mbind(a, 4096, "bind", "0")
        with pytest.raises(ValueError):
            await p.mbind(a, 4096, "bind", [0], ["lazy"])
        with pytest.raises(KmmError):
            await p.mbind(a, 4096, "bind", [3])
    run_machine(fn, memory=64 * MiB)


@pytest.mark.parametrize("step, msg", [
    ('op = "set_mempolicy"\nmode = "weighted"', "step 2: mode: "),
    ('op = "set_mempolicy"\nmode = "bind"\nnodes = [-1]', "step 2: nodes: must be >= 0"),
    ('op = "set_mempolicy"\nmode = "bind"\nnodes = 1', "step 2: nodes: must be an array"),
    ('op = "mbind"\nregion = "a"\nmode = "bind"\nflags = ["lazy"]', "step 2: flags: "),
    ('op = "mbind"\nregion = "a"\nnodes = [0]', "step 2: mode: required for mbind"),
])
def test_bad_policy_steps_exit_2(tmp_path, step, msg):
    """Scenario fields of the policy steps that no syscall could be given: exit 2 and
    one line naming file, step and key (a node the machine lacks is the kernel's
    EINVAL instead, a step result)."""
    f = tmp_path / "s.toml"
    f.write_text('[[steps]]\nop = "mmap"\nregion = "a"\nsize = "2MiB"\n'
                 f'[[steps]]\n{step}\n')
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and f"{f}: {msg}" in r.stderr
