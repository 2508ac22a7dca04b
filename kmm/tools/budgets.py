"""The budgets ``kmm bench`` prints as ratios (docs/budgets.md says how to read
them): stores to a mapped THP region against the host, and the explorer's schedules per
second per core on the race programs, with the checker on.

Stores. The emulated figure times ``Proc.touch`` with a 4 KiB stride over a THP region
already faulted in (every store finds its page mapped: the store path of
kmm/fault.py), on a machine built as ``kmm run`` builds it (digest on). The host figure
is what the host kernel spends per 4 KiB page a program touches in a fresh THP region
(one THP fault per 2 MiB, then plain stores): the first strided pass over a
MADV_HUGEPAGE mapping, per 4 KiB page. The target: the emulated store no slower.

Explore. ``kmm explore --check op --jobs 1`` in this process, as schedules per CPU
second (``time.process_time``: per core, whatever else loads the host), and the
preemption points per schedule (the scheduler's count in random mode).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

KiB, MiB = 1 << 10, 1 << 20
PAGE, HPAGE = 4 * KiB, 2 * MiB

TARGET_STORE = 1.0  # emulated store to a mapped THP page / host per 4 KiB page
# schedules per CPU second, --check op: (program, target)
EXPLORE_TARGETS = (("race_fault_fault.py", 500.0), ("race_fault_collapse.py", 100.0),
                   ("race_reclaim_split.py", 100.0))


def workload(name: str) -> str:
    import importlib.util
    spec = importlib.util.find_spec("kmm.workloads")  # found, not imported (layering)
    return os.path.join(list(spec.submodule_search_locations)[0], name)


# ------------------------------------------------------------------------ stores
def emulated_stores(thps: int) -> dict[str, Any]:
    """4 KiB-strided stores over ``thps`` THPs already mapped, digest on."""
    from kmm.machine import Machine, MachineConfig
    from kmm.runtime.trace import Trace
    from kmm.workload import Kernel
    m = Machine(MachineConfig(memory=max(1 << 30, 4 * thps * HPAGE)), trace=Trace())
    k = Kernel(m)
    size = thps * HPAGE
    out: dict[str, Any] = {}

    async def driver() -> None:
        p = await k.process("bench")
        a = await p.mmap(size)
        await p.madvise(a, size, "hugepage")
        await p.touch(a, size, value=1, stride=HPAGE)  # fault the THPs in
        if m.vmstat.events["thp_fault_alloc"] != thps:
            raise RuntimeError("the emulated THPs were not made")
        seq = m.sched.seq
        t0 = time.process_time()
        await p.touch(a, size, value=2, stride=PAGE)
        out["seconds"] = time.process_time() - t0
        out["points"] = m.sched.seq - seq

    m.run(driver)
    n = thps * (HPAGE // PAGE)
    return {"stores": n, **out, "us_per_store": out["seconds"] / n * 1e6}


def host_thp_touch(thps: int) -> dict[str, Any]:
    """The host's cost per 4 KiB page of touching a fresh MADV_HUGEPAGE region."""
    from kmm.tools.bench import MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE
    from kmm.tools.bench import PROT_READ, PROT_WRITE, _libc, smaps_range
    libc = _libc()
    size = thps * HPAGE
    length = size + HPAGE
    base = libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0)
    if base is None or base == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        addr = (base + HPAGE - 1) & ~(HPAGE - 1)
        if libc.madvise(addr, size, MADV_HUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")
        mv = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        n = size // PAGE
        t0 = time.process_time()
        mv[::PAGE] = b"\x01" * n
        seconds = time.process_time() - t0
        huge = smaps_range(addr, addr + size)["anon_huge_kb"]
        del mv
    finally:
        libc.munmap(base, length)
    return {"stores": n, "seconds": seconds, "us_per_page": seconds / n * 1e6,
            "thps_made": huge // (HPAGE // KiB)}


def store_bench(thps: int = 16, repeat: int = 3) -> dict[str, Any]:
    emu = min((emulated_stores(thps) for _ in range(repeat)), key=lambda r: r["seconds"])
    host = min((host_thp_touch(thps) for _ in range(repeat)), key=lambda r: r["seconds"])
    ratio = emu["us_per_store"] / host["us_per_page"]
    return {"thps": thps, "emulated": emu, "host": host, "ratio": ratio,
            "target": TARGET_STORE, "met": ratio <= TARGET_STORE}


# ----------------------------------------------------------------------- explore
def explore_rate(program: str, schedules: int, check: str = "op") -> dict[str, Any]:
    """Schedules per CPU second of ``kmm explore PROGRAM --check CHECK --jobs 1``, and
    the points of one schedule."""
    from kmm.tools import explore
    cfg = explore.Config(program=program, check=check)
    explore.run_schedule(cfg, "random", cfg.seed, {}, digest=False)  # warm: imports
    t0 = time.process_time()
    summ = explore.explore(cfg, schedules)
    cpu = time.process_time() - t0
    one = explore.run_schedule(cfg, "random", cfg.seed, {}, digest=False)
    return {"program": os.path.basename(program), "schedules": summ.schedules,
            "cpu_seconds": cpu, "per_s": summ.schedules / max(cpu, 1e-9),
            "points_per_schedule": one.points, "violations": summ.violations}


def explore_bench(schedules: int = 200) -> list[dict[str, Any]]:
    out = []
    for name, target in EXPLORE_TARGETS:
        r = explore_rate(workload(name), schedules)
        r.update(target=target, ratio=r["per_s"] / target, met=r["per_s"] >= target)
        out.append(r)
    return out


def format_targets(res: dict[str, Any]) -> list[str]:
    """The budget lines of the table: one per target, the ratio and whether it is met."""
    f, st, ex = res["faults"], res["stores"], res["explore"]
    r4 = f["4k"]
    lines = ["", "budgets (docs/budgets.md)",
             f"{'':<36}{'measured':>12}{'against':>12}{'ratio':>9}{'target':>10}  met"]

    def row(label: str, got: str, ref: str, ratio: float, need: str, met: bool) -> None:
        lines.append(f"{label:<36}{got:>12}{ref:>12}{ratio:>8.2f}x{need:>10}  "
                     f"{'yes' if met else 'NO'}")

    row("4K fault, as kmm run (digest on)", f"{r4['emulated_traced']['us_per_fault']:.1f} us",
        f"{r4['host']['us_per_fault']:.2f} us", r4["ratio_traced"], "<= 10x",
        r4["met_traced"])
    row("store to a mapped THP 4K page", f"{st['emulated']['us_per_store']:.2f} us",
        f"{st['host']['us_per_page']:.2f} us", st["ratio"], "<= 1x", st["met"])
    for r in ex:
        row(f"explore {r['program']}", f"{r['per_s']:.0f}/s", f"{r['target']:.0f}/s",
            r["ratio"], ">= 1x", r["met"])
    lines.append(f"points: {r4['emulated_traced']['points'] / r4['faults']:.1f} per 4K "
                 f"fault, {st['emulated']['points'] / st['emulated']['stores']:.2f} per "
                 "store to a mapped page; per schedule: "
                 + ", ".join(f"{r['program']} {r['points_per_schedule']}" for r in ex))
    lines.append("fault and store: ratio = emulated / host kernel (lower is better); "
                 "explore: schedules per CPU second (--check op, one job) / the goal "
                 "(higher is better).")
    return lines
