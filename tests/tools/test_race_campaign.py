"""scripts/race_campaign.sh: every race program in every mode, one `kmm explore` per
cell, resumable (the 10,000-schedule campaign of docs/race-lab.md runs through it), and
scripts/race_campaign_table.py, its table."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
RACES = len(list((ROOT / "workloads").glob("race_*.py")))


def _table(out: pathlib.Path, n: int) -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "race_campaign_table", ROOT / "scripts" / "race_campaign_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.table(out, n).splitlines()


def _campaign(out: pathlib.Path, n: int = 3, **env: str) -> str:
    env = dict(os.environ, MODES="random pct", PROGRAMS="race_fault_fault", JOBS="2",
               KMM=str(pathlib.Path(sys.executable).parent / "kmm"), **env)
    return subprocess.run([str(ROOT / "scripts" / "race_campaign.sh"), str(n), str(out)],
                          env=env, capture_output=True, text=True, check=True).stdout


def test_a_campaign_runs_each_cell_once_and_resumes(tmp_path):
    """Each (program, mode) cell runs its N schedules once and says so in summary.txt;
    run again, the campaign skips the finished cells."""
    out = tmp_path / "c"
    first = _campaign(out)
    lines = sorted((out / "summary.txt").read_text().splitlines())
    assert [ln.split()[:4] for ln in lines] == [
        ["race_fault_fault", "pct", "3", "rc=0"], ["race_fault_fault", "random", "3", "rc=0"]]
    assert all(ln.endswith("no violation") for ln in lines)
    assert "2 clean runs, 0 with violations" in first
    _campaign(out)
    assert len((out / "summary.txt").read_text().splitlines()) == 2


def test_a_chunked_campaign_runs_each_range_once_in_the_listed_cells(tmp_path):
    """CHUNK splits a cell into `kmm explore --start` ranges, each with its own .done;
    CELLS lists the cells to run; run again, nothing is run twice."""
    cells = tmp_path / "cells.txt"
    cells.write_text("race_fault_fault preempt\n")
    out = tmp_path / "c"
    _campaign(out, 5, CHUNK="2", CELLS=str(cells))
    lines = (out / "summary.txt").read_text().splitlines()
    assert sorted(ln.split()[1] + " " + ln.split()[3] for ln in lines) == [
        "preempt rc=0"] * 3
    assert sorted(p.name for p in out.glob("*.done")) == [
        f"race_fault_fault.preempt.5.{i}.done" for i in (0, 2, 4)]
    # the ranges' logs name their seeds: 1..2, 3..4 and 5..5 of the one cell
    seeds = sorted(ln.split("seeds ")[1].split(")")[0]
                   for ln in (p.read_text() for p in out.glob("*.log")))
    assert seeds == ["1..2", "3..4", "5..5"]
    _campaign(out, 5, CHUNK="2", CELLS=str(cells))
    assert len((out / "summary.txt").read_text().splitlines()) == 3
    row = next(ln for ln in _table(out, 5) if ln.startswith("| race_fault_fault |"))
    assert row.split(" | ")[1:3] == ["not run", "not run"]  # random, pct
    assert row.split(" | ")[3].startswith("clean, ")  # all 5 preempt schedules
    assert _table(out, 5)[-1] == f"1 of {RACES * 3} cells ran 5 schedules, 1 of them clean."


def test_the_table_counts_an_injected_bugs_violations_and_a_cell_half_run(tmp_path):
    """With a safeguard removed (EXPLORE_ARGS=--inject), the cell is violating in the
    table; a cell with only some of its ranges done shows how many schedules ran."""
    out = tmp_path / "c"
    cells = tmp_path / "cells.txt"
    cells.write_text("race_fault_fault random\n")
    _campaign(out, 8, CHUNK="4", CELLS=str(cells),
              EXPLORE_ARGS="--inject huge_fault_no_pmd_none_recheck")
    row = next(ln for ln in _table(out, 8) if ln.startswith("| race_fault_fault |"))
    assert row.split(" | ")[1].split(" violating")[0].isdigit()
    assert _table(out, 8)[-1] == f"1 of {RACES * 3} cells ran 8 schedules, 0 of them clean."
    (out / "race_fault_fault.random.8.4.done").unlink()
    row = next(ln for ln in _table(out, 8) if ln.startswith("| race_fault_fault |"))
    assert ", 4 of 8, " in row.split(" | ")[1]
