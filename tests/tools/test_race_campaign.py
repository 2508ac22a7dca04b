"""scripts/race_campaign.sh: every race program in every mode, one `kmm explore` per
cell, resumable (the 10,000-schedule campaign of docs/race-lab.md runs through it)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
