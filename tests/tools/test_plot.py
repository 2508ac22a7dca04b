"""``kmm plot RUN``: PNGs of a run from its trace (memory over time, fault latencies,
lock waits and holds) or from its report (lock_stat, regions); deterministic bytes, and
bad input is one line and exit 2.
"""

from __future__ import annotations

import json
import pathlib

from kmm.tools import cli, plot
from kmm.tools import timeline_model as tm
from kmm.runtime.trace import read_trace

ROOT = pathlib.Path(__file__).resolve().parents[2]
RACE = str(ROOT / "workloads" / "race_fault_fault.py")
RUN = ["run", RACE, "--cpus", "2", "--mode", "random", "--seed", "3"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_trace_and_of_a_report(tmp_path, capsys):
    """Three PNGs from a trace, the same bytes twice (no date in them); two from the
    report; the series plotted are the timeline's (two faults: one maps its THP, the
    other finds the PMD taken under the PMD lock and retries onto it)."""
    trace, rep = tmp_path / "t.jsonl", tmp_path / "r.json"
    assert cli.main(RUN + ["--json", "--trace", str(trace)]) == 0
    rep.write_text(capsys.readouterr().out)
    for prefix in ("a", "b"):
        assert cli.main(["plot", str(trace), "--report", str(rep),
                         "-o", str(tmp_path / prefix)]) == 0
    out = capsys.readouterr().out.split()
    assert [pathlib.Path(p).name for p in out] == [
        "a-memory.png", "a-faults.png", "a-locks.png",
        "b-memory.png", "b-faults.png", "b-locks.png"]
    for kind in ("memory", "faults", "locks"):
        a = (tmp_path / f"a-{kind}.png").read_bytes()
        assert a.startswith(PNG) and a == (tmp_path / f"b-{kind}.png").read_bytes()
    run = tm.build(read_trace(str(trace)))
    assert sorted(f.huge for f in run.faults) == [False, True]
    assert cli.main(["plot", str(rep), "-o", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "rep-locks.png"),
                                               str(tmp_path / "rep-memory.png")]
    assert (tmp_path / "rep-locks.png").read_bytes().startswith(PNG)


def test_plot_refuses_a_report_that_is_not_one(tmp_path, capsys):
    """--report must be a kmm report (kmm run --json): one line, exit 2."""
    trace = tmp_path / "t.jsonl"
    assert cli.main(RUN + ["--trace", str(trace)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    capsys.readouterr()
    assert cli.main(["plot", str(trace), "--report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: not a kmm report" in err
    assert plot._load_report(str(trace)) is None
