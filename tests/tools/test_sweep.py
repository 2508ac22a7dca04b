"""kmm sweep (kmm/tools/sweep.py, sweep_cli.py, sweep_plot.py) on the local executors,
and the progress display of the long commands (kmm/tools/progress.py).

The DONTNEED-refill scenario swept over khugepaged's max_ptes_none must give, at each
value, what the host kernel gave for the scenario with that value
(workloads/khugepaged_dontneed_refill_<N>.oracle.json): khugepaged (mm/khugepaged.c,
hpage_collapse_scan_pmd) collapses a PMD range only when its none PTEs are at most
max_ptes_none, so Rss and AnonHugePages grow back with the knob.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import signal

import pytest

from kmm.tools import cli, executors, interrupt, progress, runner, sweep as sw, sweep_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
W = ROOT / "workloads"
REFILL = str(W / "khugepaged_dontneed_refill_64.toml")
NONE = (0, 64, 409, 511)

# fails (its own exception) exactly when khugepaged's max_ptes_none is 64
PICKY = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 << 20)
    await p.touch(a, 4 << 20)
    if k.machine.sysfs["khugepaged/max_ptes_none"] == 64:
        raise RuntimeError("no 64 here")
    return {"pages": 1024}
'''


def _host(n: int) -> dict:
    """The host kernel's report of the refill scenario with max_ptes_none = n."""
    path = W / f"khugepaged_dontneed_refill_{n}.oracle.json"
    return json.loads(path.read_text())["report"]


def _sweep(tmp_path, name, *extra) -> tuple[int, pathlib.Path]:
    out = tmp_path / name
    rc = cli.main(["sweep", REFILL, "--set", "khugepaged.max_ptes_none=511,0,409,64",
                   "--seeds", "1..2", "--out", str(out), "--quiet", *extra])
    return rc, out


def test_refill_sweep_matches_the_host_at_every_max_ptes_none(tmp_path, capsys):
    """hpage_collapse_scan_pmd's none-PTE limit: per value, the host's Rss,
    AnonHugePages and thp_collapse_alloc / thp_scan_exceed_none_pte; rows sorted by
    the knob's value (not the --set order) then seed; one plot per figure."""
    rc, out = _sweep(tmp_path, "a", "--plot", "AnonHugePages", "rss", "thp_collapse_alloc")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [(int(r["khugepaged.max_ptes_none"]), int(r["seed"])) for r in rows] == [
        (n, s) for n in NONE for s in (1, 2)]
    for r in rows:
        host = _host(int(r["khugepaged.max_ptes_none"]))
        assert r["status"] == "ok" and r["error"] == ""
        assert int(r["rss_kb"]) == host["regions"]["main/heap"]["rss_kb"]
        assert int(r["anon_huge_kb"]) == host["regions"]["main/heap"]["anon_huge_kb"]
        for c in ("thp_collapse_alloc", "thp_scan_exceed_none_pte"):
            assert int(r[c]) == host["vmstat"][c], c
    lines = (out / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 8
    first = json.loads(lines[0])
    assert first["report"]["regions"] == _host(0)["regions"]
    assert "seconds" not in lines[0] and "time" not in first
    for stem in ("anon_huge_kb", "rss_kb", "thp_collapse_alloc"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()
    text = capsys.readouterr().out
    assert "8 runs (4 grid points x 2 seeds)" in text and "0 failed" in text
    assert "kmm sweep" not in text.splitlines()[0]  # stdout not a tty: the plain table


def test_equal_sweeps_give_byte_equal_files_on_one_or_two_workers(tmp_path):
    """No wall-clock field and a fixed row order: the files of a sweep on one job (this
    process) and on a pool of two are byte for byte the same, plots included."""
    rc1, one = _sweep(tmp_path, "one", "--plot", "AnonHugePages")
    rc2, two = _sweep(tmp_path, "two", "--plot", "AnonHugePages", "--jobs", "2")
    assert rc1 == rc2 == 0
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(two)) == [
        "anon_huge_kb.png", "anon_huge_kb.svg", "sweep.csv", "sweep.jsonl"]
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n


def test_a_failing_run_is_reported_with_its_parameters_and_report(tmp_path, capsys):
    """A program's own exception in one grid point: that run's row says
    program-error with the message and keeps the report the machine still gives; the
    other runs go on; the command exits 1."""
    prog = tmp_path / "picky.py"
    prog.write_text(PICKY)
    out = tmp_path / "o"
    rc = cli.main(["sweep", str(prog), "--set", "khugepaged.max_ptes_none=0,64",
                   "--out", str(out), "--quiet", "--jobs", "2"])
    assert rc == 1
    rows = [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "program-error"]
    bad = rows[1]
    assert bad["khugepaged.max_ptes_none"] == 64 and "no 64 here" in bad["error"]
    assert bad["report"]["regions"]  # the 4 MiB it touched, as far as it got
    assert bad["rss_kb"] == 4096
    assert "failed: khugepaged.max_ptes_none=64 seed 1: program-error" in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["--set", "khugepaged.max_ptes_nonee=1"], "unknown knob"),
    (["--set", "khugepaged.max_ptes_none=0,512"], "max_ptes_none=512: must be"),
    (["--set", "thp.enabled=always,sometimes"], "must be one of always, madvise, never"),
    (["--set", "thp.hugepages-3kB.enabled=always"], "unknown size folder"),
    (["--set", "vm.swappiness=1"], "unknown knob"),
    (["--set", "machine.memory=1MiB"], "at least 16MiB"),
    (["--set", "khugepaged.max_ptes_none"], "expected NAME=VALUE"),
    (["--set", "thp.enabled=always", "--set", "thp.enabled=never"], "given twice"),
    (["--seeds", "5..1"], "--seeds 5..1"),
    (["--seeds", "x"], "--seeds x"),
    (["--plot", "nonsense"], "unknown figure"),
    (["--set", "thp.enabled=always", "--x", "seedz"], "not a swept dimension"),
    (["--daemon", "nosuchdaemon"], "nosuchdaemon"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_input_is_one_line_exit_2_before_any_run(argv, said, tmp_path, capsys,
                                                     monkeypatch):
    """The grid is validated whole, with the scenario loader's own knob checks
    (kmm.sysfs.validate: the kernel's store handlers), before anything runs."""
    monkeypatch.setattr(sw, "run_job", lambda *a: pytest.fail("a run started"))
    rc = cli.main(["sweep", REFILL, "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and said in err, err
    assert not (tmp_path / "o").exists()


def test_grid_parsing():
    """--set values are typed and checked as a scenario's own tables; seeds A..B."""
    assert sw.parse_seeds("1..3,7,2") == (1, 2, 3, 7)
    d = sw.parse_set("thp.hugepages-64kB.enabled=always,never")
    assert (d.kind, d.target, d.values) == ("knob", "hugepages-64kB/enabled",
                                            ("always", "never"))
    m = sw.parse_set("machine.memory=64MiB,128MiB")
    assert (m.kind, m.values) == ("machine", (64 << 20, 128 << 20))
    p = sw.plan(REFILL, ["khugepaged.max_ptes_none=64,0", "thp.enabled=madvise,always"],
                "2,1")
    jobs = p.jobs()
    assert len(jobs) == 8
    assert [(j["params"]["khugepaged.max_ptes_none"], j["params"]["thp.enabled"],
             j["seed"]) for j in jobs[:4]] == [(0, "always", 2), (0, "always", 1),
                                               (0, "madvise", 2), (0, "madvise", 1)]


def test_ctrl_c_cancels_the_rest_and_writes_what_finished(tmp_path, monkeypatch, capsys):
    """SIGINT during the third run: exit 130, the two finished runs are in the files,
    nothing else."""
    orig = sw.run_job
    calls = [0]

    def run_job(plan, job):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(plan, job)

    monkeypatch.setattr(sw, "run_job", run_job)
    # the command remembers its interruption (kmm.tools.interrupt.caught); the tests
    # after this one must not see it
    monkeypatch.setattr(interrupt, "_caught", None)
    out = tmp_path / "o"
    rc = cli.main(["sweep", REFILL, "--set", "khugepaged.max_ptes_none=0,64,409,511",
                   "--out", str(out), "--quiet"])
    assert rc == 130
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,1,ok") and rows[2].startswith("64,1,ok")
    err = capsys.readouterr().err
    assert "interrupted: 2 of 4 runs finished" in err
    assert calls[0] == 3


def test_inline_executor_hands_back_a_runs_exception():
    """The one-job executor behaves as a pool: a task's exception comes out of
    result(), not out of wait()."""
    with executors.make(1) as ex:
        h = ex.submit(int, "x")
        assert ex.wait([h]) == [h]
        with pytest.raises(ValueError):
            ex.result(h)


# ------------------------------------------------------------------------ progress
def test_progress_plain_lines_when_not_a_terminal():
    """Off a terminal: one line per tenth of the total, a last line, no escapes."""
    buf = io.StringIO()
    p = progress.Progress(20, stream=buf, what="sweep", unit="run", found="failure")
    for i in range(1, 21):
        p.update(i, 1 if i > 5 else 0)
    p.update(20, 1, final=True)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and "\x1b" not in buf.getvalue()
    assert lines[0].startswith("sweep: 2/20 runs, ") and lines[0].endswith(
        "0 failures, ETA " + lines[0].rsplit("ETA ", 1)[1])
    assert lines[-1].startswith("sweep: 20/20 runs") and lines[-1].endswith("1 failure")


def test_progress_bar_on_a_forced_terminal():
    """On a terminal: rich's bar with the count, the rate, the ETA and violations."""
    from rich.console import Console
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=120)
    p = progress.Progress(10, console=con)
    for i in range(1, 11):
        p.update(i, i // 4)
    p.update(10, 2, final=True)
    text = buf.getvalue()
    assert "\x1b[" in text and "10/10" in text and "2 violations" in text
    assert "schedules/s" in text and "ETA" in text


def test_watch_draws_a_bar_for_a_long_run_and_leaves_it_unchanged():
    """kmm run / replay: the bar reads the scheduler's event count from a thread; the
    run's trace digest is the same with it as without."""
    from rich.console import Console
    prog = str(W / "two_cpu_fault.py")
    plain = runner.run_program(prog, seed=3)
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=120)
    with progress.watch("run", 5000, console=con, delay=0.0) as drawn:
        watched = runner.run_program(prog, seed=3)
    assert "bar" in drawn and "events" in buf.getvalue()
    assert watched["run"]["trace_sha256"] == plain["run"]["trace_sha256"]
    assert not runner.MACHINE_HOOKS
    with progress.watch("run", stream=io.StringIO()) as off:  # not a terminal: nothing
        assert off is None and not runner.MACHINE_HOOKS


def test_sweep_table_rich_and_plain():
    """The terminal table: rich on a terminal, aligned text otherwise; seeds folded to
    their value, or mean [min..max] when they differ."""
    from rich.console import Console
    plan = sw.plan(REFILL, ["khugepaged.max_ptes_none=0,64"], "1..2")
    rows = [{"params": {"khugepaged.max_ptes_none": n}, "seed": s, "status": "ok",
             "error": "", "report": {"regions": {"a": {"rss_kb": n + s, "anon_huge_kb": 0}}}}
            for n in (0, 64) for s in (1, 2)]
    plain = io.StringIO()
    sweep_cli.print_table(plan, rows, ["rss_kb"], stream=plain)
    assert plain.getvalue().splitlines()[1].split() == ["0", "2", "0", "1.5", "[1..2]"]
    buf = io.StringIO()
    sweep_cli.print_table(plan, rows, ["rss_kb"], per_run=True,
                          console=Console(file=buf, force_terminal=True, width=100))
    assert "┃" in buf.getvalue() and "66" in buf.getvalue()


def test_sigterm_to_a_pool_sweep_keeps_the_finished_runs(tmp_path):
    """SIGTERM from outside to `kmm sweep --jobs 2` once a run has finished (its first
    progress line): exit 143, both pool workers ended, the finished runs in the CSV."""
    import subprocess
    import sys
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "kmm", "sweep", REFILL, "--set",
                          "khugepaged.max_ptes_none=0,64,409,511", "--seeds", "1..10",
                          "--jobs", "2", "--out", str(out)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # "sweep: 4/40 runs, ...": the pool is running
    assert line.startswith("sweep: "), line
    done = int(line.split()[1].split("/")[0])
    workers = [pid for pid in _children_of(p.pid)]
    assert len(workers) >= 2
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "kmm: terminated (SIGTERM)"
    assert "Traceback" not in err
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"pool worker {pid} outlived the sweep"
    rows = (out / "sweep.csv").read_text().splitlines()[1:]
    assert done <= len(rows) < 40 and all(",ok," in r for r in rows)
    assert f"interrupted: {len(rows)} of 40 runs finished" in err


def _children_of(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == ppid:
                out.append(int(d))
    return out
