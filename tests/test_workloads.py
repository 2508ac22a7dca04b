"""Every program in workloads/ runs clean; later-issue ops answer clearly."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from kmm.testing import check_invariants
from kmm.tools.runner import NotSupported, run_program, run_scenario
from kmm.tools.scenario import load_scenario

WORKLOADS = pathlib.Path(__file__).resolve().parents[1] / "workloads"
PROGRAMS = sorted(WORKLOADS.glob("*.py"))
PROGRAMS = [p for p in PROGRAMS if p.name != "__init__.py"]


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


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_every_program_runs_clean(path):
    rep = run_program(str(path), cpus=2, seed=1, mode="random", check=check_invariants)
    assert rep["run"]["events"] > 0


def test_khugepaged_step_is_not_yet_supported(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('[[steps]]\nop = "mmap"\nregion = "a"\nsize = "2MiB"\n'
                 '[[steps]]\nop = "khugepaged"\nfull_scans = 1\n')
    with pytest.raises(NotSupported) as e:
        run_scenario(load_scenario(f))
    assert str(e.value).startswith(f"{f}: step 2: op: khugepaged is not yet supported")
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "step 2" in r.stderr
