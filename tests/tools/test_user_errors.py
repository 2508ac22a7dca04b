"""A user's mistakes, as a new user meets them: one line naming the file (plus the
user's own frames when there are several), the documented exit code (0 ok, 1 a
violation or a failed check, 2 bad input, 3 an actor died), never kmm's internals and
never a user's mistake reported as a kernel bug."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from kmm.tools import cli, explore as ex, oracle

ROOT = pathlib.Path(__file__).resolve().parents[2]
W = ROOT / "workloads"


def kmm(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "kmm", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env,
                          timeout=timeout)


def write(tmp_path, name, text) -> pathlib.Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


PROGRAMS = {
    # name: (source, exit code, words of the one line)
    "syntax": ("async def main(k)\n    pass\n", 2, ["SyntaxError", "line 1"]),
    "not_async": ("def main(k):\n    pass\n", 2, ["async def main(k)"]),
    "raises": ("async def main(k):\n    raise ValueError('boom')\n", 1,
               ["ValueError: boom", "line 2, in main"]),
    "segv": ("async def main(k):\n    p = await k.process()\n    await p.store(0x1000, b'x')\n",
             1, ["killed by SIGSEGV (SEGV_MAPERR) at 0x1000", "line 3, in main"]),
    "bad_advice": ("async def main(k):\n    p = await k.process()\n"
                   "    a = await p.mmap(1 << 21)\n    await p.madvise(a, 1 << 21, 'hugepages')\n",
                   1, ["ValueError: madvise: advice 'hugepages' is not one of", "line 4"]),
    "oom": ("MACHINE = {'memory': '16MiB'}\nasync def main(k):\n    p = await k.process()\n"
            "    a = await p.mmap(64 << 20)\n    await p.touch(a, 64 << 20)\n", 1,
            ["process main killed by the OOM killer (SIGKILL", "line 5, in main"]),
    "bad_mmap": ("async def main(k):\n    p = await k.process()\n    await p.mmap(0)\n", 1,
                 ["KmmError: EINVAL: mmap(size=0x0", "line 3"]),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_errors_name_the_program_not_kmm(tmp_path, name):
    src, rc, words = PROGRAMS[name]
    prog = write(tmp_path, f"{name}.py", src)
    r = kmm("run", prog, cwd=tmp_path)
    assert r.returncode == rc, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one line: the only frame is named in it
    line = r.stderr.rstrip("\n")
    assert line.startswith(f"kmm: {prog.name}: ") or line.startswith(f"kmm: {prog}: "), line
    for w in words:
        assert w in line, line
    assert "kmm/" not in line and "Traceback" not in r.stderr
    full = kmm("run", prog, "--traceback", cwd=tmp_path)
    assert full.returncode == rc
    if rc == 1:  # the full stack, kmm's frames too, for who wants it
        assert "Traceback (most recent call last)" in full.stderr
        assert "kmm/" in full.stderr


def test_nested_frames_are_the_users_only(tmp_path):
    prog = write(tmp_path, "deep.py", """\
        def helper():
            raise KeyError("k")
        async def main(k):
            helper()
        """)
    r = kmm("run", prog.name, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "kmm: deep.py: KeyError: 'k' (deep.py, line 2, in helper)"
    assert "line 4, in main" in r.stderr and "kmm/" not in r.stderr
    assert all("deep.py" in ln or ln.startswith("    ") for ln in lines[1:])


DAEMON = """\
    class Broken:
        name = "broken"
        async def run(self, ctx):
            await ctx.sleep(1000)
            raise RuntimeError("policy bug")

    class Counter:
        name = "counter"
        async def run(self, ctx):
            ctx.count_vm_event("counter_wakeups")
            ctx.count_vm_event("counter_wakeups")
    """


def test_in_process_daemon_error_names_the_actor(tmp_path):
    write(tmp_path, "mymod.py", DAEMON)
    # loaded from the current directory with no PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = kmm("run", W / "two_cpu_fault.py", "--daemon", "mymod:Broken", cwd=tmp_path, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("kmm: actor broken (in-process daemon) raised: RuntimeError: "
                               "policy bug (mymod.py, line 5, in run)")


def test_daemon_from_cwd_counts_its_own_events(tmp_path):
    write(tmp_path, "mymod.py", DAEMON)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = kmm("run", W / "two_cpu_fault.py", "--daemon", "mymod:Counter", "--json",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vm_events"]["counter_wakeups"] == 2


def test_explore_labels_program_errors_not_kernel_bugs(tmp_path):
    for src, words in [("raise ValueError('mine')", "ValueError: mine"),
                       ("await p.store(0x1000, b'x')", "killed by SIGSEGV")]:
        prog = write(tmp_path, "p.py", f"""\
            async def main(k):
                p = await k.process()
                {src}
            """)
        summ = ex.explore(ex.Config(program=str(prog)), 2)
        assert summ.violations == {"program-error": 1}
        assert words in summ.first_violation["message"]
        assert "p.py" in summ.first_violation["message"]


def test_explore_missing_file_and_bad_numbers(tmp_path, capsys):
    assert cli.main(["explore", str(tmp_path / "nosuch.py")]) == 2
    assert capsys.readouterr().err == f"kmm explore: {tmp_path / 'nosuch.py'}: no such file\n"
    assert cli.main(["explore", str(W / "two_cpu_fault.py"), "--cpus", "0"]) == 2
    assert "--cpus must be at least 1" in capsys.readouterr().err.replace(" and --cpus", " --cpus")
    assert cli.main(["explore", str(W / "two_cpu_fault.py"), "--start", "-1"]) == 2
    assert capsys.readouterr().err == "kmm explore: --start must be at least 0\n"


def test_run_cpus_zero_is_bad_input(capsys):
    assert cli.main(["run", str(W / "two_cpu_fault.py"), "--cpus", "0"]) == 2
    assert capsys.readouterr().err == "kmm: --cpus must be at least 1\n"


def test_empty_scenario_is_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert cli.main(["run", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no steps" in err and str(empty) in err


def test_oracle_rejects_a_program(capsys):
    assert cli.main(["oracle", str(W / "two_cpu_fault.py")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "a program cannot run on the host kernel; the oracle runs scenarios" in err


def test_oracle_says_it_waits_for_the_lock(tmp_path, monkeypatch):
    lock = tmp_path / "oracle.lock"
    monkeypatch.setattr(oracle, "LOCK_PATH", str(lock))
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    heard = []
    try:
        with pytest.raises(oracle.OracleError, match="another kmm oracle run holds"):
            with oracle._run_lock(timeout=0, waiting=heard.append):
                pass
    finally:
        os.close(fd)
    assert heard == [f"waiting for another oracle run to finish (it holds {lock}; up to 0 s)"]
    with oracle._run_lock(timeout=0, waiting=heard.append):  # free: no word
        pass
    assert len(heard) == 1


def test_run_into_a_closed_pipe_exits_quietly():
    p = subprocess.Popen([sys.executable, "-m", "kmm", "run",
                          str(W / "dontneed_partial.toml"), "--json"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `| head` that has read enough: nobody reads the report
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0
    assert err == ""


def test_handshake_honours_child_timeout(tmp_path):
    r = kmm("run", W / "two_cpu_fault.py", "--daemon",
            f"exec:{sys.executable} -c 'import signal; signal.pause()'",  # never says Hello
            "--child-timeout", "0.5", timeout=30)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1
    assert "hung: sent no frame for 0.5 s while the owner waited for its Hello" in r.stderr


def test_a_daemon_printing_to_stdout_gets_a_hint():
    r = kmm("run", W / "two_cpu_fault.py", "--daemon",
            "exec:python -c 'print(\"hello world\", flush=True); import signal; signal.pause()'")
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1
    assert "it begins 'hello world'" in r.stderr
    assert "does the actor print to stdout? stdout carries the protocol" in r.stderr


def test_exec_python_is_this_interpreter(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho not-this-python >&2\nexit 42\n")
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    r = kmm("run", W / "two_cpu_fault.py", "--daemon",
            "exec:python daemons/examples/msgpack_daemon.py --scans 1", env=env)
    assert r.returncode == 0, r.stderr
    assert "not-this-python" not in r.stderr


def test_spawn_of_a_daemon_the_run_never_starts_says_so():
    r = kmm("run", W / "two_cpu_fault.py", "--spawn", "cpus,khugepaged")
    assert r.returncode == 0
    assert r.stderr == ("kmm: --spawn khugepaged: this run never started khugepaged, so "
                        "nothing was spawned for it (a program starts it with "
                        "k.start_daemon(\"khugepaged\"); a scenario with a khugepaged step)\n")


def test_oom_kills_the_process_as_linux_does(tmp_path):
    """No swap, more memory touched than the machine has: the OOM killer picks the
    process with the most pages (oom_badness), kills it with SIGKILL and counts
    oom_kill; the touch's step result is the signal, as the oracle reports a worker
    killed by a signal, and later steps of that process find no process."""
    sc = write(tmp_path, "oom.toml", """\
        [machine]
        memory = "16MiB"
        [[steps]]
        op = "mmap"
        region = "small"
        size = "1MiB"
        [[steps]]
        op = "touch"
        region = "small"
        [[steps]]
        op = "fork"
        child = "big"
        [[steps]]
        op = "mmap"
        proc = "big"
        region = "huge"
        size = "64MiB"
        [[steps]]
        op = "touch"
        proc = "big"
        region = "huge"
        [[steps]]
        op = "touch"
        proc = "big"
        region = "small"
        [[steps]]
        op = "check"
        region = "small"
        """)
    r = kmm("run", sc, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["steps"][4] == {"op": "touch", "ok": False, "signal": "SIGKILL"}
    assert rep["steps"][5] == {"op": "touch", "ok": False, "error": "no such process"}
    assert rep["steps"][6] == {"op": "check", "ok": True, "mismatches": 0}  # main lives
    assert rep["vm_events"]["oom_kill"] == 1
    assert list(rep["regions"]) == ["main/small"]


def test_failure_files_never_overwrite_each_other(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "FAILURE.jsonl"
    real.write_text("a user's earlier failure file\n")
    args = ["explore", str(W / "race_fault_fault.py"), "--quiet", "--inject",
            "huge_fault_no_pmd_none_recheck"]
    assert cli.main(args) == 1
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["FAILURE-race_fault_fault-1-2.jsonl", "FAILURE-race_fault_fault-1.jsonl",
                     "FAILURE.jsonl"]
    assert real.read_text() == "a user's earlier failure file\n"
    assert "failure file: FAILURE-race_fault_fault-1-2.jsonl" in out
    # --out names the file: replaced, whole
    assert cli.main(args + ["--out", "FAILURE.jsonl"]) == 1
    assert json.loads(real.read_text().splitlines()[0])["format"] == ex.FORMAT


KMMERROR_PROGRAM = """\
from kmm import KmmError, errno_name

async def main(k):
    p = await k.process("main")
    try:
        await p.mmap(0)
    except KmmError as e:
        first = [e.errno_name, e.errno, str(e), isinstance(e, OSError)]
    a = await p.mmap(2 << 20)
    r = await errno_name(p.madvise(a + 1, 4096, "dontneed"))
    try:
        await p.madvise(a, 4096, "hugepages")
    except ValueError as e:
        bad = str(e)
    res = await k.parallel(lambda cpu: p.on(cpu).munmap(a + 5, 4096),
                           lambda cpu: p.on(cpu).touch(a, 4096))
    return {"first": first, "r": r, "bad": bad,
            "par": [type(x).__name__ if isinstance(x, Exception) else x for x in res]}
"""


@pytest.mark.parametrize("spawn", [False, True], ids=["in-process", "spawned"])
def test_program_api_raises_kmmerror_with_the_errno_name(tmp_path, spawn):
    """The same errors, caught the same way, whether the program's CPUs are spawned."""
    from kmm.tools import runner
    prog = write(tmp_path, "errs.py", KMMERROR_PROGRAM)
    rep = runner.run_program(str(prog), spawn={"cpus"} if spawn else frozenset())
    assert rep["result"] == {
        "first": ["EINVAL", 22, "EINVAL: mmap(size=0x0, addr=0x200000200000): Invalid argument",
                  True],
        "r": "EINVAL",
        "bad": "madvise: advice 'hugepages' is not one of dontneed, free, cold, pageout, "
               "hugepage, nohugepage, collapse",
        "par": ["KmmError", 0]}


MEMCG = "/sys/fs/cgroup/memory"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(MEMCG + "/memory.limit_in_bytes"),
                    reason="needs root and a cgroup-v1 memory controller")
def test_host_oom_kill_is_sigkill_and_counted():
    """What the emulator's OOM killer reproduces, seen on the host safely: inside a 16 MiB
    memory cgroup (nothing outside it can be chosen), a process touching 64 MiB with no
    swap dies of SIGKILL and /proc/vmstat's oom_kill grows (mm/oom_kill.c counts OOM_KILL
    in __oom_kill_process for a cgroup's OOM as for the whole machine's)."""
    import mmap
    import signal

    def oom_kills() -> int:
        with open("/proc/vmstat") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("oom_kill "))
    cg = f"{MEMCG}/kmm-test-oom-{os.getpid()}"
    os.mkdir(cg)
    try:
        with open(cg + "/memory.limit_in_bytes", "w") as f:
            f.write(str(16 << 20))
        with open(cg + "/memory.memsw.limit_in_bytes" if os.path.exists(
                cg + "/memory.memsw.limit_in_bytes") else os.devnull, "w") as f:
            f.write(str(16 << 20))
        before = oom_kills()
        pid = os.fork()
        if pid == 0:  # the child joins the cgroup and touches 64 MiB
            try:
                with open(cg + "/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
                m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                for i in range(0, 64 << 20, 4096):
                    m[i] = 1
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert oom_kills() >= before + 1
    finally:
        os.rmdir(cg)
