"""Interruption is never a finding: SIGINT or SIGTERM at any moment of run, explore (one
job or a pool), replay and bench ends the command with one line on stderr, exit code
130 (SIGINT) or 143 (SIGTERM), every child process and pool worker ended and reaped,
and no failure file written or overwritten.

The signal is sent at seeded points of each run: the N-th page-table read
(``kmm.atomic.entry_read``, a preemption point of every command) sends it to the command's
process, from the pool worker that reaches it when a pool runs. Orphans are caught by
making the test process a child subreaper while the command runs: any process the
command left behind (alive or a zombie nobody reaped) becomes our child.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import random
import shutil
import signal

import pytest

from kmm import atomic
from kmm.tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
W = ROOT / "workloads"
PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is this one."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == me:
            out.append((int(d), rest[0]))
    return out


@pytest.fixture
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    before = {pid for pid, _ in _children()}
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield lambda: [c for c in _children() if c[0] not in before]
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid, _ in _children():  # whatever a failing command left: not our problem
            if pid not in before:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


def _signal_at(monkeypatch, n: int, sig: int) -> None:
    """Send ``sig`` to the command's process at the n-th page-table read."""
    target = os.getpid()
    orig = atomic.entry_read
    count = [0]

    async def entry_read(m, level, table, idx):
        count[0] += 1
        if count[0] == n:
            os.kill(target, sig)
        return await orig(m, level, table, idx)

    monkeypatch.setattr(atomic, "entry_read", entry_read)


def _failure_file(tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "keep.jsonl"
    assert cli.main(["explore", str(W / "race_fault_fault.py"), "--quiet", "--inject",
                     "huge_fault_no_pmd_none_recheck", "--out", str(out)]) == 1
    return out


COMMANDS = {
    "run-program-spawned": lambda d: ["run", str(W / "two_cpu_fault.py"), "--spawn", "cpus",
                                      "--mode", "random"],
    "run-scenario": lambda d: ["run", str(W / "khugepaged_collapse_max_ptes_none.toml")],
    "explore-1": lambda d: ["explore", str(W / "race_fault_fault.py"), "--quiet",
                            "--inject", "huge_fault_no_pmd_none_recheck"],
    "explore-1-out": lambda d: ["explore", str(W / "race_fault_fault.py"), "--quiet",
                                "--inject", "huge_fault_no_pmd_none_recheck",
                                "--out", str(d / "keep.jsonl")],
    "explore-2": lambda d: ["explore", str(W / "race_fault_collapse.py"), "--quiet",
                            "--schedules", "400", "--jobs", "2"],
    "replay": lambda d: ["replay", str(d / "keep.jsonl")],
    "bench": lambda d: ["bench", "--pages", "200", "--thps", "8", "--repeat", "1"],
}
# (command, upper bound of the seeded point, how many points)
# (a run of each has about 19, 7200, 790, 790, 2100 per schedule, 20 and 9700 points)
PLAN = [("run-program-spawned", 18, 3), ("run-scenario", 7000, 3), ("explore-1", 780, 4),
        ("explore-1-out", 780, 3), ("explore-2", 4000, 3), ("replay", 19, 2),
        ("bench", 9000, 2)]


@pytest.mark.parametrize("name, hi, points", PLAN, ids=[p[0] for p in PLAN])
def test_signal_at_seeded_points(name, hi, points, tmp_path, monkeypatch, capsys, subreaper):
    rng = random.Random(f"interrupt-{name}")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    keep = None
    if name in ("replay", "explore-1-out"):
        keep = _failure_file(work)
        kept = keep.read_bytes()
        shutil.copy(keep, tmp_path / "orig.jsonl")
    listing = sorted(os.listdir(work))
    capsys.readouterr()
    interrupted = 0
    for i in range(points):
        n = rng.randint(1, hi)
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        with monkeypatch.context() as mp:
            _signal_at(mp, n, sig)
            rc = cli.main(COMMANDS[name](work))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, (n, err)
        left = subreaper()
        assert left == [], f"{name} at point {n}: processes left behind {left}"
        if rc in (130, 143):
            interrupted += 1
            assert rc == 128 + sig, (n, rc, sig)
            want = "kmm: interrupted\n" if sig == signal.SIGINT else \
                "kmm: terminated (SIGTERM)\n"
            assert err == want, (n, err)
            assert sorted(os.listdir(work)) == listing, f"a file was written at point {n}"
            if keep is not None:
                assert keep.read_bytes() == kept
        else:  # the command ended before the point: its own outcome
            assert rc in (0, 1), (n, rc, err)
            for f in set(os.listdir(work)) - set(listing):
                os.unlink(work / f)
            if keep is not None:
                shutil.copy(tmp_path / "orig.jsonl", keep)
    assert interrupted >= 1, f"{name}: no point fell inside the run"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_sigterm_to_explore_pool_from_outside(tmp_path):
    """The user's case: SIGTERM from another process to `kmm explore --jobs 2` once it
    has reported progress; both pool workers end with it."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "kmm", "explore",
                          str(W / "race_fault_collapse.py"), "--schedules", "400",
                          "--jobs", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # the first progress line: the pool is running
    assert line.startswith("explore: "), line
    workers = [pid for pid, _ in _children_of(p.pid)]
    assert len(workers) >= 2
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143
    assert err.strip().splitlines()[-1] == "kmm: terminated (SIGTERM)"
    assert "Traceback" not in err
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"pool worker {pid} outlived explore"
    assert os.listdir(tmp_path) == []


def _children_of(ppid: int) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == ppid:
                out.append((int(d), rest[0]))
    return out


def _host_knobs() -> dict[str, str] | None:
    from kmm import sysfs
    from kmm.tools import oracle_host
    if not os.path.isdir(sysfs.THP_DIR) or os.geteuid() != 0:
        return None
    return {n: oracle_host.read_knob(n) for n in list(sysfs.KNOBS) + oracle_host._mthp_knobs()}


@pytest.mark.skipif(_host_knobs() is None, reason="the oracle needs root and THP")
def test_oracle_interrupted_at_seeded_points(tmp_path, monkeypatch, capsys, subreaper):
    """kmm oracle: the signal at the N-th command to a host worker; the knobs are the
    host's again, every worker reaped, one line."""
    from kmm.tools import oracle
    rng = random.Random("interrupt-oracle")

    def knobs():  # read under the oracle's lock: another engineer's run may be going on
        with oracle._run_lock():
            return _host_knobs()
    before = knobs()
    scenario = str(W / "dontneed_partial.toml")
    interrupted = 0
    for _ in range(3):
        n, sig = rng.randint(1, 6), rng.choice([signal.SIGINT, signal.SIGTERM])
        target, orig, count = os.getpid(), oracle.Workers.call, [0]

        def call(self, w, op, *args, **kw):
            count[0] += 1
            if count[0] == n:
                os.kill(target, sig)
            return orig(self, w, op, *args, **kw)

        with monkeypatch.context() as mp:
            mp.setattr(oracle.Workers, "call", call)
            rc = cli.main(["oracle", scenario, "--json"])
        out, err = capsys.readouterr()
        assert subreaper() == [], (n, sig, rc, err)
        after = knobs()
        assert after == before, (n, sig, rc, err, {k: (before[k], after[k]) for k in before
                                                  if before[k] != after[k]})
        assert not os.path.exists(oracle.SAVED_PATH), (n, sig, rc, err)
        if rc in (130, 143):
            interrupted += 1
            assert rc == 128 + sig
            assert err.splitlines()[-1] in ("kmm: interrupted", "kmm: terminated (SIGTERM)")
            assert "Traceback" not in err and out == ""
        else:
            assert rc == 0, err
    assert interrupted >= 1
