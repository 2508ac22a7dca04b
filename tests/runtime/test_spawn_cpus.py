"""A program's CPU actors in child processes (kmm run --spawn cpus): the same trace and
report as in-process, seed for seed; a branch that crashes, exits or hangs is reported
with its actor's name, pid, last operation and held locks, and no process is left."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from kmm.runtime.remote import ChildDied
from kmm.tools.runner import run_program

WORKLOADS = Path(__file__).resolve().parents[2] / "workloads"

# nested k.parallel, a fork in a branch, a Proc and a tuple and an int-keyed dict and a
# returned SIGSEGV travelling back, k.machine read through its view
NESTED = """
MACHINE = {"memory": "64MiB"}
MiB = 1 << 20

async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")

    async def inner(cpu):
        q = p.on(cpu)
        await q.touch(a + cpu * 4096, 2 * MiB - cpu * 4096, value=cpu + 1, stride=64 << 10)
        return (cpu, k.smaps(q, a, 2 * MiB))

    async def outer(cpu):
        return await k.parallel(inner, inner)

    async def forker(cpu):
        c = await p.on(cpu).fork("child")
        await c.store(a + 2 * MiB, b"xy")
        return c

    async def crash(cpu):
        victim = await k.process("victim")
        await victim.on(cpu).load(0x1000)  # SIGSEGV kills the victim, not main

    r = await k.parallel(outer, forker, crash)
    child = r[1]
    return {"inner": r[0], "child": child.name, "child_byte": await child.load(a + 2 * MiB, 2),
            "segv": type(r[2]).__name__, "cpus": {i: i * 2 for i in range(k.cpus)},
            "free": k.zoneinfo()["nr_free"] > 0, "now": k.machine.sched.now > 0,
            "events": k.machine.vmstat.events["thp_fault_alloc"],
            "lost": len(await p.verify())}
"""


def _program(tmp_path: Path, body: str, name: str = "prog.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _descendants_of(path: str) -> list[int]:
    """Processes (zombies included) still running the program file: none may remain."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if path.encode() in cmd and b"kmm.runtime.child" in cmd:
            out.append(int(pid))
    return out


@pytest.mark.parametrize("mode,seed", [("free", 1), ("random", 5)])
def test_nested_parallel_same_trace_and_report(tmp_path, mode, seed):
    path = _program(tmp_path, NESTED)
    local = run_program(path, cpus=2, seed=seed, mode=mode)
    spawned = run_program(path, cpus=2, seed=seed, mode=mode, spawn={"cpus"})
    assert spawned["run"]["trace_sha256"] == local["run"]["trace_sha256"]
    assert spawned == local
    res = spawned["result"]
    assert res["child"] == "child" and res["child_byte"] == b"xy"
    assert res["segv"] == "Segv" and res["lost"] == 0
    assert isinstance(res["inner"][0], tuple) and isinstance(res["inner"][0][1], tuple)
    assert res["cpus"] == {0: 0, 1: 2}  # int keys survive the trip
    assert not _descendants_of(path)


@pytest.mark.parametrize("seed", [3, 7])
def test_two_cpu_fault_workload_random(seed):
    path = str(WORKLOADS / "two_cpu_fault.py")
    local = run_program(path, cpus=2, seed=seed, mode="random")
    spawned = run_program(path, cpus=2, seed=seed, mode="random", spawn={"cpus"})
    assert spawned["run"]["trace_sha256"] == local["run"]["trace_sha256"]
    assert spawned == local
    assert spawned["result"] == {"lost_bytes": 0}


def test_trace_file_byte_identical(tmp_path):
    path = _program(tmp_path, NESTED)
    files = []
    for spawn in ((), {"cpus"}):
        out = tmp_path / f"trace{len(files)}.jsonl"
        with open(out, "w") as f:
            # seed 8: a schedule where the fork and the faults race into a split (a
            # long trace); which seeds do depends on the scheduler's choice points
            run_program(path, cpus=2, seed=8, mode="random", trace_file=f, spawn=spawn)
        files.append(out.read_bytes())
    assert files[0] == files[1] and files[0].count(b"\n") > 1000


def test_branches_share_no_python_objects(tmp_path):
    """Like fork(): a branch's change to a program object stays in its process."""
    path = _program(tmp_path, """
        async def main(k):
            seen = []
            async def add(cpu):
                seen.append(cpu)
                return len(seen)
            r = await k.parallel(add, add)
            return {"results": r, "seen": seen}
        """)
    assert run_program(path, cpus=2)["result"] == {"results": [1, 2], "seen": [0, 1]}
    assert run_program(path, cpus=2, spawn={"cpus"})["result"] == {
        "results": [1, 1], "seen": []}


FAILING = """
import os, signal
MiB = 1 << 20

async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)

    async def good(cpu):
        await p.on(cpu).touch(a, MiB)

    async def bad(cpu):
        await p.on(cpu).store(a, b"z")
        {action}

    await k.parallel(good, bad)
"""


@pytest.mark.parametrize("action,reason,timeout", [
    ("raise RuntimeError('policy bug')", "failed: RuntimeError: policy bug", 60),
    ("os._exit(3)", "exited with status 3", 60),
    ("signal.pause()", "hung", 1),  # only the hang needs a short timeout
])
def test_branch_failure_is_reported(tmp_path, action, reason, timeout):
    path = _program(tmp_path, FAILING.replace("{action}", action))
    trace = tmp_path / "out.jsonl"
    with open(trace, "w") as f, pytest.raises(ChildDied) as err:
        run_program(path, cpus=2, seed=1, trace_file=f, spawn={"cpus"}, child_timeout=timeout)
    e = err.value
    assert re.fullmatch(r"cpu1\.\d+", e.actor)  # the bad branch: second of the parallel
    assert reason in e.reason
    assert e.pid and e.pid > 0
    assert e.last_op.startswith("p.store")
    assert "locks held: none" in str(e)
    assert trace.stat().st_size > 0  # the trace is kept
    assert not _descendants_of(path)


def test_program_failure_in_main_process(tmp_path):
    path = _program(tmp_path, """
        async def main(k):
            p = await k.process("main")
            await p.mmap(1 << 21)
            raise KeyError("oops")
        """)
    with pytest.raises(ChildDied) as err:
        run_program(path, spawn={"cpus"})
    assert err.value.actor == "main" and "KeyError" in err.value.reason
    assert err.value.last_op.startswith("p.mmap")
    assert not _descendants_of(path)


def test_bad_call_raises_in_the_program(tmp_path):
    """A bad call (an unknown knob) is raised in the program, which may catch it."""
    path = _program(tmp_path, """
        async def main(k):
            try:
                k.set_knob("no_such_knob", 1)
            except (KeyError, ValueError) as e:
                return type(e).__name__
        """)
    assert run_program(path, spawn={"cpus"})["result"] == run_program(path)["result"]
