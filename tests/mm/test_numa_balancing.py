"""NUMA balancing on a two-node machine (CPU 0 on node 0, CPU 1 on node 1): the scanner
(kernel/sched/fair.c task_numa_work, mm/mempolicy.c change_prot_numa, mm/mprotect.c
change_protection with MM_CP_PROT_NUMA and change_huge_pmd), the hinting faults
(mm/memory.c do_numa_page, mm/huge_memory.c do_huge_pmd_numa_page), the placement
filter (mm/mempolicy.c mpol_misplaced, kernel/sched/fair.c should_numa_migrate_memory)
and the migration (mm/migrate.c migrate_misplaced_folio). Each test names the
function and the condition its expectation comes from."""

from __future__ import annotations

import functools
import pathlib

from conftest import run as _run

from kmm import mmzone, numa_balancing
from kmm.pgtable import HPAGE_PMD_NR, pmd_pfn, pmd_protnone, pmd_trans_huge, pte_protnone

from tests.mm.test_huge_memory import MiB, ev, pmd_at

run = functools.partial(_run, memory=64 * MiB, cpus=2)
WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"


def _two_nodes(fn):
    from kmm.machine import Machine, MachineConfig
    from kmm.runtime.trace import Trace
    from kmm.workload import Kernel
    m = Machine(MachineConfig(memory=64 * MiB, cpus=2, nodes=2, seed=1), trace=Trace())
    return run(fn, m=m, k=Kernel(m))


async def _thp_on(k, nid, size=2 * MiB, value=1):
    p = await k.process("main")
    a = await p.mmap(size)
    await p.madvise(a, size, "hugepage")
    await p.on_node(nid).touch(a, size, value=value, stride=64 << 10)
    return p, a


def test_change_prot_numa_makes_a_remote_thp_pmd_prot_none():
    """change_pmd_range -> change_huge_pmd(MM_CP_PROT_NUMA) returns HPAGE_PMD_NR for a
    huge PMD it rewrote: numa_pte_updates += 512 (change_prot_numa) and
    numa_huge_pte_updates += 1 (change_pmd_range's nr_huge_updates); the PMD is
    PAGE_NONE (pmd_protnone), still huge. A second scan finds it PROT_NONE already
    ("if (pmd_protnone(*pmd)) goto unlock": 1, not counted)."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        assert await p.on_node(1).numa_scan() == HPAGE_PMD_NR
        _, pmd = pmd_at(m, p.task.mm, a)
        assert pmd_trans_huge(pmd) and pmd_protnone(pmd)
        assert (ev(m, "numa_pte_updates"), ev(m, "numa_huge_pte_updates")) == (512, 1)
        assert await p.on_node(1).numa_scan() == 0
        assert (ev(m, "numa_pte_updates"), ev(m, "numa_huge_pte_updates")) == (512, 1)
    _two_nodes(fn)


def test_change_prot_numa_skips_a_folio_on_the_scanning_cpus_node():
    """prot_numa_skip: "Don't mess with PTEs if page is already on the node a
    single-threaded process is running on" (target_node == folio_nid): a scan from
    node 0 leaves the node-0 THP mapped as it was, counting nothing."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        before = pmd_at(m, p.task.mm, a)[1]
        assert await p.on_node(0).numa_scan() == 0
        assert pmd_at(m, p.task.mm, a)[1] == before
        assert ev(m, "numa_pte_updates") == 0
    _two_nodes(fn)


def test_remote_hinting_fault_migrates_the_thp_whole():
    """do_huge_pmd_numa_page: numa_migrate_check counts numa_hint_faults (not _local:
    the folio is on node 0, the fault on node 1); mpol_misplaced returns node 1 (the
    first fault of the task passes should_numa_migrate_memory: numa_scan_seq <= 4 and
    no last cpupid); migrate_misplaced_folio moves the THP whole (MR_NUMA_MISPLACED):
    thp_migration_success 1, pgmigrate_success and numa_pages_migrated 512; the PMD maps
    a node-1 THP, present again (the access made it so)."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0, value=7)
        old = pmd_pfn(pmd_at(m, p.task.mm, a)[1])
        assert await p.on_node(1).numa_scan() == 512
        assert await p.on_node(1).load(a + 64 * 1024) == b"\x07"
        _, pmd = pmd_at(m, p.task.mm, a)
        assert pmd_trans_huge(pmd) and not pmd_protnone(pmd) and pmd_pfn(pmd) != old
        assert mmzone.page_to_nid(m, pmd_pfn(pmd)) == 1
        assert (ev(m, "numa_hint_faults"), ev(m, "numa_hint_faults_local")) == (1, 0)
        assert (ev(m, "numa_pages_migrated"), ev(m, "pgmigrate_success")) == (512, 512)
        assert (ev(m, "thp_migration_success"), ev(m, "thp_split_page")) == (1, 0)
        assert await p.verify() == []
    _two_nodes(fn)


def test_local_hinting_fault_restores_the_pmd():
    """do_huge_pmd_numa_page, target NUMA_NO_NODE (mpol_misplaced: curnid == thisnid):
    out_map restores the PMD (pmd_modify to the VMA's protection, young, writable: an
    exclusive anonymous THP in a writable VMA, can_change_pmd_writable); counts
    numa_hint_faults and numa_hint_faults_local, migrates nothing. The scan ran from
    node 1, the access comes from node 0."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        pfn = pmd_pfn(pmd_at(m, p.task.mm, a)[1])
        await p.on_node(1).numa_scan()
        await p.on_node(0).store(a, b"\x05")
        _, pmd = pmd_at(m, p.task.mm, a)
        assert pmd_pfn(pmd) == pfn and not pmd_protnone(pmd)
        assert (ev(m, "numa_hint_faults"), ev(m, "numa_hint_faults_local")) == (1, 1)
        assert ev(m, "numa_pages_migrated") == 0
        faults = ev(m, "pgfault")
        await p.on_node(0).store(a + 4096, b"\x06")  # writable again: no fault
        assert ev(m, "pgfault") == faults
        assert await p.verify() == []
    _two_nodes(fn)


def test_two_stage_filter_needs_two_faults_from_the_same_node():
    """should_numa_migrate_memory past the task's first scans (numa_scan_seq > 4): a
    fault whose folio's last cpupid names a CPU of another node does not migrate
    ("Multi-stage node selection": cpupid_to_nid(last_cpupid) != dst_nid -> false) but
    records this CPU; the next fault from the same node migrates (a private fault)."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        numa_balancing.mm_numa(m, p.task.mm).scan_seq = 5
        await p.on_node(1).numa_scan()
        await p.on_node(0).load(a)  # local: records CPU 0's cpupid, restores the PMD
        await p.on_node(1).numa_scan()
        await p.on_node(1).load(a)  # last cpupid on node 0: filtered out
        assert ev(m, "numa_pages_migrated") == 0
        assert mmzone.page_to_nid(m, pmd_pfn(pmd_at(m, p.task.mm, a)[1])) == 0
        await p.on_node(1).numa_scan()
        await p.on_node(1).load(a)  # last cpupid on node 1 now: migrate
        assert ev(m, "numa_pages_migrated") == HPAGE_PMD_NR
        assert mmzone.page_to_nid(m, pmd_pfn(pmd_at(m, p.task.mm, a)[1])) == 1
        assert ev(m, "numa_hint_faults") == 3 and ev(m, "numa_hint_faults_local") == 1
    _two_nodes(fn)


def test_hinting_fault_on_a_small_page_migrates_it():
    """do_numa_page on a PROT_NONE PTE (change_pte_range with MM_CP_PROT_NUMA counted
    it: numa_pte_updates 1 per page, no huge update): the page moves to the faulting
    node (numa_pages_migrated 1, pgmigrate_success 1) through PTE migration entries;
    the neighbour keeps its PROT_NONE PTE until it is touched."""
    async def fn(m, k):
        k.set_knob("enabled", "never")
        p = await k.process("main")
        a = await p.mmap(2 * MiB)
        await p.on_node(0).touch(a, 2 * 4096, value=3)
        assert await p.on_node(1).numa_scan() == 2
        assert ev(m, "numa_huge_pte_updates") == 0
        assert await p.on_node(1).load(a) == b"\x03"
        assert (ev(m, "numa_pages_migrated"), ev(m, "pgmigrate_success")) == (1, 1)
        from tests.mm.test_migrate import _pte
        from kmm.pgtable import pte_pfn
        assert mmzone.page_to_nid(m, pte_pfn(_pte(m, p.task.mm, a))) == 1
        assert pte_protnone(_pte(m, p.task.mm, a + 4096))
        assert await p.verify() == []
    _two_nodes(fn)


def test_task_numa_work_scans_a_window_per_period():
    """task_numa_work: nothing before mm->numa_next_scan (scan_delay_ms after the
    first look); then one window of scan_size_mb (ending on a PMD boundary) per scan
    period from mm->numa_scan_offset, starting over at the end of the address space
    with numa_scan_seq + 1 (reset_ptenuma_scan); only windows with nr_pte_updates count
    against the size ("if (nr_pte_updates) pages -= ..."). Driven by the task's own
    accesses (task_tick_numa) with kernel.numa_balancing = 1."""
    async def fn(m, k):
        for name, v in (("numa_balancing_scan_delay_ms", 5),
                        ("numa_balancing_scan_period_min_ms", 5),
                        ("numa_balancing_scan_period_max_ms", 5),
                        ("numa_balancing_scan_size_mb", 2)):
            k.set_sysctl(name, v)
        p, a = await _thp_on(k, 0, size=4 * MiB)
        k.set_sysctl("kernel.numa_balancing", 1)
        q = p.on_node(1)
        await q.load(a)  # the first look: the scan waits scan_delay_ms
        st = numa_balancing.mm_numa(m, p.task.mm)
        assert st.history == []
        for _ in range(3):
            await k.sleep(6 * 1_000_000)
            await q.load(a + 3 * MiB)
        # the third pass finds both THPs done (PROT_NONE already, or on node 1 after
        # the read of the second): windows that changed nothing do not use up the
        # scan size, so it goes on to the end and starts over
        assert [(s - a, e - a) for _, s, e in st.history] == [
            (0, 2 * MiB), (2 * MiB, 4 * MiB), (0, 2 * MiB), (2 * MiB, 4 * MiB)]
        assert st.scan_seq == 2
        t = [t for t, _, _ in st.history]
        assert t[1] - t[0] >= 5 * 1_000_000 and t[2] - t[1] >= 5 * 1_000_000
    _two_nodes(fn)


def test_sysctl_validation():
    """kernel.numa_balancing takes 0..1 here (the kernel's NUMA_BALANCING_NORMAL;
    memory tiering is not modelled); an unknown name or a value out of range is a
    ValueError naming it."""
    async def fn(m, k):
        import pytest
        with pytest.raises(ValueError, match="kernel.numa_balancing"):
            k.set_sysctl("kernel.numa_balancing", 2)
        with pytest.raises(ValueError, match="unknown sysctl"):
            k.set_sysctl("numa_balancing_bogus", 1)
        k.set_sysctl("kernel.numa_balancing", 1)
        assert numa_balancing.enabled(m)
    _two_nodes(fn)


def test_thp_follow_workload_ends_on_node_1_with_every_thp_whole():
    """workloads/numa_thp_follow.py: the thread moves to node 1; task_numa_work,
    do_huge_pmd_numa_page and migrate_misplaced_folio move each of the 8 THPs whole
    (thp_migration_success 8, numa_pages_migrated 4096, no split: AnonHugePages
    16 MiB), and the timeline ends with all 4096 pages on node 1."""
    from kmm.tools.runner import run_program
    rep = run_program(str(WORKLOADS / "numa_thp_follow.py"))
    r = rep["result"]
    assert r["timeline"][0][1:] == (4096, 0) and r["timeline"][-1][1:] == (0, 4096)
    assert (r["thp_migration_success"], r["numa_pages_migrated"]) == (8, 4096)
    assert (r["numa_huge_pte_updates"], r["numa_pte_updates"]) == (8, 4096)
    assert r["anon_huge_kb"] == 16384 and r["lost_bytes"] == 0
