"""Conformance: the emulator's report of every recorded corpus scenario equals the host
kernel's recording (kmm.tools.conformance.compare: exact, per-pass counters as zero /
non-zero)."""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm.testing import check_invariants
from kmm.tools.conformance import compare
from kmm.tools.scenario import load_scenario

WORKLOADS = pathlib.Path(__file__).resolve().parents[1] / "workloads"
RECORDED = [p for p in sorted(WORKLOADS.glob("*.toml"))
            if p.with_name(p.stem + ".oracle.json").exists()]


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_emulator_matches_host(path):
    from kmm.tools.runner import run_scenario

    recording = json.loads(path.with_name(path.stem + ".oracle.json").read_text())
    scenario = load_scenario(path)
    report = run_scenario(scenario, check=check_invariants)  # invariants after every step
    diffs = compare(recording["report"], report)
    assert not diffs, f"{path.name}: {scenario.description}\n" + "\n".join(diffs)
