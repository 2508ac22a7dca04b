"""kmm bench with tiny sizes: the figures have their shape and the emulated THP run
really made its THPs. No timing is asserted (a benchmark, not a test)."""

from __future__ import annotations

import json
import sys

import pytest

from kmm.tools import bench, cli

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the host side needs Linux mmap and /proc")


def test_emulated_4k_faults():
    r = bench.emulated_faults(8, False)
    assert r["faults"] == 8 and r["kind"] == "4k"
    assert r["pgfault"] == 8
    assert r["thp_fault_alloc"] == 0
    assert r["seconds"] > 0 and r["points"] > 0


@pytest.mark.parametrize("traced", [False, True])
def test_emulated_thp_faults_make_the_thps(traced):
    r = bench.emulated_faults(2, True, traced=traced)
    assert r["kind"] == "thp" and r["traced"] is traced
    assert r["thp_fault_alloc"] == 2
    assert r["thp_fault_fallback"] == 0
    assert r["pgfault"] == 2


@linux_only
@pytest.mark.parametrize("huge", [False, True])
def test_host_faults_shape(huge):
    n = 2 if huge else 8
    r = bench.host_faults(n, huge)
    assert r["faults"] == n
    assert r["data_ok"]
    assert r["kernel_seconds"] > 0
    for key in ("seconds_faulting", "seconds_refault_free", "rss_kb", "anon_huge_kb",
                "thp_fault_alloc", "thps_made"):
        assert key in r
    if not huge:
        assert r["anon_huge_kb"] == 0 and r["thps_made"] == 0
    assert 0 <= r["thps_made"] <= n


def test_startup_shape():
    s = bench.startup(repeat=1)
    assert s["small"]["memory"] == 1 << 30 and s["big"]["memory"] == 1 << 40
    for key in ("pages", "data", "tables"):
        assert s["small"][key] == s["big"][key] > 0
    assert s["small"]["thp_fault_alloc"] == s["big"]["thp_fault_alloc"] == 2
    assert set(s["ratio"]) >= {"construct_seconds", "construct_heap_bytes", "pages"}


@linux_only
def test_run_bench_table_and_json(capsys):
    assert cli.main(["bench", "--pages", "4", "--thps", "2", "--repeat", "1",
                     "--schedules", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"config", "faults", "startup", "host_thp_confirmed", "stores",
                        "explore"}
    # the issue-15 budgets: stores to mapped THP pages, explore schedules/s per core
    st = rep["stores"]
    assert st["emulated"]["stores"] == st["host"]["stores"] == 2 * 512
    # a store that hits the TLB in free mode enters no kernel: no point (docs/points.md)
    assert st["emulated"]["points"] == 0
    assert st["ratio"] > 0 and isinstance(st["met"], bool)
    assert [r["program"] for r in rep["explore"]] == [
        "race_fault_fault.py", "race_fault_collapse.py", "race_reclaim_split.py"]
    for r in rep["explore"]:
        assert r["schedules"] == 2 and not r["violations"]
        assert r["per_s"] > 0 and r["points_per_schedule"] > 50
    for kind, n in (("4k", 4), ("thp", 2)):
        f = rep["faults"][kind]
        assert f["faults"] == n
        for side in ("emulated", "emulated_traced", "host"):
            assert f[side]["faults_per_s"] > 0
        assert isinstance(f["met"], bool) and f["ratio"] > 0
    assert rep["faults"]["thp"]["emulated"]["thp_fault_alloc"] == 2
    assert rep["faults"]["thp"]["emulated_traced"]["thp_fault_alloc"] == 2
    assert rep["faults"]["4k"]["emulated"]["pgfault"] == 4
    table = bench.format_table(rep)
    for word in ("4K", "THP", "ratio", "start-up", "physmem.pages", "target", "budgets",
                 "store to a mapped THP 4K page", "explore race_fault_fault.py",
                 "per schedule"):
        assert word in table
