"""The oracle against the live host kernel: every recorded corpus scenario reproduces its
recording, and the THP knobs come back exactly as they were.

Needs root and a kernel with transparent huge pages; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from kmm import sysfs
from kmm.tools import oracle
from kmm.tools.conformance import compare
from kmm.tools.scenario import load_scenario

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
RECORDED = [p for p in sorted(WORKLOADS.glob("*.toml"))
            if p.with_name(p.stem + ".oracle.json").exists()]


def _host_problem() -> str | None:
    if not os.path.isdir(sysfs.THP_DIR):
        return f"{sysfs.THP_DIR} does not exist (no THP in this kernel)"
    if os.geteuid() != 0:
        return "the oracle needs root to set THP knobs"
    return None


pytestmark = pytest.mark.skipif(_host_problem() is not None, reason=str(_host_problem()))


def _all_knobs() -> dict[str, str]:
    names = list(sysfs.KNOBS) + oracle._mthp_knobs()
    return {n: oracle.read_knob(n) for n in names}


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_host_reproduces_recording(path):
    recorded = json.loads(path.with_name(path.stem + ".oracle.json").read_text())
    scenario = load_scenario(path)
    diffs = compare(recorded["report"], oracle.run_oracle(scenario))
    if diffs:  # one retry: another process on the host may have faulted THPs meanwhile
        diffs = compare(recorded["report"], oracle.run_oracle(scenario))
    assert not diffs, (
        f"{path.name} (recorded on {recorded['kernel']}, host {os.uname().release}):\n"
        + "\n".join(diffs)
    )


KNOBBY = """
description = "sets many knobs; the run must put them all back"
[thp]
enabled = "always"
defrag = "never"
use_zero_page = 0
shrink_underused = 0
[khugepaged]
max_ptes_none = 17
max_ptes_swap = 3
max_ptes_shared = 5
pages_to_scan = 1000
scan_sleep_millisecs = 77
alloc_sleep_millisecs = 88
defrag = 0
[[steps]]
op = "mmap"
region = "a"
size = "2MiB"
[[steps]]
op = "touch"
region = "a"
"""


def test_knobs_set_during_run_and_restored(tmp_path, monkeypatch):
    path = tmp_path / "knobby.toml"
    path.write_text(KNOBBY)
    scenario = load_scenario(path)
    before = _all_knobs()
    seen: dict[str, str] = {}
    real_step = oracle._Run.step

    def step(self, st):
        if not seen:
            seen.update(_all_knobs())
        return real_step(self, st)

    monkeypatch.setattr(oracle._Run, "step", step)
    report = oracle.run_oracle(scenario)
    assert _all_knobs() == before
    assert not os.path.exists(oracle.SAVED_PATH)
    # During the run: the scenario's values, except the scan sleep held long.
    for name, value in scenario.knobs.items():
        if name != "khugepaged/scan_sleep_millisecs":
            assert seen[name] == str(value), name
    assert seen["khugepaged/scan_sleep_millisecs"] == str(oracle.LONG_SLEEP_MS)
    assert report["vmstat"]["thp_fault_alloc"] == 1  # enabled=always took effect


def test_knobs_restored_after_an_error(tmp_path, monkeypatch):
    path = tmp_path / "knobby.toml"
    path.write_text(KNOBBY)
    before = _all_knobs()

    def boom(self, st):
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle._Run, "step", boom)
    with pytest.raises(KeyboardInterrupt):
        oracle.run_oracle(load_scenario(path))
    assert _all_knobs() == before


def test_unset_knobs_take_kernel_defaults(tmp_path, monkeypatch):
    """What the scenario does not set runs at the kernel default (the emulator's boot
    values), whatever the host had."""
    path = tmp_path / "plain.toml"
    path.write_text('[[steps]]\nop = "mmap"\nregion = "a"\nsize = 4096\n')
    seen: dict[str, str] = {}
    real_step = oracle._Run.step

    def step(self, st):
        seen.update(_all_knobs())
        return real_step(self, st)

    monkeypatch.setattr(oracle._Run, "step", step)
    oracle.run_oracle(load_scenario(path))
    for name, knob in sysfs.KNOBS.items():
        if name != "khugepaged/scan_sleep_millisecs":
            assert seen[name] == str(knob.default), name
