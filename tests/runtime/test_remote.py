"""kmm.runtime.remote, the owner's side: handshake, serve, supervision of a child that
breaks the protocol; no process left behind; Ctrl-C kills the children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from kmm.runtime import remote
from kmm.runtime.wire import Call


def script(tmp_path, body: str) -> list[str]:
    """A child in plain Python speaking the protocol (helpers w, r, hello)."""
    src = textwrap.dedent('''
        import os, struct, sys, msgpack
        def w(d):
            b = msgpack.packb(d, use_bin_type=True)
            os.write(1, struct.pack(">I", len(b)) + b)
        def r():
            n = struct.unpack(">I", os.read(0, 4))[0]
            return msgpack.unpackb(os.read(0, n), raw=False)
        def hello(name="t"):
            w({"kind": "hello", "actor": name, "pid": os.getpid(), "protocol": 1})
            return r()
    ''') + textwrap.dedent(body)
    path = tmp_path / "child.py"
    path.write_text(src)
    return [sys.executable, str(path)]


class Target:
    def __init__(self):
        self.x = 0

    def add(self, n: int) -> int:
        self.x += n
        return self.x

    async def later(self, n: int) -> tuple[int, int]:
        await trio.lowlevel.checkpoint()
        return n, n * 2

    @property
    def value(self) -> int:
        return self.x

    @value.setter
    def value(self, v: int) -> None:
        self.x = v


def test_interface_lists_calls_by_kind():
    iface = remote.interface(Target)
    assert iface == {"add": {"kind": "sync", "shape": None},
                     "later": {"kind": "async", "shape": "tuple"},
                     "value": {"kind": "setter", "shape": None}}


async def test_serve_runs_calls_and_returns_the_bye_value(tmp_path):
    argv = script(tmp_path, '''
        calls = hello()["value"]["calls"]
        assert calls["add"]["kind"] == "sync"
        out = []
        for i, (m, a) in enumerate([("add", [2]), ("later", [3]), ("value", [10]),
                                    ("value", []), ("nope", [])], 1):
            w({"kind": "call", "id": i, "actor": "t", "method": m, "args": a, "kwargs": {}})
            out.append(r())
        w({"kind": "bye", "actor": "t", "value": [o.get("value", o.get("error")) for o in out]})
    ''')
    target = Target()
    iface, dispatch = remote.object_dispatch(target)
    child = await remote.open_child(argv, "t", timeout=10, interface=iface)
    value = await remote.supervise(child, dispatch)
    assert value == [2, [3, 6], None, 10, "AttributeError"]
    assert child.proc.returncode == 0


@pytest.mark.parametrize("body,reason", [
    ('hello("other")', "introduced itself as 'other'"),
    ('w({"kind": "reply", "id": 0, "value": 1})', "sent 'reply' before its hello"),
    ('os.write(1, struct.pack(">I", 1 << 30))', "sent a malformed frame"),
    ('hello(); os.write(1, struct.pack(">I", 4) + b"ab"); os.close(1)', "malformed frame"),
    ('hello(); w({"kind": "hello", "actor": "t", "pid": 1, "protocol": 1})',
     "sent an unexpected 'hello' record"),
    ('hello(); os._exit(5)', "exited with status 5"),
    ('hello(); os.kill(os.getpid(), 9)', "was killed by SIGKILL"),
    ('hello(); sys.stdin.read()', "hung: sent no frame for 0.3 s"),
])
async def test_a_broken_child_is_reported_and_reaped(tmp_path, body, reason):
    argv = script(tmp_path, body)
    _, dispatch = remote.object_dispatch(Target())
    with pytest.raises(remote.ChildDied) as ei:
        child = await remote.open_child(argv, "t", timeout=0.3, interface={})
        await remote.supervise(child, dispatch)
    assert ei.value.actor == "t" and reason in ei.value.reason, ei.value.reason
    with pytest.raises(ProcessLookupError):  # reaped, not a zombie
        os.kill(ei.value.pid, 0)


def test_parse_spawn():
    assert remote.parse_spawn("cpus, khugepaged") == {"cpus", "khugepaged"}
    assert remote.parse_spawn("mine", ["mine"]) == {"mine"}
    with pytest.raises(remote.SpawnError, match=r"unknown actor 'x' \(valid: cpus, daemons"):
        remote.parse_spawn("x")
    with pytest.raises(remote.SpawnError, match="empty"):
        remote.parse_spawn(" , ")


PROGRAM = '''
async def main(k):
    k.start_daemon("khugepaged")
    await k.sleep(1_000_000)
    import os, signal
    os.kill(os.getpid(), signal.SIGINT)  # the owner runs the program
    await k.sleep(1_000_000)
'''


def test_ctrl_c_kills_the_children(tmp_path):
    """SIGINT to the owner while a spawned daemon runs: the run ends with 'interrupted'
    (status 130) and the child is gone."""
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    r = subprocess.run([sys.executable, "-m", "kmm", "run", str(prog), "--spawn",
                        "khugepaged", "--child-timeout", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr.strip().endswith("kmm: interrupted"), r.stderr
