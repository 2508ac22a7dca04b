"""Daemon plug-ins: discovery through the kmm.daemons entry-point group, `kmm daemons`,
and `kmm run --daemon module:Class`, both through one validating loader."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kmm import daemon

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_builtin_daemons_come_through_the_entry_point_group():
    """kswapd, kcompactd and khugepaged are installed plug-ins like any other, and
    khugepaged lists its sysfs knobs with the kernel's defaults."""
    rows = {r["name"]: r for r in daemon.describe_daemons()}
    assert {"kswapd", "kcompactd", "khugepaged"} <= set(rows)
    assert rows["khugepaged"]["knobs"] == {"pages_to_scan": 4096,
                                           "scan_sleep_millisecs": 10000,
                                           "alloc_sleep_millisecs": 60000}
    assert all(r["distribution"] == "kmm" and "error" not in r for r in rows.values())
    out = subprocess.run([sys.executable, "-m", "kmm", "daemons", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert {r["name"] for r in json.loads(out)} == set(rows)


PLUGIN = '''
import json, os

class Probe:
    name = "probe"

    async def run(self, ctx):
        await ctx.sleep(1_000_000)          # 1 ms of emulated time
        z = ctx.zone()
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump({"now": ctx.now, "free_above_high": z.free > z.high}, f)

class NotADaemon:
    pass
'''


@pytest.fixture
def plugin(tmp_path):
    (tmp_path / "probe_daemon.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PROBE_OUT=str(tmp_path / "out.json"))
    return tmp_path, env


def test_run_with_a_plugin_daemon(plugin):
    """--daemon module:Class runs the class as a daemon actor of the machine, in
    emulated time, seeing the zone through its DaemonContext."""
    tmp, env = plugin
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(ROOT / "workloads" /
                        "khugepaged_collapse_cost.py"), "--daemon", "probe_daemon:Probe"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp / "out.json").read_text())
    assert got == {"now": got["now"], "free_above_high": True} and got["now"] >= 1_000_000


@pytest.mark.parametrize("spec, says", [
    ("probe_daemon:NotADaemon", "needs a str `name` and an `async def run(self, ctx)`"),
    ("probe_daemon", "expected module:Class"),
    ("no_such_module:X", "cannot load: No module named 'no_such_module'"),
])
def test_a_bad_plugin_is_one_line_naming_it(plugin, spec, says):
    _, env = plugin
    r = subprocess.run([sys.executable, "-m", "kmm", "run",
                        str(ROOT / "workloads" / "fault_madvised.toml"), "--daemon", spec],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and spec in r.stderr and says in r.stderr
