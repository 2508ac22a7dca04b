"""``kmm bench``: the budgets of docs/budgets.md, measured in one run.

A benchmark, not a test: fault and store figures are CPU time of this process
(``time.process_time``: user + system, so the host kernel's fault handling counts and
other load on the host does not), the spawn and start-up figures wall-clock; each is
the best of ``repeat`` runs.

Faults. The emulated figure times only ``Proc.touch`` (one byte written per 4 KiB page
in a MADV_NOHUGEPAGE region, or per 2 MiB in a MADV_HUGEPAGE one, enabled=madvise) on a
fresh machine; machine construction, mmap and madvise are outside the clock. It is
measured twice: on a bare ``Machine`` (no trace) and on a machine as ``kmm run`` builds
it (``runner.build_machine``: every point folded into the trace digest, nothing
rendered). The host figure comes from the same touches on memory mmap'd through ctypes:
the bytes are written by one strided memoryview assignment (a C loop, no Python per
page); that pass is timed, then the same pass over the now-faulted memory, and the
difference is the kernel's cost of the faults. /proc/self/smaps (AnonHugePages) and
/proc/vmstat (thp_fault_alloc) show whether the host really made the THPs.

Start-up. Construction time and Python-heap growth (tracemalloc) of a 1 GiB and a
1 TiB machine, then the sizes of ``physmem.pages/data/tables`` after the same small
workload on each: a 1 TiB machine should cost what a 1 GiB one does.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
import tracemalloc
from typing import Any

from kmm.machine import Machine, MachineConfig
from kmm.runtime.trace import Trace
from kmm.workload import Kernel

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PAGE = 4 * KiB
HPAGE = 2 * MiB

# docs/budgets.md: emulated cost / host cost at most this
TARGET_4K = 10.0
TARGET_THP = 1.0
# start-up "equal": 1 TiB over 1 GiB at most this (time is wall clock: allow noise)
TARGET_STARTUP_TIME = 1.5
TARGET_STARTUP_HEAP = 1.1

MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value


# --------------------------------------------------------------------- emulated
def _machine_memory(n: int, huge: bool) -> int:
    """Enough emulated RAM for the touches with room to spare (a power of two >= 1 GiB)."""
    need = 2 * n * (HPAGE if huge else PAGE) + 64 * MiB
    mem = GiB
    while mem < need:
        mem <<= 1
    return mem


def emulated_faults(n: int, huge: bool, *, traced: bool = False) -> dict[str, Any]:
    """Fault n 4 KiB pages (or n 2 MiB THPs) on a fresh machine; time only the touch.

    ``traced``: build the machine as ``kmm run`` does, with the trace digest on.
    """
    cfg = MachineConfig(memory=_machine_memory(n, huge))
    m = Machine(cfg, trace=Trace(None) if traced else None)
    k = Kernel(m)
    step = HPAGE if huge else PAGE
    size = n * step
    out: dict[str, Any] = {}

    async def driver() -> None:
        p = await k.process("bench")
        a = await p.mmap(size)
        if isinstance(a, str):
            raise RuntimeError(f"emulated mmap failed: {a}")
        r = await p.madvise(a, size, "hugepage" if huge else "nohugepage")
        if r != 0:
            raise RuntimeError(f"emulated madvise failed: {r}")
        ev = dict(m.vmstat.events)
        seq = m.sched.seq
        t0 = time.process_time()
        await p.touch(a, size, write=True, value=1, stride=step)
        out["seconds"] = time.process_time() - t0
        out["points"] = m.sched.seq - seq
        out["pgfault"] = m.vmstat.events["pgfault"] - ev["pgfault"]
        out["thp_fault_alloc"] = m.vmstat.events["thp_fault_alloc"] - ev["thp_fault_alloc"]
        out["thp_fault_fallback"] = (m.vmstat.events["thp_fault_fallback"]
                                     - ev["thp_fault_fallback"])

    m.run(driver)
    return {"faults": n, "kind": "thp" if huge else "4k", "traced": traced,
            "memory": cfg.memory, **out}


# ------------------------------------------------------------------------- host
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    vp, sz, ci, cl = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
    libc.mmap.restype = vp
    libc.mmap.argtypes = (vp, sz, ci, ci, ci, cl)
    libc.munmap.restype = ci
    libc.munmap.argtypes = (vp, sz)
    libc.madvise.restype = ci
    libc.madvise.argtypes = (vp, sz, ci)
    return libc


def host_thp_vmstat() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name.startswith("thp_fault"):
                    out[name] = int(value)
    except OSError:
        pass
    return out


def host_thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def smaps_range(lo: int, hi: int) -> dict[str, int]:
    """Rss and AnonHugePages (kB) of this process's VMAs overlapping [lo, hi)."""
    rss = huge = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                s, e = (int(x, 16) for x in head.split("-"))
                inside = s < hi and e > lo
            elif inside and head == "Rss:":
                rss += int(line.split()[1])
            elif inside and head == "AnonHugePages:":
                huge += int(line.split()[1])
    return {"rss_kb": rss, "anon_huge_kb": huge}


def host_faults(n: int, huge: bool) -> dict[str, Any]:
    """The host kernel's cost of the same touches: mmap, madvise, touch, re-touch, munmap.

    ``kernel_seconds`` = first pass (faulting) - second pass (already faulted): the loop
    itself (a strided memoryview assignment, in C) is subtracted out.
    """
    libc = _libc()
    step = HPAGE if huge else PAGE
    size = n * step
    length = size + (HPAGE if huge else 0)  # over-allocate to align to 2 MiB
    base = libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0)
    if base is None or base == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        addr = (base + HPAGE - 1) & ~(HPAGE - 1) if huge else base
        if libc.madvise(addr, size, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")
        buf = (ctypes.c_char * size).from_address(addr)
        mv = memoryview(buf).cast("B")
        ones, twos = b"\x01" * n, b"\x02" * n
        vm0 = host_thp_vmstat()
        t0 = time.process_time()
        mv[::step] = ones          # n faults
        t1 = time.process_time()
        mv[::step] = twos          # the same stores, no faults
        t2 = time.process_time()
        vm1 = host_thp_vmstat()
        sm = smaps_range(addr, addr + size)
        ok = bytes(mv[::step]) == twos
        del mv, buf
    finally:
        libc.munmap(base, length)
    first, again = t1 - t0, t2 - t1
    thp_alloc = vm1.get("thp_fault_alloc", 0) - vm0.get("thp_fault_alloc", 0)
    return {
        "faults": n, "kind": "thp" if huge else "4k",
        "seconds_faulting": first, "seconds_refault_free": again,
        "kernel_seconds": max(first - again, 1e-9),
        "rss_kb": sm["rss_kb"], "anon_huge_kb": sm["anon_huge_kb"],
        "thp_fault_alloc": thp_alloc,  # system-wide delta
        "thps_made": sm["anon_huge_kb"] // (HPAGE // KiB),
        "data_ok": ok,
    }


# ------------------------------------------------------------------- start-up
async def small_workload(k: Kernel) -> None:
    """The same small workload on both machines: 2 THPs and 64 4K pages, some data."""
    p = await k.process("small")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    await p.touch(a, 4 * MiB, stride=64 * KiB, value=7)
    b = await p.mmap(256 * KiB)
    await p.madvise(b, 256 * KiB, "nohugepage")
    await p.touch(b, 256 * KiB, value=9)
    await p.touch(b, 256 * KiB, write=False, value=9)


def _construct_time(memory: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(max(repeat, 3)):
        t0 = time.perf_counter()
        Machine(MachineConfig(memory=memory))
        best = min(best, time.perf_counter() - t0)
    return best


def startup_one(memory: int, repeat: int = 3) -> dict[str, Any]:
    seconds = _construct_time(memory, repeat)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = Machine(MachineConfig(memory=memory))
        heap_construct = tracemalloc.get_traced_memory()[0] - before
        k = Kernel(m)
        m.run(lambda: small_workload(k))
        gc.collect()
        heap_after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    pm = m.physmem
    return {"memory": memory, "construct_seconds": seconds,
            "construct_heap_bytes": heap_construct,
            "heap_after_workload_bytes": heap_after,
            "pages": len(pm.pages), "data": len(pm.data), "tables": len(pm.tables),
            "thp_fault_alloc": m.vmstat.events["thp_fault_alloc"]}


def startup(repeat: int = 3, small: int = GiB, big: int = TiB) -> dict[str, Any]:
    s, b = startup_one(small, repeat), startup_one(big, repeat)

    def ratio(key: str) -> float:
        return b[key] / s[key] if s[key] else (1.0 if b[key] == s[key] else float("inf"))

    ratios = {key: ratio(key) for key in ("construct_seconds", "construct_heap_bytes",
                                          "heap_after_workload_bytes", "pages", "data",
                                          "tables")}
    met = (ratios["construct_seconds"] <= TARGET_STARTUP_TIME
           and ratios["construct_heap_bytes"] <= TARGET_STARTUP_HEAP
           and ratios["heap_after_workload_bytes"] <= TARGET_STARTUP_HEAP
           and all(s[key] == b[key] for key in ("pages", "data", "tables")))
    return {"small": s, "big": b, "ratio": ratios, "met": met}


# ------------------------------------------------------------------------ bench
def _best(runs: list[dict], key: str) -> dict:
    return min(runs, key=lambda r: r[key])


def fault_bench(pages: int, thps: int, repeat: int = 3) -> dict[str, Any]:
    """Emulated (bare and traced) and host figures for 4K and THP faults."""
    out: dict[str, Any] = {}
    for kind, n, huge, target in (("4k", pages, False, TARGET_4K),
                                  ("thp", thps, True, TARGET_THP)):
        emu = [emulated_faults(n, huge) for _ in range(repeat)]
        emu_tr = [emulated_faults(n, huge, traced=True) for _ in range(repeat)]
        host = [host_faults(n, huge) for _ in range(repeat)]
        e, et, h = _best(emu, "seconds"), _best(emu_tr, "seconds"), _best(host,
                                                                           "kernel_seconds")
        e_us, et_us = e["seconds"] / n * 1e6, et["seconds"] / n * 1e6
        h_us = h["kernel_seconds"] / n * 1e6
        out[kind] = {
            "faults": n,
            "emulated": {**e, "us_per_fault": e_us, "faults_per_s": 1e6 / e_us,
                         "us_per_fault_median": statistics.median(
                             r["seconds"] / n * 1e6 for r in emu)},
            "emulated_traced": {**et, "us_per_fault": et_us, "faults_per_s": 1e6 / et_us},
            "host": {**h, "us_per_fault": h_us, "faults_per_s": 1e6 / h_us,
                     "us_per_fault_median": statistics.median(
                         r["kernel_seconds"] / n * 1e6 for r in host),
                     "us_per_fault_with_loop": h["seconds_faulting"] / n * 1e6},
            "ratio": e_us / h_us,
            "ratio_traced": et_us / h_us,
            "target_ratio": target,
            "met": e_us / h_us <= target,
            "met_traced": et_us / h_us <= target,
        }
    return out


def run_bench(pages: int = 10000, thps: int = 256, repeat: int = 3,
              schedules: int = 200) -> dict[str, Any]:
    from kmm.tools import budgets
    t0 = time.perf_counter()
    res = {
        "config": {"pages": pages, "thps": thps, "repeat": repeat, "schedules": schedules,
                   "host_thp_enabled": host_thp_mode(), "statistic": "best of repeat"},
        "faults": fault_bench(pages, thps, repeat),
        "stores": budgets.store_bench(min(thps, 16), repeat),
        "explore": budgets.explore_bench(schedules) if schedules else [],
        "startup": startup(repeat),
    }
    thp_host = res["faults"]["thp"]["host"]
    res["host_thp_confirmed"] = thp_host["thps_made"] == thps
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def format_table(res: dict[str, Any]) -> str:
    c, f, s = res["config"], res["faults"], res["startup"]
    out = [f"kmm bench: {c['pages']} 4K faults, {c['thps']} THP faults, best of "
           f"{c['repeat']}; host THP enabled=[{c['host_thp_enabled']}]",
           "",
           f"{'fault':<18}{'emulated/s':>12}{'us':>9}{'host/s':>12}{'us':>8}"
           f"{'ratio':>9}  {'target':<23}met"]
    for kind, label in (("4k", "4K"), ("thp", "THP")):
        r = f[kind]
        e, et, h = r["emulated"], r["emulated_traced"], r["host"]
        tgt = "<= 10x host" if kind == "4k" else "<= 1x host (no slower)"
        out.append(f"{label:<18}{_rate(e['faults_per_s']):>12}{e['us_per_fault']:>9.1f}"
                   f"{_rate(h['faults_per_s']):>12}{h['us_per_fault']:>8.2f}"
                   f"{r['ratio']:>8.1f}x  {tgt:<23}{'yes' if r['met'] else 'NO'}")
        out.append(f"{label + ' (trace on)':<18}{_rate(et['faults_per_s']):>12}"
                   f"{et['us_per_fault']:>9.1f}{'':>12}{'':>8}"
                   f"{r['ratio_traced']:>8.1f}x  {tgt:<23}"
                   f"{'yes' if r['met_traced'] else 'NO'}")
    h4, ht = f["4k"]["host"], f["thp"]["host"]
    out += ["",
            "emulated: Proc.touch on a fresh Machine, machine construction not timed; "
            "'trace on' = as `kmm run` builds it (every point folded into the digest).",
            "host: kernel cost = (faulting pass - same pass over faulted memory); the "
            "passes are one strided memoryview store in C, and the loop cost is "
            f"subtracted (with it: 4K {h4['us_per_fault_with_loop']:.2f} us, THP "
            f"{ht['us_per_fault_with_loop']:.2f} us).",
            f"host THPs: smaps AnonHugePages {ht['anon_huge_kb']} kB = {ht['thps_made']} of "
            f"{c['thps']} THPs, thp_fault_alloc +{ht['thp_fault_alloc']} (system-wide); "
            + ("the host made every THP." if res["host_thp_confirmed"] else
               "THE HOST DID NOT MAKE EVERY THP: the THP host figure is not a THP fault."),
            f"emulated THPs: thp_fault_alloc +{f['thp']['emulated']['thp_fault_alloc']}, "
            f"4K: pgfault +{f['4k']['emulated']['pgfault']}, "
            f"{f['4k']['emulated']['points'] / c['pages']:.1f} points per 4K fault, "
            f"{f['thp']['emulated']['points'] / max(c['thps'], 1):.1f} per THP fault.",
            "",
            f"{'start-up':<32}{'1 GiB':>12}{'1 TiB':>12}{'ratio':>8}  (target: equal)"]
    rows = (("construct time (us)", "construct_seconds", 1e6),
            ("construct heap (B, tracemalloc)", "construct_heap_bytes", 1),
            ("heap after workload (B)", "heap_after_workload_bytes", 1),
            ("physmem.pages", "pages", 1),
            ("physmem.data", "data", 1),
            ("physmem.tables", "tables", 1))
    for label, key, scale in rows:
        out.append(f"{label:<32}{s['small'][key] * scale:>12,.0f}"
                   f"{s['big'][key] * scale:>12,.0f}{s['ratio'][key]:>8.2f}")
    out.append(f"start-up target met: {'yes' if s['met'] else 'NO'} (time within "
               f"{TARGET_STARTUP_TIME}x, heap within {TARGET_STARTUP_HEAP}x, struct sizes "
               "equal; workload: 2 THPs + 64 4K pages)")
    from kmm.tools import budgets
    out += budgets.format_targets(res)
    out.append(f"\ntotal {res['wall_seconds']:.1f} s")
    return "\n".join(out)


# --- CPU actors in child processes (docs/budgets.md: at most 3x slower) -------------
TARGET_SPAWN = 3.0
SPAWN_PROGRAM = "redis_snapshot.py"  # fork + two CPUs writing and reading 16 MiB of THPs


def _workload_path(name: str) -> str:
    import importlib.util
    import os
    spec = importlib.util.find_spec("kmm.workloads")  # found, not imported (layering)
    return os.path.join(list(spec.submodule_search_locations)[0], name)


def _timed_program(path: str, spawn: frozenset, cpus: int) -> tuple[float, dict]:
    from kmm.tools.runner import run_program
    gc.collect()
    t0 = time.perf_counter()
    rep = run_program(path, cpus=cpus, seed=1, spawn=spawn)
    return time.perf_counter() - t0, rep


def spawn_bench(program: str | None = None, repeat: int = 3, cpus: int = 2) -> dict[str, Any]:
    """A program run with its CPU actors in-process, then spawned (``--spawn cpus``):
    wall time of the whole run (child start-up included) and preemption points per
    second, best of ``repeat``; ``ratio`` = spawned time / in-process time. Both runs
    must give the same trace digest, or the figure is void."""
    path = program or _workload_path(SPAWN_PROGRAM)
    runs: dict[str, list[float]] = {"local": [], "spawned": []}
    digests = set()
    events = 0
    for _ in range(repeat):
        for label, spawn in (("local", frozenset()), ("spawned", frozenset({"cpus"}))):
            t, rep = _timed_program(path, spawn, cpus)
            runs[label].append(t)
            digests.add(rep["run"]["trace_sha256"])
            events = rep["run"]["events"]
    # the fixed cost of a spawned program: a child that makes no call
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        empty = os.path.join(d, "empty.py")
        with open(empty, "w") as f:
            f.write("async def main(k):\n    return None\n")
        start = min(_timed_program(empty, frozenset({"cpus"}), cpus)[0]
                    - _timed_program(empty, frozenset(), cpus)[0] for _ in range(repeat))
    local, spawned = min(runs["local"]), min(runs["spawned"])
    ratio = spawned / local
    steady = (spawned - start) / local
    return {"program": path, "cpus": cpus, "repeat": repeat, "events": events,
            "local_seconds": local, "spawned_seconds": spawned,
            "local_events_per_s": events / local, "spawned_events_per_s": events / spawned,
            "child_startup_seconds": start, "ratio": ratio,
            "ratio_without_startup": steady, "target": TARGET_SPAWN,
            "met": ratio <= TARGET_SPAWN, "same_trace": len(digests) == 1}


def format_spawn(r: dict[str, Any]) -> str:
    return "\n".join([
        f"kmm bench --spawn: {r['program']} on {r['cpus']} CPUs, best of {r['repeat']}, "
        f"{r['events']:,} preemption points",
        f"{'':<22}{'seconds':>10}{'points/s':>12}",
        f"{'CPUs in-process':<22}{r['local_seconds']:>10.3f}{_rate(r['local_events_per_s']):>12}",
        f"{'CPUs spawned':<22}{r['spawned_seconds']:>10.3f}"
        f"{_rate(r['spawned_events_per_s']):>12}",
        f"ratio spawned/in-process: {r['ratio']:.2f}x (target <= {r['target']:g}x: "
        f"{'met' if r['met'] else 'NOT MET'}); without the child's start-up "
        f"({r['child_startup_seconds']:.3f} s): {r['ratio_without_startup']:.2f}x",
        f"same trace digest in both: {'yes' if r['same_trace'] else 'NO'}"])


__all__ = ["emulated_faults", "host_faults", "startup", "fault_bench", "run_bench",
           "format_table", "smaps_range", "spawn_bench", "format_spawn"]
