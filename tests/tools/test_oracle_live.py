"""The oracle against the live host kernel: every recorded corpus scenario reproduces its
recording, and the THP knobs come back exactly as they were; the issue-3 resources (a zram
swap device, a debugfs mount, a memory cgroup) are set up for the run and released on
every exit path.

Needs root and a kernel with transparent huge pages; skipped otherwise. A scenario whose
needs this host cannot meet (zram, a writable debugfs, a cgroup-v1 memory controller, no
other swap active) is skipped with the oracle's reason.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from kmm import sysfs
from kmm.tools import oracle, oracle_host
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
    names = list(sysfs.KNOBS) + oracle_host._mthp_knobs()
    return {n: oracle_host.read_knob(n) for n in names}


def _run(scenario):
    """run_oracle, or skip when this host cannot run the scenario."""
    try:
        return oracle.run_oracle(scenario)
    except oracle.HostLacks as e:
        pytest.skip(f"host cannot run {pathlib.Path(scenario.path).name}: {e}")


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_host_reproduces_recording(path):
    recorded = json.loads(path.with_name(path.stem + ".oracle.json").read_text())
    scenario = load_scenario(path)
    diffs = compare(recorded["report"], _run(scenario))
    if diffs:  # one retry: another process on the host may have faulted THPs meanwhile
        diffs = compare(recorded["report"], _run(scenario))
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


# --------------------------------------------------------------------------- issue 3 resources

SWAP_AND_RECLAIM = """
description = "a zram swap device and a memory cgroup for the run"
[machine]
swap = "8MiB"
[[steps]]
op = "mmap"
region = "a"
size = "2MiB"
[[steps]]
op = "madvise"
region = "a"
advice = "hugepage"
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "madvise"
region = "a"
advice = "pageout"
[[steps]]
op = "reclaim"
"""

SPLIT = """
description = "debugfs split_huge_pages"
[[steps]]
op = "mmap"
region = "a"
size = "4MiB"
[[steps]]
op = "madvise"
region = "a"
advice = "hugepage"
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "split"
region = "a"
offset = "1MiB"
length = "4KiB"
[[steps]]
op = "check"
region = "a"
"""


def _zram_devices() -> set[str]:
    return {p.name for p in pathlib.Path("/sys/block").glob("zram*")}


def _host_resources() -> tuple:
    """Everything a run may set up: swaps, zram devices, debugfs, the memory cgroup."""
    return (oracle_host.active_swaps(), _zram_devices(), oracle_host._debugfs_mounted(),
            os.path.isdir(oracle_host.MEMCG_PATH), _all_knobs())


def _needs(*what: str) -> None:
    if "zram" in what:
        if not os.path.isdir(oracle_host.ZRAM_CONTROL):
            pytest.skip(f"{oracle_host.ZRAM_CONTROL} does not exist (no zram module)")
        if oracle_host.active_swaps():
            pytest.skip(f"another swap is active: {oracle_host.active_swaps()}")
        if oracle_host.zswap_enabled():
            pytest.skip("zswap is enabled")
    if "memcg" in what and not os.path.exists(oracle_host.MEMCG_ROOT + "/memory.limit_in_bytes"):
        pytest.skip(f"{oracle_host.MEMCG_ROOT} is not a cgroup-v1 memory controller")


def _held() -> dict:
    return json.loads(pathlib.Path(oracle.SAVED_PATH).read_text())["held"]


def test_swap_and_memcg_set_up_for_the_run_and_released(tmp_path, monkeypatch):
    _needs("zram", "memcg")
    path = tmp_path / "swap.toml"
    path.write_text(SWAP_AND_RECLAIM)
    before = _host_resources()
    seen: dict = {}
    real_step = oracle._Run.step

    def step(self, st):
        if not seen:
            seen["swaps"] = oracle_host.active_swaps()
            seen["held"] = _held()
            seen["cgroup"] = pathlib.Path(f"/proc/{self.workers.by_name['main'].pid}/cgroup").read_text()
            seen["swappiness"] = pathlib.Path(oracle_host.MEMCG_PATH, "memory.swappiness").read_text()
        return real_step(self, st)

    monkeypatch.setattr(oracle._Run, "step", step)
    report = oracle.run_oracle(load_scenario(path))
    n = seen["held"]["zram"]
    assert seen["swaps"] == [f"/dev/zram{n}"]
    assert seen["held"]["memcg"] == oracle_host.MEMCG_PATH
    assert ":memory:/kmm-oracle\n" in seen["cgroup"]
    assert seen["swappiness"].strip() == "0"
    assert not oracle_host.zswap_enabled()
    # All released: no swap, the device removed, no cgroup, knobs as they were.
    assert _host_resources() == before
    assert not os.path.exists(f"/sys/block/zram{n}")
    assert not os.path.exists(oracle.SAVED_PATH)
    # The extension fields of a run with swap; the THP went out whole and stayed out.
    assert report["events"] == {"pswpin": 0, "pswpout": 512}
    assert report["regions"] == {"main/a": {"rss_kb": 0, "anon_huge_kb": 0, "swap_kb": 2048}}
    assert report["vmstat"]["thp_swpout"] == 1


def test_swap_released_after_an_error(tmp_path, monkeypatch):
    _needs("zram", "memcg")
    path = tmp_path / "swap.toml"
    path.write_text(SWAP_AND_RECLAIM)
    before = _host_resources()

    def boom(self, st):
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle._Run, "step", boom)
    with pytest.raises(KeyboardInterrupt):
        oracle.run_oracle(load_scenario(path))
    assert _host_resources() == before
    assert not os.path.exists(oracle.SAVED_PATH)


@pytest.mark.parametrize("repair", ["next_run", "restore"])
def test_killed_run_is_repaired(tmp_path, monkeypatch, repair):
    """A run killed before it could clean up leaves its knobs and resources noted in
    SAVED_PATH; the next run (or --restore) releases and restores them."""
    _needs("zram", "memcg")
    path = tmp_path / "swap.toml"
    path.write_text(SWAP_AND_RECLAIM)
    before = _host_resources()
    with monkeypatch.context() as m:
        m.setattr(oracle_host.HostKnobs, "restore", lambda self, keep_file=False: None)
        oracle.run_oracle(load_scenario(path))
    held = _held()
    assert set(held) == {"zram", "memcg"}
    assert oracle_host.active_swaps() == [f"/dev/zram{held['zram']}"]
    assert os.path.isdir(oracle_host.MEMCG_PATH)
    if repair == "next_run":
        plain = tmp_path / "plain.toml"
        plain.write_text('[[steps]]\nop = "mmap"\nregion = "a"\nsize = 4096\n')
        oracle.run_oracle(load_scenario(plain))
    else:
        assert oracle.restore_saved_knobs() == 0
    assert _host_resources() == before
    assert not os.path.exists(oracle.SAVED_PATH)


def test_refuses_when_another_swap_is_active(tmp_path, monkeypatch):
    _needs("zram")
    path = tmp_path / "swap.toml"
    path.write_text(SWAP_AND_RECLAIM)
    before = _host_resources()
    monkeypatch.setattr(oracle_host, "active_swaps", lambda: ["/swapfile"])
    with pytest.raises(oracle.HostLacks, match=r"swap is already active \(/swapfile\)"):
        oracle.run_oracle(load_scenario(path))
    monkeypatch.undo()
    assert _host_resources() == before
    assert not os.path.exists(oracle.SAVED_PATH)


def test_split_uses_debugfs_or_says_why_not(tmp_path):
    """split_huge_pages of one page's range splits its whole THP (PMD and folio). Under
    kernel lockdown debugfs cannot be written: the run says so and leaves debugfs as it was."""
    path = tmp_path / "split.toml"
    path.write_text(SPLIT)
    before = _host_resources()
    try:
        report = oracle.run_oracle(load_scenario(path))
    except oracle.HostLacks as e:
        assert "split_huge_pages" in str(e)
        assert _host_resources() == before
        pytest.skip(str(e))
    assert _host_resources() == before
    assert report["steps"][3] == {"op": "split", "ok": True}
    assert report["steps"][4]["mismatches"] == 0
    assert report["vmstat"]["thp_split_page"] == 1
    assert report["vmstat"]["thp_split_pmd"] == 1
    assert report["regions"]["main/a"]["anon_huge_kb"] == 2048


# ----------------------------------------------------------------- hugetlb pool
POOLED = """
description = "a hugetlb pool for the run"
[hugetlb]
nr_hugepages = 2
nr_overcommit_hugepages = 1
[[steps]]
op = "mmap"
region = "a"
size = "2MiB"
backing = "hugetlb"
[[steps]]
op = "touch"
region = "a"
"""


def _pool() -> tuple[str, str]:
    return (oracle_host._read(oracle_host.HUGETLB_SYSCTL["nr_hugepages"]),
            oracle_host._read(oracle_host.HUGETLB_SYSCTL["nr_overcommit_hugepages"]))


def test_hugetlb_pool_set_for_the_run_and_put_back_to_zero(tmp_path, monkeypatch):
    path = tmp_path / "pooled.toml"
    path.write_text(POOLED)
    seen = []
    real_step = oracle._Run.step

    def step(self, st):
        seen.append(_pool())
        return real_step(self, st)

    monkeypatch.setattr(oracle._Run, "step", step)
    report = oracle.run_oracle(load_scenario(path))
    assert seen[0] == ("2", "1")
    assert _pool() == ("0", "0")
    assert report["meminfo"] == {"HugePages_Free": -1}
    assert report["regions"]["main/a"]["private_hugetlb_kb"] == 2048


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERM"])
def test_hugetlb_pool_put_back_to_zero_after_an_interrupt(tmp_path, monkeypatch, how):
    import signal
    path = tmp_path / "pooled.toml"
    path.write_text(POOLED)

    def boom(self, st):
        assert _pool() == ("2", "1")
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once
        raise KeyboardInterrupt

    monkeypatch.setattr(oracle._Run, "step", boom)
    with pytest.raises(oracle.Terminated if how == "SIGTERM" else KeyboardInterrupt):
        oracle.run_oracle(load_scenario(path))
    assert _pool() == ("0", "0")
    assert not os.path.exists(oracle.SAVED_PATH)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
