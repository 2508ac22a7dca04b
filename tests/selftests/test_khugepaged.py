"""tools/testing/selftests/mm/khugepaged.c: every anonymous case, in the khugepaged and
the madvise (MADV_COLLAPSE) context where the selftest runs both.

Each case is a scenario, workloads/khugepaged_<case>[_madvise].toml, with the selftest's
settings (enabled=madvise, or never while MADV_COLLAPSE runs; defrag=always;
use_zero_page=0) and steps (c->collapse() is MADV_HUGEPAGE, a khugepaged step of two
full scans and MADV_NOHUGEPAGE, or MADV_HUGEPAGE and MADV_COLLAPSE). The expected outcome
below is the selftest's: check_huge(p, expect ? nr_hpages : 0) as AnonHugePages, the
MADV_COLLAPSE return value, validate_memory as the check steps. It must hold in the
emulator and in the host's recording beside the scenario (tests/test_conformance.py
also requires the two reports to be equal). A case the selftest expects not to collapse
passes on a timeout there; here its refusal must be the kernel's reason, read from the
mm_khugepaged_scan_pmd tracepoint. collapse_compound_extreme needs mremap, which
scenarios cannot express: it is the program workloads/khugepaged_compound_extreme.py,
run here on a machine big enough for its 512 THPs.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib

import pytest

from kmm import daemon, testing
from kmm.machine import Machine, MachineConfig
from kmm.pgtable import PAGE_SIZE, pmd_pfn, pte_pfn, table_pfn
from kmm.task_mmu import smaps_range
from kmm.tools.runner import run_scenario
from kmm.tools.scenario import load_scenario
from kmm.workload import Kernel

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
HUGE = 2048  # kB: one PMD-mapped THP in AnonHugePages

# scenario -> the selftest's expectations: AnonHugePages per region (check_huge),
# failed steps (1-based: errno), counters, and for khugepaged refusals the scan's reason
EXPECT = {
    "khugepaged_alloc_at_fault": dict(
        huge={"main/p": 0}, events={"thp_fault_alloc": 1, "thp_split_pmd": 1}),
    "khugepaged_collapse_full": dict(huge={"main/p": 4 * HUGE}),
    "khugepaged_collapse_full_madvise": dict(huge={"main/p": 4 * HUGE}),
    "khugepaged_collapse_empty": dict(huge={"main/p": 0}, never_scanned=True),
    "khugepaged_collapse_empty_madvise": dict(huge={"main/p": 0}, fail={3: "EINVAL"}),
    "khugepaged_collapse_single_pte_entry": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_single_pte_entry_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_max_ptes_none": dict(
        huge={"main/p": HUGE}, events={"thp_collapse_alloc": 1},
        refused=("exceed_none_pte", "none_or_zero", 257, "thp_scan_exceed_none_pte")),
    "khugepaged_collapse_max_ptes_none_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_swapin_single_pte": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_swapin_single_pte_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_max_ptes_swap": dict(
        huge={"main/p": HUGE}, events={"thp_collapse_alloc": 1},
        refused=("exceed_swap_pte", "unmapped", 65, "thp_scan_exceed_swap_pte")),
    "khugepaged_collapse_max_ptes_swap_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_single_pte_entry_compound": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_single_pte_entry_compound_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_full_of_compound": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_full_of_compound_madvise": dict(huge={"main/p": HUGE}),
    "khugepaged_collapse_fork": dict(huge={"main/p": 0, "c/p": HUGE}),
    "khugepaged_collapse_fork_madvise": dict(huge={"main/p": 0, "c/p": HUGE}),
    "khugepaged_collapse_fork_compound": dict(huge={"main/p": HUGE, "c/p": HUGE}),
    "khugepaged_collapse_fork_compound_madvise": dict(huge={"main/p": HUGE, "c/p": HUGE}),
    "khugepaged_collapse_max_ptes_shared": dict(
        huge={"main/p": HUGE, "c/p": HUGE}, events={"thp_collapse_alloc": 2},
        refused=("exceed_shared_pte", None, None, "thp_scan_exceed_share_pte")),
    "khugepaged_collapse_max_ptes_shared_madvise": dict(huge={"main/p": HUGE, "c/p": HUGE}),
    "khugepaged_madvise_collapse_existing_thps": dict(
        huge={"main/p": HUGE}, events={"thp_collapse_alloc": 1}),
}


def check_outcome(name: str, rep: dict) -> None:
    """The selftest's pass conditions on a report (the emulator's or the host's)."""
    want = EXPECT[name]
    assert {r: v["anon_huge_kb"] for r, v in rep["regions"].items()} == want["huge"]
    failed = {i + 1: s.get("errno") for i, s in enumerate(rep["steps"]) if not s["ok"]}
    assert failed == want.get("fail", {})
    assert all(s.get("mismatches", 0) == 0 for s in rep["steps"])  # validate_memory
    for event, n in want.get("events", {}).items():
        assert rep["vmstat"][event] == n, event


def test_every_selftest_scenario_is_listed():
    have = {p.stem for p in WORKLOADS.glob("khugepaged_*.toml")
            if not p.stem.startswith(("khugepaged_dontneed_refill", "khugepaged_madvise_collapse_ranges"))}
    assert have == set(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_selftest_case_on_the_host(name):
    """The host kernel's recording passes the selftest case (and tests/test_conformance.py
    requires the emulator's report of the scenario to equal it)."""
    path = WORKLOADS / f"{name}.toml"
    recording = json.loads(path.with_name(name + ".oracle.json").read_text())
    check_outcome(name, recording["report"])


REFUSED = sorted(n for n, w in EXPECT.items() if "refused" in w or "never_scanned" in w)


@pytest.mark.parametrize("name", REFUSED)
def test_selftest_refusal_reason(name):
    """Where the selftest expects khugepaged not to collapse, the emulator's outcome is
    the selftest's and its refusal is the kernel's reason: the mm_khugepaged_scan_pmd
    status (the limit exceeded, with the count past it) and its thp_scan_exceed_*
    counter, once per full scan; or no scan at all of an mm never registered."""
    path = WORKLOADS / f"{name}.toml"
    buf = io.StringIO()
    rep = run_scenario(load_scenario(path), trace_file=buf)
    check_outcome(name, rep)
    scans = [e for e in map(json.loads, buf.getvalue().splitlines())
             if e["event"] == "mm_khugepaged_scan_pmd" and e["actor"] == "khugepaged"]
    own = [e for e in scans if e["mm"] != scans[0]["mm"]]  # the first mm is the decoy
    want = EXPECT[name]
    if want.get("never_scanned"):
        # no anon_vma: never registered, and its VMA would not be eligible anyway
        assert own == []
    if "refused" in want:
        status, field, value, counter = want["refused"]
        refusals = [e for e in own if e["status"] == status]
        # two full scans before the limit is met: the block is refused in each
        assert len(refusals) == 2 and rep["vmstat"][counter] == 2
        assert field is None or all(e[field] == value for e in refusals)


# ---------------------------------------------------- collapse_compound_extreme
def load_program():
    spec = importlib.util.spec_from_file_location(
        "khugepaged_compound_extreme", WORKLOADS / "khugepaged_compound_extreme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("context", ["khugepaged", "madvise"])
def test_collapse_compound_extreme(context):
    """512 mremap rounds leave one PTE table mapping the first page of 512 different
    THPs (each PTE-mapped, partially mapped, on the deferred split queue); it collapses
    into one new THP with every byte intact (the selftest's validate_memory), and the
    512 old folios, unmapped now, are freed. A 4 GiB machine, so that no reclaim splits
    them first; no trace, so the 512 rounds stay fast."""
    prog = load_program()
    m = Machine(MachineConfig(memory=4 << 30, cpus=1))
    k = Kernel(m)
    out = {}

    async def driver():
        for name, value in (("defrag", "always"), ("use_zero_page", 0),
                            ("khugepaged/scan_sleep_millisecs", 10)):
            m.sysfs.write(name, value)
        if context == "khugepaged":
            (cls,) = daemon.load_daemons(["khugepaged"])
            daemon.start_daemon(m, cls())
        p = await k.process(context)
        addr = await prog.build(k, p)
        mm = p.task.mm
        table = m.physmem.tables[table_pfn(m.physmem.tables[
            _pmd_table(m, mm, addr)][(addr >> 21) & 511])]
        olds = [m.physmem.folio(pte_pfn(e)) for e in table]
        out["distinct"] = len({f.pfn for f in olds})
        out["old"] = [(f.order, f.nr_pages_mapped, f.on_deferred_list) for f in olds]
        testing.check_invariants(m, k)
        collapse = prog.khugepaged_collapse if context == "khugepaged" else prog.madvise_collapse
        out["collapsed"] = await collapse(k, p, addr)
        new = m.physmem.tables[_pmd_table(m, mm, addr)][(addr >> 21) & 511]
        out["new"] = m.physmem.page(pmd_pfn(new)).pfn not in {f.pfn for f in olds}
        out["freed"] = all(m.zone.is_free(f.pfn) for f in olds)
        out["lost"] = await p.verify()
        out["smaps"] = smaps_range(m, mm, addr, addr + (2 << 20))
        testing.check_invariants(m, k)

    m.run(driver)
    assert out["distinct"] == 512 and set(out["old"]) == {(9, 1, True)}
    assert out["collapsed"] and out["new"] and out["freed"]
    assert out["lost"] == [] and out["smaps"] == (2048, 2048)
    # what the host's run of the same steps counts (test_collapse_compound_extreme_on_the_host)
    assert {n: m.vmstat.events[n] for n in HOST_COUNTERS} == HOST_COUNTERS


# per context, on Linux 6.18.44 (tests/selftests/host_khugepaged.py)
HOST_COUNTERS = {"thp_fault_alloc": 512, "thp_split_pmd": 512,
                 "thp_deferred_split_page": 512, "thp_collapse_alloc": 1}


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="needs root and a kernel with THP")
@pytest.mark.parametrize("context", ["khugepaged", "madvise"])
def test_collapse_compound_extreme_on_the_host(context):
    """The host kernel passes the case with the same counters (other processes may add
    THP faults of their own, so thp_fault_alloc is a lower bound)."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import host_khugepaged
    r = host_khugepaged.collapse_compound_extreme(context)
    assert r["collapsed"] and r["corrupted_pages"] == 0
    got = r["vmstat"]
    assert got["thp_fault_alloc"] >= 512
    assert {n: got[n] for n in HOST_COUNTERS if n != "thp_fault_alloc"} == {
        n: v for n, v in HOST_COUNTERS.items() if n != "thp_fault_alloc"}


def _pmd_table(m, mm, addr):
    from kmm import memory
    return memory.pmd_lookup(m, mm, addr)


def test_compound_extreme_program_uses_the_selftests_geometry():
    """The program's constants are the selftest's: BASE_ADDR 1 GiB, 512 rounds of one
    page each, the 500 ms TICK polled six times."""
    prog = load_program()
    assert (prog.BASE, prog.NR, prog.PAGE, prog.TICK) == (1 << 30, 512, PAGE_SIZE, 500_000_000)
