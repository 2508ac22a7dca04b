"""scripts/race_campaign.sh: every race program in every mode, one `kmm explore` per
cell, resumable (the 10,000-schedule campaign of docs/race-lab.md runs through it)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _campaign(out: pathlib.Path) -> str:
    env = dict(os.environ, MODES="random pct", PROGRAMS="race_fault_fault", JOBS="2",
               KMM=str(pathlib.Path(sys.executable).parent / "kmm"))
    return subprocess.run([str(ROOT / "scripts" / "race_campaign.sh"), "3", str(out)],
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
    assert "2 clean cells, 0 with violations" in first
    _campaign(out)
    assert len((out / "summary.txt").read_text().splitlines()) == 2
