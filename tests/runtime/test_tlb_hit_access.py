"""User accesses that hit the TLB (kmm/fault.py user_access and store_run): in free mode
no kernel entry and no other actor can run, so such an access is no point (no trace
line, no sequence number) but still costs its emulated time; in the modes that choose,
it stays a point (a store through a stale TLB entry is what the race lab looks for,
docs/points.md class 5). The frames a store writes through a 2 MiB translation are
views into a host chunk (kmm/physmem.py) and hold the bytes as a bytearray frame does."""

from __future__ import annotations

import io
import json

from kmm import physmem as physmem_mod
from kmm.cost import COST_ACCESS
from kmm.machine import Machine, MachineConfig
from kmm.runtime.trace import Trace
from kmm.workload import Kernel

MiB = 1 << 20
PAGE = 4096


def _machine(mode: str = "free", sink=None) -> tuple[Machine, Kernel]:
    m = Machine(MachineConfig(memory=64 * MiB, cpus=1, seed=1), mode=mode, seed=1,
                trace=Trace(sink))
    return m, Kernel(m)


def test_free_mode_tlb_hits_are_no_points_but_cost_their_time():
    """A second pass of stores over a mapped THP (every translation cached, writable and
    dirty: the hardware's TLB hit, no do_user_addr_fault) adds no event in free mode,
    and the clock moves by COST_ACCESS per store; the bytes read back."""
    sink = io.StringIO()
    m, k = _machine(sink=sink)
    got = {}

    async def driver() -> None:
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 2 * MiB, value=1, stride=2 * MiB)  # the THP fault
        seq, now, lines = m.sched.seq, m.sched.now, sink.getvalue().count("\n")
        await p.touch(a, 2 * MiB, value=2, stride=PAGE)     # 512 TLB hits
        got["events"] = m.sched.seq - seq
        got["lines"] = sink.getvalue().count("\n") - lines
        got["time"] = m.sched.now - now
        got["bad"] = await p.verify()

    m.run(driver)
    assert m.vmstat.events["thp_fault_alloc"] == 1
    assert got == {"events": 0, "lines": 0, "time": 512 * COST_ACCESS, "bad": []}


def test_random_mode_stores_stay_points():
    """In a mode that chooses, each store that hits the TLB is still a ``store``
    point: another CPU may run between two of them (a TLB shootdown, a collapse)."""
    sink = io.StringIO()
    m, k = _machine(mode="random", sink=sink)

    async def driver() -> None:
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 2 * MiB, value=1, stride=2 * MiB)
        start = sink.getvalue().count("\n")
        await p.touch(a, 64 * PAGE, value=2, stride=PAGE)
        events = [json.loads(line) for line in sink.getvalue().splitlines()[start:]]
        assert [e["event"] for e in events] == ["store"] * 64
        assert await p.verify() == []

    m.run(driver)


def test_thp_frames_share_a_host_chunk_and_copy_out_as_bytes():
    """The frames of a PMD-mapped THP written through its 2 MiB translation are views
    into one 2 MiB chunk; a copy (copy_page) is a bytearray of the same bytes, a
    forgotten frame (clear_page) reads as zeros and comes back zeroed."""
    m, k = _machine()
    pm = m.physmem

    async def driver() -> None:
        p = await k.process()
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        await p.touch(a, 2 * MiB, value=1, stride=2 * MiB)
        await p.touch(a + PAGE, 2 * MiB - PAGE, value=9, stride=PAGE)
        assert await p.verify() == []

    m.run(driver)
    assert len(pm.chunks) == 1
    head = next(iter(pm.chunks)) << 9
    frame = pm.data[head + 1]
    assert isinstance(frame, memoryview) and frame[0] == 9 and not any(frame[1:])
    pm.copy(head + 700, head + 1)  # beyond the THP: a frame of its own
    assert isinstance(pm.data[head + 700], bytearray) and pm.read(head + 700, 0, 2) == b"\t\0"
    pm.clear(head + 1)
    assert pm.read(head + 1, 0, 1) == b"\0"
    pm.write(head + 1, 5, b"\x07")
    assert pm.read(head + 1, 0, 8) == b"\0" * 5 + b"\x07\0\0"
    assert physmem_mod._CHUNK == 512 * PAGE
