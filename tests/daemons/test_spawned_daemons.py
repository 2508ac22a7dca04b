"""Daemons in child processes (kmm run --spawn, --daemon exec:): the owner's trace and
report equal the all-in-process run, seed for seed; a child that raises, exits or hangs
stops the run with a report naming the actor, its last operation and its locks, the
trace kept and no process left behind."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from kmm.runtime import remote
from kmm.tools import runner

ROOT = pathlib.Path(__file__).resolve().parents[2]
RAW_DAEMON = ROOT / "daemons" / "examples" / "msgpack_daemon.py"

# Tiny programs, one per built-in daemon, each making its daemon do real work.
PROGRAMS = {
    "khugepaged": '''
        MACHINE = {"memory": "64MiB", "cpus": 2}
        MiB = 1 << 20
        async def main(k):
            k.set_knob("khugepaged/scan_sleep_millisecs", 1)
            k.set_knob("khugepaged/pages_to_scan", 1024)
            k.start_daemon("khugepaged")
            p = await k.process("app")
            a = await p.mmap(4 * MiB)
            await k.parallel(lambda cpu: p.on(cpu).touch(a, 2 * MiB, value=1),
                             lambda cpu: p.on(cpu).touch(a + 2 * MiB, 2 * MiB, value=2))
            await p.madvise(a, 4 * MiB, "hugepage")
            while k.smaps(p, a, 4 * MiB)[1] < 4096:
                await k.sleep(1_000_000)
            return {"huge_kb": k.smaps(p, a, 4 * MiB)[1], "lost": len(await p.verify())}
    ''',
    "kswapd": '''
        MACHINE = {"memory": "16MiB", "swap": "16MiB", "cpus": 1}
        MiB = 1 << 20
        async def main(k):
            k.set_knob("enabled", "always")
            p = await k.process("app")
            a = await p.mmap(32 * MiB)
            off = 0
            while k.zoneinfo()["nr_free"] >= k.zoneinfo()["low"]:
                await p.touch(a + off, 4096, value=1 + (off >> 21))
                off += 2 * MiB if off < 8 * MiB else 64 << 10
            await k.sleep(1_000_000_000)
            return {"lost": len(await p.verify()), "steal": k.vmstat()["pgsteal_kswapd"]}
    ''',
    "kcompactd": '''
        MACHINE = {"memory": "16MiB", "cpus": 1}
        MiB = 1 << 20
        async def main(k):
            from kmm import compaction
            k.set_knob("enabled", "never")
            p = await k.process("app")
            a = await p.mmap(2 * MiB)
            await p.touch(a, 2 * MiB, value=3)
            for off in range(0, 2 * MiB, 8192):
                await p.madvise(a + off, 4096, "dontneed")
            while k.buddyinfo()[9] or k.buddyinfo()[10]:
                if await k.alloc_kernel_pages(9) < 0:
                    break
            compaction.wakeup_kcompactd(k.machine, 9)
            await k.sleep(10_000_000)
            return {"wakes": k.vmstat()["compact_daemon_wake"], "lost": len(await p.verify())}
    ''',
    # registers its mm for khugepaged without starting it: the plug-in scans it
    "plugin": '''
        MiB = 1 << 20
        async def main(k):
            p = await k.process("app")
            a = await p.mmap(4 * MiB)
            await p.touch(a, 4 * MiB, value=7)
            await p.madvise(a, 4 * MiB, "hugepage")
            await k.sleep(100_000_000)
            return {"huge_kb": k.smaps(p, a, 4 * MiB)[1], "lost": len(await p.verify())}
    ''',
}

# The msgpack-only example's policy, as a kmm daemon class, plus the calls that go
# through each kind of forwarding: a record (ZoneState), a property written and read.
PLUGIN = '''
class RawPromote:
    name = "rawpromote"

    async def run(self, ctx):
        succeeded = 0
        for _ in range(8):
            if ctx.hugepage_pmd_enabled() and ctx.khugepaged_has_work():
                _, result = await ctx.khugepaged_scan_mm_slot(512)
                succeeded += result == "SCAN_SUCCEED"
            await ctx.sleep(10_000_000)
        return succeeded


class Probe:
    name = "probe"

    async def run(self, ctx):
        z = ctx.zone()
        assert z.free > z.high and type(z).__name__ == "ZoneState"
        ctx.khugepaged_sleep_expire = ctx.now + 5
        assert ctx.khugepaged_sleep_expire == ctx.now + 5
        assert isinstance(ctx.vmstat(), dict)
        try:
            ctx.knob("no/such/knob")
        except LookupError:
            pass
        await ctx.sleep(1000)


class Raises:
    name = "raises"

    async def run(self, ctx):
        await ctx.sleep(1000)
        ctx.zone()
        raise RuntimeError("policy bug")


class Exits:
    name = "exits"

    async def run(self, ctx):
        await ctx.sleep(1000)
        import os
        os._exit(7)


class Hangs:
    name = "hangs"

    async def run(self, ctx):
        await ctx.sleep(1000)
        import signal
        signal.pause()
'''


@pytest.fixture
def files(tmp_path, monkeypatch):
    for name, src in PROGRAMS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    (tmp_path / "spawn_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def children() -> list[int]:
    """Our child processes still in the process table (zombies included)."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == me:
                out.append(int(d))
    return out


def plugin(name):
    from kmm import daemon
    return daemon.load_daemon_spec(f"spawn_plugins:{name}")


@pytest.mark.parametrize("actor,mode,seed", [
    ("khugepaged", "free", 1), ("khugepaged", "random", 5),
    ("kswapd", "free", 1), ("kswapd", "random", 2),
    ("kcompactd", "free", 1), ("kcompactd", "random", 3),
])
def test_a_spawned_builtin_daemon_gives_the_in_process_trace(files, actor, mode, seed):
    """Seed for seed the owner's trace digest and the whole report are those of the
    all-in-process run, and the daemon did its work meanwhile."""
    prog = str(files / f"{actor}.py")
    before = children()
    local = runner.run_program(prog, mode=mode, seed=seed)
    spawned = runner.run_program(prog, mode=mode, seed=seed, spawn={actor})
    assert spawned["run"]["trace_sha256"] == local["run"]["trace_sha256"]
    assert spawned == local
    work = {"khugepaged": ("thp_collapse_alloc", spawned["vmstat"]),
            "kswapd": ("pgsteal_kswapd", spawned["vm_events"]),
            "kcompactd": ("compact_daemon_wake", spawned["vm_events"])}[actor]
    assert work[1][work[0]] > 0 or mode != "free"
    assert spawned["result"]["lost"] == 0
    assert children() == before


@pytest.mark.parametrize("mode,seed", [("free", 1), ("random", 4)])
def test_a_spawned_plugin_daemon_gives_the_in_process_trace(files, mode, seed):
    """A plug-in (--daemon module:Class) spawned by name: same report, its return value
    and records (ZoneState), properties and a refused call crossing the wire."""
    prog = str(files / "plugin.py")
    classes = [plugin("RawPromote"), plugin("Probe")]
    local = runner.run_program(prog, mode=mode, seed=seed, daemons=classes)
    spawned = runner.run_program(prog, mode=mode, seed=seed, daemons=classes,
                                 spawn={"rawpromote", "probe"})
    assert spawned == local
    assert spawned["vmstat"]["thp_collapse_alloc"] == 2


def test_the_msgpack_only_daemon_equals_its_in_process_twin(files):
    """daemons/examples/msgpack_daemon.py imports only msgpack; run by --daemon exec:,
    it makes the very trace its kmm-class twin makes in-process."""
    assert {l.split()[1].split(".")[0] for l in RAW_DAEMON.read_text().splitlines()
            if l.startswith(("import ", "from "))} <= {"argparse", "os", "struct", "sys",
                                                         "msgpack"}
    prog = str(files / "plugin.py")
    local = runner.run_program(prog, daemons=[plugin("RawPromote")])
    raw = runner.run_program(prog, daemons=[f"exec:{sys.executable} {RAW_DAEMON}"])
    assert raw == local
    assert raw["result"]["huge_kb"] == 4096


@pytest.mark.parametrize("name,reason,timeout", [
    ("Raises", "failed: RuntimeError: policy bug", 60),
    ("Exits", "exited with status 7", 60),
    ("Hangs", "hung: sent no frame for 0.5 s", 0.5),  # only the hang needs a short one
])
def test_a_dead_child_stops_the_run_with_a_report(files, tmp_path, name, reason, timeout):
    """A child that raises, exits or hangs: ChildDied names the actor, its pid, its last
    operation and its locks; the trace so far is kept; no process is left."""
    before = children()
    cls = plugin(name)
    with open(tmp_path / "trace.jsonl", "w") as trace:
        with pytest.raises(remote.ChildDied) as ei:
            runner.run_program(str(files / "plugin.py"), daemons=[cls], trace_file=trace,
                               spawn={"daemons"}, child_timeout=timeout)
    e = ei.value
    assert e.actor == cls.name and e.reason.startswith(reason)
    assert e.last_op.startswith("sleep" if name != "Raises" else "zone")
    assert e.held == ()
    assert f"actor {cls.name} (child pid {e.pid})" in str(e) and "locks held: none" in str(e)
    assert (tmp_path / "trace.jsonl").read_text().count("\n") > 100
    assert children() == before


def test_cli_spawn_validation_and_report(files, tmp_path):
    """--spawn names are checked (the valid ones listed); a crash is a one-paragraph
    report on stderr with exit status 3 and the trace kept."""
    env = dict(os.environ, PYTHONPATH=str(files))
    kmm = [sys.executable, "-m", "kmm", "run", str(files / "plugin.py")]
    r = subprocess.run(kmm + ["--spawn", "khugepaged,nosuch"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("kmm: --spawn: unknown actor 'nosuch'")
    valid = r.stderr.partition("(valid: ")[2].rstrip(")\n").split(", ")
    assert {"cpus", "daemons", "kcompactd", "khugepaged", "kswapd"} <= set(valid)
    r = subprocess.run(kmm + ["--daemon", "spawn_plugins:Raises", "--spawn", "raises",
                              "--trace", str(tmp_path / "t.jsonl")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 3
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kmm: actor raises (child pid ") and "policy bug" in last
    assert f"trace kept in {tmp_path / 't.jsonl'}" in last
    assert (tmp_path / "t.jsonl").stat().st_size > 0
