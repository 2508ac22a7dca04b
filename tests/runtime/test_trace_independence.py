"""Nothing about scheduling depends on --trace (issue 15): a run with a trace and the
same run without one pass the same points, in the same emulated time."""

from __future__ import annotations

import io

from kmm import huge_memory_split
from kmm.machine import Machine, MachineConfig
from kmm.runtime.trace import Trace
from kmm.workload import Kernel

MiB = 1 << 20


async def _program(m, k) -> None:
    """THP faults, a partial munmap (the deferred split queue), a fork with COW, a
    split by the shrinker, 4K faults and a reclaim-free exit: every kind of point."""
    p = await k.process()
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    await p.touch(a, 4 * MiB)
    await p.munmap(a + 1 * MiB, 1 * MiB)          # partially mapped: queued for split
    c = await p.fork("child")
    await c.touch(a + 2 * MiB, 64 << 10, value=7)  # COW of a PMD-mapped THP
    await huge_memory_split.deferred_split_scan(m, 128)
    b = await p.mmap(256 << 10)
    await p.madvise(b, 256 << 10, "nohugepage")
    await p.touch(b, 256 << 10)
    await c.exit()
    await p.exit()


def _run(trace) -> tuple[int, int, int]:
    m = Machine(MachineConfig(memory=256 * MiB, cpus=2, seed=3), trace=trace)
    k = Kernel(m)

    async def driver() -> None:
        await _program(m, k)

    m.run(driver)
    return m.sched.seq, m.sched.now, m.vmstat.events.get("thp_deferred_split_page", 0)


def test_a_trace_changes_neither_the_points_nor_the_clock():
    bare = _run(None)
    hashed = _run(Trace(None))
    sink = io.StringIO()
    written = _run(Trace(sink))
    assert bare[2] == 1  # the program reached deferred_split_folio
    assert bare == hashed == written
    assert len(sink.getvalue().splitlines()) == bare[0]  # one line per point (no sleeps)
