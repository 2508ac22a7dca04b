"""Fuzzing, bounded (each test a few seconds; derandomized, so a failure reproduces):

- scenario files, random text and mutations of the shipped workloads: `kmm run` never
  shows a traceback; it exits 0, 1 or 2, and 2 is one line on stderr;
- the wire: random bytes and truncated frames, read by the owner's FrameStream and the
  child's SyncFrames (a record, the clean end, or WireError: nothing else, no hang), and
  sent into a spawned actor's child (it exits with one named line) or out of one into
  the owner (ChildDied, named, the child reaped);
- the program API: random call sequences with bad arguments: every refusal is KmmError,
  or a TypeError/ValueError naming the argument; the machine still passes the invariant
  checker after every call.

``KMM_FUZZ_SCALE=N`` runs N times as many examples per test, not derandomized (the long
run: ``KMM_FUZZ_SCALE=10 python -m pytest tests/tools/test_fuzz.py -s`` prints the
case counts)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmm import fault, testing
from kmm.runtime import remote, wire
from kmm.runtime.msgs import WireError
from kmm.tools import cli
from kmm.tools.scenario import ScenarioError, load_scenario, step_range
from kmm.uapi import KmmError, OomKilled

ROOT = pathlib.Path(__file__).resolve().parents[2]
W = ROOT / "workloads"
SCALE = int(os.environ.get("KMM_FUZZ_SCALE", "0"))
COUNTS: dict[str, int] = {}


def fuzz(examples: int):
    return settings(max_examples=examples * (SCALE or 1), deadline=None,
                    derandomize=not SCALE,
                    suppress_health_check=list(HealthCheck), database=None)


def counted(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    sys.stderr.write(f"\nfuzz cases: {json.dumps(COUNTS, sort_keys=True)}\n")


# ------------------------------------------------------------------- scenarios
SEEDS = [p.read_text() for p in sorted(W.glob("*.toml"))[:24]]
VALUES = ["-1", "0", "1", "4095", '"8KiB"', '"15MiB"', '"16MiB"', "1.5", "true", '"x"',
          '"4MiB"', '"1TiB"', "[]", "{}",
          '"hugepages"', '"none"', "99999999999999999999999", '""', '"a/b"', '"4KiB"',
          '"rw"', '"collapse"', "511", "512", '"main"', '"c1"']
KEYS = ["op", "region", "size", "offset", "length", "advice", "prot", "proc", "child",
        "write", "value", "stride", "full_scans", "memory", "swap", "cpus", "enabled"]
MAX_ACCESSES = 20_000  # a valid scenario that would touch more is only loaded


@st.composite
def mutated_scenario(draw) -> str:
    lines = draw(st.sampled_from(SEEDS)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["del", "dup", "value", "key", "trunc", "junk", "swap"]))
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "del":
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + draw(st.sampled_from(VALUES))
        elif kind == "key" and "=" in lines[i]:
            lines[i] = draw(st.sampled_from(KEYS)) + " =" + lines[i].split("=", 1)[1]
        elif kind == "trunc":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=20)))
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + "\n"


def cheap(path: pathlib.Path) -> bool:
    try:
        sc = load_scenario(path)
    except ScenarioError:
        return True  # refused on load: as cheap as it gets
    sizes = {}
    total = 0
    for s in sc.steps:
        if s.op == "mmap":
            sizes[(s.proc, s.region)] = s.size
        if s.op in ("touch", "check"):
            lo, hi = step_range(s, sizes.get((s.proc, s.region), 0) or 0)
            total += max(hi - lo, 0) // max(s.stride, 1)
        if s.op == "khugepaged" and (s.full_scans or 1) > 3:
            return False
    return total <= MAX_ACCESSES and sc.machine.memory <= (1 << 40)


def run_cli(path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["run", str(path), "--json"])
    return rc, out.getvalue(), err.getvalue()


def check_run(path: pathlib.Path, name: str) -> None:
    if not cheap(path):
        return
    counted(name)
    rc, out, err = run_cli(path)
    counted(f"{name}-exit-{rc}")
    assert rc in (0, 1, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("kmm: "), err
    if rc == 0:
        assert "vmstat" in json.loads(out)


@fuzz(150)
@given(text=mutated_scenario())
def test_mutated_scenarios(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("sc") / "s.toml"
    path.write_text(text)
    check_run(path, "scenario-mutated")


@fuzz(60)
@given(data=st.one_of(st.binary(max_size=200),
                      st.text(alphabet=st.sampled_from('[]=."\n abcdefghiopstu0123MiB'),
                              max_size=120)))
def test_random_scenario_text(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("sc") / "r.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    check_run(path, "scenario-random")


# ------------------------------------------------------------------------ wire
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
RECORDS = st.one_of(
    st.builds(wire.Hello, st.text(max_size=8), st.integers(0, 1 << 20), st.integers(0, 3)),
    st.builds(wire.Call, st.integers(0, 9), st.text(max_size=8), st.text(max_size=8),
              st.lists(INT64, max_size=3), st.dictionaries(st.text(max_size=3),
                                                           INT64, max_size=2)),
    st.builds(wire.Reply, st.integers(0, 9), INT64),
    st.builds(wire.Fault, st.integers(0, 9), st.text(max_size=8), st.text(max_size=8)),
    st.builds(wire.Bye, st.text(max_size=8), st.none()))


@st.composite
def wire_bytes(draw) -> bytes:
    """Valid frames, then damage: a cut, random bytes, a bad length, or all random."""
    kind = draw(st.sampled_from(["random", "cut", "junk", "length", "body"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    frames = b"".join(wire.pack(r) for r in draw(st.lists(RECORDS, min_size=1, max_size=3)))
    if kind == "cut":
        return frames[:draw(st.integers(0, len(frames)))]
    if kind == "junk":
        i = draw(st.integers(0, len(frames)))
        return frames[:i] + draw(st.binary(min_size=1, max_size=16)) + frames[i:]
    if kind == "length":
        return draw(st.integers(0, 1 << 32 - 1)).to_bytes(4, "big") + frames
    body = msgpack.packb(draw(st.one_of(INT64, st.text(max_size=5),
                                        st.dictionaries(st.text(max_size=4), INT64,
                                                        max_size=3))))
    return len(body).to_bytes(4, "big") + body


class _Bytes:
    """A trio ReceiveStream over fixed bytes, in small chunks."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_some(self, n=None):
        await trio.lowlevel.checkpoint()
        chunk, self.data = self.data[:7], self.data[7:]
        return chunk


@fuzz(300)
@given(data=wire_bytes())
def test_owner_reads_damaged_frames(data):
    counted("wire-owner-stream")

    async def read():
        fs = wire.FrameStream(None, _Bytes(data), "fuzz")
        with trio.fail_after(5):
            for _ in range(100):
                try:
                    if await fs.receive() is None:
                        return
                except WireError as e:
                    assert str(e).startswith("fuzz: ")
                    return
    trio.run(read)


@fuzz(300)
@given(data=wire_bytes())
def test_child_reads_damaged_frames(data):
    counted("wire-child-frames")
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = None
        frames = wire.SyncFrames(r, -1, "owner")
        for _ in range(100):
            try:
                if frames.receive() is None:
                    break
            except WireError:
                break
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


ROLES = [["daemon", "kmm.daemons.kswapd:Kswapd"], ["program", str(W / "two_cpu_fault.py")]]


@fuzz(8)
@given(data=wire_bytes(), role=st.sampled_from(ROLES))
def test_spawned_actor_fed_damaged_frames(data, role):
    """The owner's side garbled: the child says what is wrong in one line and exits."""
    counted(f"wire-into-spawned-{role[0]}")
    p = subprocess.Popen([sys.executable, "-m", "kmm.runtime.child", *role], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        _, err = p.communicate(data, timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err.decode()
    assert "Traceback" not in err, err
    assert p.returncode in (0, 1), (p.returncode, err)
    if p.returncode == 1:
        assert err.count("\n") == 1 and err.startswith("kmm.runtime.child: "), err


@fuzz(6)
@given(data=wire_bytes())
def test_owner_fed_damaged_frames_by_a_child(data):
    """A child sends garbage then exits: ChildDied names it; the child is reaped."""
    counted("wire-out-of-spawned-actor")
    code = f"import sys; sys.stdout.buffer.write(bytes.fromhex({data.hex()!r}))"

    async def main():
        with trio.fail_after(60):
            try:
                child = await remote.open_child([sys.executable, "-c", code], "x", timeout=30)
            except remote.ChildDied as e:
                assert e.actor and e.pid
                return
            await child.aclose()
    trio.run(main)
    assert not remote._LIVE


# ----------------------------------------------------------------- program API
GOOD_LEN = st.sampled_from([4096, 8192, 1 << 20, 2 << 20, 4 << 20])
BAD_INT = st.sampled_from([-1, -4096, 0, 1, 4095, 1 << 63, (1 << 64) + 4096, "4096", None,
                           1.5, True, b"x", [4096]])
ADVICE = st.sampled_from(["hugepage", "nohugepage", "dontneed", "collapse", "pageout",
                          "cold", "free", "hugepages", "", None, 14, "HUGEPAGE"])
PROT = st.sampled_from(["none", "r", "rw", "rwx", "w", None, 3])


@st.composite
def api_call(draw):
    op = draw(st.sampled_from(["mmap", "munmap", "mprotect", "madvise", "touch", "store",
                               "load", "fork", "exit", "split_huge_page", "mremap"]))
    good = draw(st.booleans())

    def addr():
        return draw(st.integers(0, 8) .map(lambda i: i * 4096)) if good else draw(BAD_INT)

    def length():
        return draw(GOOD_LEN) if good else draw(st.one_of(GOOD_LEN, BAD_INT))
    if op == "mmap":
        return op, (length(),)
    if op in ("munmap", "split_huge_page"):
        return op, (addr(), length())
    if op == "mprotect":
        return op, (addr(), length(), draw(PROT))
    if op == "madvise":
        return op, (addr(), length(), draw(ADVICE))
    if op == "touch":
        return op, (addr(), draw(st.sampled_from([4096, 1 << 20, -1, "x"]))), \
            {"value": draw(st.sampled_from([0, 7, 255, 256, -1, "a"])),
             "stride": draw(st.sampled_from([4096, 0, -4096, 65536, None]))}
    if op == "store":
        return op, (addr(), draw(st.sampled_from([b"ab", b"", "text", 5, bytearray(b"z")])))
    if op == "load":
        return op, (addr(), draw(st.sampled_from([1, 0, 4096, -1, "1"])))
    if op == "fork":
        return op, (draw(st.sampled_from(["c1", "c2", "", None, 5])),)
    if op == "mremap":
        return op, (addr(), length(), length(), addr())
    return op, ()


PARAMS = {"mmap": ("size", "addr"), "munmap": ("addr", "length"),
          "mprotect": ("addr", "length", "prot"), "madvise": ("addr", "length", "advice"),
          "touch": ("addr", "length", "value", "stride"), "store": ("addr", "data"),
          "load": ("addr", "n"), "fork": ("child",), "exit": (),
          "split_huge_page": ("addr", "length"),
          "mremap": ("addr", "old_len", "new_len", "new_addr")}


@fuzz(100)
@given(calls=st.lists(api_call(), min_size=1, max_size=12))
def test_program_api_with_bad_arguments(calls):
    counted("program-api-sequences")

    async def body(m, k):
        p = await k.process("main")
        base = await p.mmap(8 << 20)
        n = 0
        for op, args, *kw in calls:
            counted("program-api-calls")
            kw = kw[0] if kw else {}
            if not p.task.alive:
                n += 1
                p = await k.process(f"p{n}")
                base = await p.mmap(8 << 20)
            args = tuple(base + a if isinstance(a, int) and not isinstance(a, bool)
                         and 0 <= a < (1 << 24) and i == 0 and op != "mmap"
                         and op != "fork" else a for i, a in enumerate(args))
            try:
                r = await getattr(p, op)(*args, **kw)
            except KmmError as e:
                assert e.errno_name.startswith("E") and op in str(e)
            except (TypeError, ValueError) as e:
                assert any(name in str(e) for name in PARAMS[op]), (op, args, kw, e)
                assert str(e).startswith(op), e
            except (fault.Segv, OomKilled):
                assert not p.task.alive
            except fault.OutOfMemory:
                assert op == "fork"
            else:
                if op == "fork":
                    assert r.task.alive
            testing.check_invariants(m, k)

    testing.run_machine(body, memory=64 << 20)
