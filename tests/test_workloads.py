"""Every program in workloads/ runs clean; later-issue ops answer clearly."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from kmm.testing import check_between_ops, check_invariants
from kmm.tools.runner import run_program, run_scenario
from kmm.tools.scenario import ScenarioError, load_scenario

WORKLOADS = pathlib.Path(__file__).resolve().parents[1] / "workloads"
PROGRAMS = sorted(WORKLOADS.glob("*.py"))
PROGRAMS = [p for p in PROGRAMS if p.name != "__init__.py"]
# programs with a test of their own, on the machine they need
OWN_TEST = {"khugepaged_compound_extreme.py": "tests/selftests/test_khugepaged.py",
            "khugepaged_dontneed_refill.py": "tests/mm/test_khugepaged.py",
            "khugepaged_collapse_cost.py": "tests/mm/test_khugepaged.py",
            "memory_pressure.py": "tests/mm/test_vmscan.py",
            "mthp_tradeoff.py": "tests/mm/test_mthp.py",
            "promote_hot.py": "tests/daemons/test_hawkeye.py",
            "redis_snapshot.py": "tests/test_workloads.py",
            "split_race.py": "tests/mm/test_split.py"}


@pytest.mark.parametrize("seed", range(8))
def test_two_cpus_fault_one_thp(seed):
    """Two CPUs write-fault the same PMD at once: __do_huge_pmd_anonymous_page's
    pmd_none recheck under the PMD lock lets exactly one THP in (thp_fault_alloc 1),
    the loser's folio is freed, and no byte either CPU wrote is lost."""
    rep = run_program(str(WORKLOADS / "two_cpu_fault.py"), cpus=2, seed=seed,
                      mode="random", check=check_invariants)
    assert rep["vmstat"]["thp_fault_alloc"] == 1
    assert rep["result"] == {"lost_bytes": 0}
    (region,) = rep["regions"].values()
    assert region == {"rss_kb": 2048, "anon_huge_kb": 2048}


@pytest.mark.parametrize("path", [p for p in PROGRAMS if p.name not in OWN_TEST],
                         ids=lambda p: p.stem)
def test_every_program_runs_clean(path):
    # between operations: a daemon (kcompactd, kswapd) may be inside one of its own
    rep = run_program(str(path), cpus=2, seed=1, mode="random", check=check_between_ops)
    assert rep["run"]["events"] > 0


def test_khugepaged_step_needs_khugepaged_running(tmp_path):
    """With enabled=never the host has no khugepaged thread (the oracle refuses such a
    step); the emulator says so in one line naming the step, exit code 2."""
    f = tmp_path / "k.toml"
    f.write_text('[thp]\nenabled = "never"\n[[steps]]\nop = "mmap"\nregion = "a"\n'
                 'size = "2MiB"\n[[steps]]\nop = "khugepaged"\nfull_scans = 1\n')
    with pytest.raises(ScenarioError) as e:
        run_scenario(load_scenario(f))
    assert str(e.value).startswith(f"{f}: step 2: op: khugepaged does not run")
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "step 2" in r.stderr


def test_every_program_with_its_own_test_has_one():
    root = WORKLOADS.parent
    for program, test in OWN_TEST.items():
        assert program in (root / test).read_text()


def test_redis_snapshot_splits_only_the_writers_pmds():
    """workloads/redis_snapshot.py (a BGSAVE): after fork, the parent's first write to
    each shared THP splits the parent's PMD only and copies 4 KiB (thp_split_pmd, one per
    THP; the child keeps every PMD: its AnonHugePages stay whole), the child reads the
    pre-fork data; when the child exits, each folio is left partially mapped by the
    parent's PTEs (thp_deferred_split_page, one per THP). The scenario
    fork_snapshot_parent_writes.toml pins the same counters against the host kernel."""
    rep = run_program(str(WORKLOADS / "redis_snapshot.py"), cpus=2, seed=3, mode="random",
                      check=check_between_ops)
    r = rep["result"]
    thps = 8
    assert r["snapshot_mismatches"] == 0 and r["lost_bytes"] == 0
    assert r["thp_events_during_snapshot"] == {"thp_split_pmd": thps}
    assert r["thp_events_at_child_exit"] == {"thp_deferred_split_page": thps}
    assert r["rss_anon_huge_kb_during"]["bgsave"] == (thps * 2048, thps * 2048)
    assert r["rss_anon_huge_kb_during"]["redis"] == (thps * 2048, 0)
