"""Run a scenario (TOML) or a program (Python) on an emulated machine; build the report.

The report has the shape of docs/report-format.md, which ``kmm oracle`` also prints:
``vmstat`` (every thp_* counter, as the change over the run), ``regions`` (Rss and
AnonHugePages per live process and region) and ``steps`` (one result per step). The
extra keys ``locks`` (lock_stat rows), ``zone`` (/proc/buddyinfo, free pages,
watermarks), ``vm_events`` (the other /proc/vmstat events: faults, swap, reclaim,
compaction, migration), ``lru`` (pages per LRU list), ``deferred_split_queue`` (its
length) and ``run`` (seed, trace digest, emulated time) extend it without changing those
three; a scenario with swap also has ``events`` (pswpin, pswpout, as the oracle reports
them) and ``swap_kb`` per region.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

from kmm import (
    bugs, fault, huge_memory_mthp, hugetlb, khugepaged, madvise, mmzone, shmem, task_mmu,
)
from kmm.machine import KernelBug, Machine, MachineConfig
from kmm.runtime.sched import SchedError
from kmm.runtime.trace import Trace
from kmm.task_mmu import smaps_range
from kmm.tools import errors
from kmm.tools.scenario import Scenario, ScenarioError, step_range
from kmm.workload import Kernel, KmmError, OomKilled, Proc


class NotSupported(ScenarioError):
    """A valid step whose mechanism a later issue brings."""


# Called with each machine build_machine makes (kmm.tools.progress follows a long run's
# event count from a thread; nothing here changes the run).
MACHINE_HOOKS: list[Callable[[Machine], None]] = []


def build_machine(config, *, seed: int | None, mode: str, trace_file=None,
                  knobs: dict | None = None, cpus: int | None = None,
                  inject=()) -> Machine:
    cfg = MachineConfig(memory=config.memory, swap=config.swap,
                        cpus=cpus or config.cpus, seed=config.seed, nodes=config.nodes,
                        node_memory=config.node_memory,
                        # --cpus given: the CPUs are split evenly over the nodes
                        node_cpus=config.node_cpus if not cpus or cpus == config.cpus
                        else ())
    m = Machine(cfg, mode=mode, seed=seed, trace=Trace(trace_file))
    m.bugs = bugs.validate(inject)
    for name, value in (knobs or {}).items():
        m.sysfs.write(name, value)
    for hook in MACHINE_HOOKS:
        hook(m)
    return m


def report(m: Machine, k: Kernel, steps: list[dict]) -> dict[str, Any]:
    regions: dict[str, dict[str, int]] = {}
    for task in m.tasks.values():
        if not task.alive:
            continue
        for name, (addr, size) in task.regions.items():
            rss, huge = smaps_range(m, task.mm, addr, addr + size)
            fig = regions[f"{task.name}/{name}"] = {"rss_kb": rss, "anon_huge_kb": huge}
            if m.swap_info is not None:  # extension: scenarios with a swap device
                fig["swap_kb"] = task_mmu.smaps_swap_kb(m, task.mm, addr, addr + size)
            shpmd = task_mmu.smaps_shmem_pmd_kb(m, task.mm, addr, addr + size)
            if shpmd:  # extension: smaps ShmemPmdMapped, only when nonzero
                fig["shmem_pmd_mapped_kb"] = shpmd
            priv, shared = task_mmu.smaps_hugetlb_kb(m, task.mm, addr, addr + size)
            if priv:  # extension: hugetlb mappings (smaps Private_/Shared_Hugetlb)
                fig["private_hugetlb_kb"] = priv
            if shared:
                fig["shared_hugetlb_kb"] = shared
            folios = huge_memory_mthp.region_folio_kb(m, task.mm, addr, addr + size)
            if folios:  # extension: kB mapped by mTHPs, per folio size
                fig["mthp_kb"] = folios
            if len(m.node_data) > 1:  # extension: numa_maps, on machines of several nodes
                fig["numa_maps"] = task_mmu.show_numa_map(m, task.mm, addr, addr + size)
    rep: dict[str, Any] = {
        "vmstat": m.vmstat.thp_lines(),
        "regions": regions,
        "steps": steps,
        "locks": [row for row in m.locks.lock_stat()],
        "zone": {"buddyinfo": m.zone.buddyinfo(), "nr_free": m.zone.nr_free,
                 "watermarks": dict(m.zone.wmark),
                 "min_free_kbytes": m.zone.min_free_kbytes},
        # every other vm event the machine counts (reclaim, swap, compaction, faults)
        "vm_events": {k: v for k, v in m.vmstat.events.items()
                      if not k.startswith("thp_")},
        "lru": dict(m.lruvec.nr_pages),
        "deferred_split_queue": len(m.deferred_split_queue),
        "run": {"seed": m.sched.seed, "mode": m.sched.mode, "events": m.sched.seq,
                "emulated_ns": m.sched.now, "trace_sha256": m.sched.trace.digest(),
                "tlb_misses": list(m.tlb_stats)},
    }
    if m.swap_info is not None:
        rep["events"] = {name: m.vmstat.events[name] for name in SWAP_EVENTS}
    migr = {n: m.vmstat.events[n] for n in MIGRATE_EVENTS if m.vmstat.events[n]}
    if migr:  # extension: page migration that happened (move_pages, compaction, NUMA)
        rep["migrate_events"] = migr
    meminfo = shmem.shmem_meminfo(m)
    if meminfo:  # extension: meminfo lines of shmem/file THPs that moved
        rep.setdefault("meminfo", {}).update(meminfo)
    htlb = hugetlb_report(m)  # extension: HugePages_* lines, htlb events
    if "meminfo" in htlb:
        rep.setdefault("meminfo", {}).update(htlb["meminfo"])
    if "hugetlb_events" in htlb:
        rep["hugetlb_events"] = htlb["hugetlb_events"]
    mthp = huge_memory_mthp.mthp_report({}, huge_memory_mthp.mthp_stats(m))
    if mthp:  # extension: hugepages-<size>kB/stats/ files that moved
        rep["mthp"] = mthp
    nodes = mmzone.numa_report(m)
    if nodes is not None:  # extension: machines of several nodes (kmm.mmzone)
        rep["numa"] = {"vmstat": mmzone.numa_vmstat(m), "nodes": nodes}
    kh = khugepaged.khugepaged_report(m)
    if kh is not None:  # extension: khugepaged's counters and the SCAN_* results
        rep["khugepaged"] = kh
    return rep


SWAP_EVENTS = ("pswpin", "pswpout")
MIGRATE_EVENTS = ("pgmigrate_success", "pgmigrate_fail")


def hugetlb_report(m: Machine) -> dict[str, Any]:
    """Extension: ``meminfo`` (the change over the run of HugePages_Total, _Free, _Rsvd,
    _Surp) and ``hugetlb_events`` (htlb_buddy_alloc_success / _fail), each key only when
    it moved, each section only when not empty."""
    base = m.hugetlb.baseline
    now = hugetlb.snapshot(m)
    out: dict[str, Any] = {}
    meminfo = {k: now[k] - base.get(k, 0) for k in hugetlb.MEMINFO_KEYS
               if now[k] != base.get(k, 0)}
    events = {k: now[k] - base.get(k, 0) for k in hugetlb.EVENTS if now[k] != base.get(k, 0)}
    if meminfo:
        out["meminfo"] = meminfo
    if events:
        out["hugetlb_events"] = events
    return out


async def hugetlb_setup(m: Machine, pool: dict[str, int] | None) -> None:
    """The scenario's [hugetlb] pool, set before the steps as the oracle sets the
    host's /proc/sys/vm knobs; the report's changes count from here."""
    h = m.hugetlb.default
    if pool:
        if "nr_overcommit_hugepages" in pool:
            await hugetlb.set_nr_overcommit_huge_pages(m, h, pool["nr_overcommit_hugepages"])
        if "nr_hugepages" in pool:
            await hugetlb.set_max_huge_pages(m, h, pool["nr_hugepages"])
    m.hugetlb.baseline = hugetlb.snapshot(m)


async def run_step(k: Kernel, step, scenario: Scenario) -> dict[str, Any]:
    m = k.machine
    res: dict[str, Any] = {"op": step.op}
    task = m.tasks.get(step.proc)
    if task is None or not task.alive:
        return {**res, "ok": False, "error": "no such process"}
    p = Proc(k, task, 0)
    if step.op == "mmap":
        # the region is reported even if the mmap failed (zeros), as the oracle does
        task.regions[step.region] = (step.addr, step.size)
        try:
            await p.mmap(step.size, step.addr, step.backing, step.noreserve)
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True}
    if step.op == "fork":
        try:
            await p.fork(step.child)
        except fault.OutOfMemory:
            return {**res, "ok": False, "errno": "ENOMEM"}
        return {**res, "ok": True}
    if step.op == "exit":
        await p.exit()
        return {**res, "ok": True}
    if step.op == "reclaim":
        await reclaim_step(m)
        return {**res, "ok": True}
    if step.op == "set_mempolicy":
        try:
            await p.set_mempolicy(step.mode, list(step.nodes))
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True}
    if step.op == "khugepaged":
        if not khugepaged.hugepage_pmd_enabled(m):  # the host has no khugepaged thread then
            raise ScenarioError(scenario.path, step.index, "op",
                                "khugepaged does not run when PMD-size THPs are off ([thp] "
                                "enabled = \"never\" with hugepages-2048kB inherit, or "
                                "hugepages-2048kB never)")
        await khugepaged_step(m, step.full_scans or 1)
        return {**res, "ok": True}
    if step.op == "migrate_pages":
        try:
            n = await p.migrate_pages(list(step.from_nodes), list(step.to_nodes))
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True, "not_migrated": n}
    addr, size = task.regions[step.region]
    if step.op == "move_pages":
        lo, hi = step_range(step, size)
        pages = list(range(addr + lo, addr + hi, step.stride))
        nodes = None if step.node is None else [step.node] * len(pages)
        try:
            n, status = await p.move_pages(pages, nodes, step.move_all)
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True, "not_migrated": n, "status": status}
    if step.op == "ftruncate":
        try:
            await p.ftruncate(addr, step.size)
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True}
    lo, hi = step_range(step, size)
    start, length = addr + lo, hi - lo
    if step.op == "split":
        await p.split_huge_page(start, length)
        return {**res, "ok": True}
    if step.op == "punch_hole":  # file offsets: the region maps its memfd from 0
        try:
            await p.fallocate_punch_hole(addr, lo, length)
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True}
    if step.op in ("munmap", "mprotect", "madvise", "mbind"):
        try:
            if step.op == "mbind":
                await p.mbind(start, length, step.mode, list(step.nodes), list(step.flags))
            elif step.op == "munmap":
                await p.munmap(start, length)
            elif step.op == "mprotect":
                await p.mprotect(start, length, step.prot)
            else:
                await p.madvise(start, length, step.advice)
        except madvise.NotYetSupported as e:
            raise NotSupported(scenario.path, step.index, "advice", str(e)) from None
        except KmmError as e:
            return {**res, "ok": False, "errno": e.errno_name}
        return {**res, "ok": True}
    # touch / check
    try:
        n = await p.touch(start, length, write=step.write if step.op == "touch" else False,
                          value=step.value, stride=step.stride)
    except (fault.Segv, fault.Sigbus) as e:
        return {**res, "ok": False, "signal": e.signal}
    except OomKilled:  # the OOM killer chose this process (kmm.oom_kill), as Linux does
        return {**res, "ok": False, "signal": "SIGKILL"}
    if step.op == "check":
        return {**res, "ok": True, "mismatches": n}
    return {**res, "ok": True}


# khugepaged, run as the oracle runs the host's (kmm.tools.oracle.run_oracle): a decoy mm
# keeps the mm list non-empty, so no registration wakes the thread, and a long
# scan_sleep_millisecs keeps it asleep between steps; a khugepaged step wakes it by
# writing that knob again, once per pass, until full_scans has grown by the step's count.
KHUGEPAGED_POLL_NS = 2_000_000  # the oracle polls the thread's state every 2 ms
DECOY = "(decoy)"


def khugepaged_asleep(m: Machine) -> bool:
    """khugepaged waits on khugepaged_wait (between passes, or after an allocation
    failure): what the oracle reads from the thread's state and wchan."""
    return any(a.name == "khugepaged" for a in m.waitqueues.get(khugepaged.WAITQUEUE, ()))


async def khugepaged_kick(m: Machine) -> None:
    """Oracle ``Khugepaged.kick``: the knob write wakes khugepaged for one pass; wait
    until it sleeps again."""
    from kmm.tools.oracle import LONG_SLEEP_MS
    m.sysfs.write("khugepaged/scan_sleep_millisecs", LONG_SLEEP_MS)
    while not khugepaged_asleep(m):
        await m.sched.sleep(KHUGEPAGED_POLL_NS)


async def khugepaged_setup(k: Kernel) -> None:
    """The oracle's set-up: under enabled=madvise, start khugepaged, register the decoy
    (a MADV_HUGEPAGE VMA of 2 MiB + 4 KiB whose aligned block has no page table, its
    tail page written), put khugepaged to its long sleep, then the scenario's mode."""
    from kmm import daemon
    from kmm.tools.oracle import DECOY_ADDR
    m = k.machine
    enabled = m.sysfs.enabled
    m.sysfs.write("enabled", "madvise")
    (cls,) = daemon.load_daemons(["khugepaged"])
    daemon.start_daemon(m, cls())
    while not khugepaged_asleep(m):  # the host's thread waits for work since boot
        await m.sched.sleep(KHUGEPAGED_POLL_NS)
    decoy = await k.process(DECOY)
    size = (2 << 20) + 4096
    await decoy.mmap(size, DECOY_ADDR)
    await decoy.touch(DECOY_ADDR + (2 << 20), 4096)
    await decoy.madvise(DECOY_ADDR, size, "hugepage")
    await khugepaged_kick(m)
    m.sysfs.write("enabled", enabled)


async def khugepaged_step(m: Machine, rounds: int) -> None:
    """The ``khugepaged`` step: passes until full_scans grew by ``rounds``."""
    target = m.sysfs["khugepaged/full_scans"] + rounds
    while m.sysfs["khugepaged/full_scans"] < target:
        await khugepaged_kick(m)


async def reclaim_step(m: Machine) -> None:
    """The ``reclaim`` step: memory-cgroup pressure on the scenario's processes, as the
    oracle applies it (vmscan_node.memcg_reclaim)."""
    from kmm import vmscan_node
    await vmscan_node.memcg_reclaim(m)


# The reclaim daemons run on every machine, as on the kernel: they sleep until the page
# allocator wakes them at the low watermark, so a run that never gets there is
# unchanged. khugepaged starts with a scenario's khugepaged step (as the oracle runs it)
# or when a program asks for it (k.start_daemon("khugepaged")).
DEFAULT_DAEMONS = ("kswapd", "kcompactd")


async def start_daemons(k: Kernel, extra: list | None = None) -> None:
    """The default daemons, then any plug-in classes given (``kmm run --daemon``); an
    ``"exec:COMMAND"`` entry is a daemon written without kmm (docs/wire.md), started
    and named by its Hello here."""
    from kmm import daemon
    from kmm.runtime import remote
    for name in DEFAULT_DAEMONS:
        k.start_daemon(name)
    for cls in extra or ():
        if isinstance(cls, str) and cls.startswith("exec:"):
            d = await remote.start_exec_daemon(k.machine, cls[5:], daemon.DaemonContext)
            daemon.start_daemon(k.machine, d)
        else:
            d = cls()
            if not remote.spawned(k.machine, d.name):
                d.run = _named_actor(d.name, d.run)
            daemon.start_daemon(k.machine, d)


def _named_actor(name: str, run):
    """A plug-in daemon's ``run`` in-process: its own exception names the actor (as a
    spawned daemon's ChildDied does) instead of surfacing as a kernel traceback."""
    async def named(ctx):
        try:
            return await run(ctx)
        except Exception as e:
            if errors.raised_by_user(e):
                raise errors.DaemonError(name, e) from e
            raise
    return named


def run_scenario(scenario: Scenario, seed: int | None = None, *, mode: str = "free",
                 trace_file=None, check: Callable | None = None,
                 cpus: int | None = None, daemons: list | None = None,
                 inject=(), spawn=frozenset(), child_timeout: float | None = None,
                 child_startup: float | None = None, warn: Callable | None = None
                 ) -> dict[str, Any]:
    """Run every step of a scenario on a fresh machine and return the report.

    ``check(machine, kernel)`` (the invariant checker in tests) runs after every step.
    """
    m = build_machine(scenario.machine, seed=seed, mode=mode, trace_file=trace_file,
                      knobs=scenario.knobs, cpus=cpus, inject=inject)
    m.spawn, m.child_timeout = frozenset(spawn), child_timeout  # kmm.runtime.remote
    m.child_startup = child_startup
    k = Kernel(m)
    steps: list[dict] = []

    async def driver() -> None:
        await start_daemons(k, daemons)
        await k.process("main")
        if any(step.op == "khugepaged" for step in scenario.steps):
            await khugepaged_setup(k)
        await hugetlb_setup(m, scenario.hugetlb)
        for step in scenario.steps:
            steps.append(await run_step(k, step, scenario))
            if check is not None:
                check(m, k)

    try:
        run_machine(m, driver)
    except Exception as e:
        e.partial_report = partial_report(m, k, steps)  # kmm sweep reports a failed run
        raise
    unspawned(m, warn)
    return report(m, k, steps)


def partial_report(m: Machine, k: Kernel, steps: list[dict]) -> dict[str, Any] | None:
    """The report of a run that failed half way (a kernel BUG, a program's error), as
    far as the machine's state still makes one; None when it does not."""
    try:
        return report(m, k, steps)
    except Exception:  # noqa: BLE001 - a broken machine may not report at all
        return None


def unspawned(m: Machine, warn: Callable | None) -> None:
    """--spawn named a daemon this run never started: nothing ran in a child for it."""
    if warn is None:
        return
    ran = {a.name for a in m.sched.actors}
    for name in sorted(set(m.spawn) - {"cpus", "daemons"} - ran):
        how = (" (a program starts it with k.start_daemon(\"khugepaged\"); a scenario "
               "with a khugepaged step)") if name == "khugepaged" else ""
        warn(f"--spawn {name}: this run never started {name}, so nothing was spawned "
             f"for it{how}")


def run_machine(m: Machine, driver) -> None:
    """m.run, and no child process of a spawned actor outlives it, however it ends."""
    from kmm.runtime import remote
    try:
        m.run(driver)
    finally:
        remote.reap_all()


def load_program(path: str):
    """A workload program: a module with ``async def main(k)``. A file that does not
    exist, is not Python, fails on import or has no ``async def main`` is bad input:
    ScenarioError, or ProgramLoadError with the program's own frames."""
    if not os.path.isfile(path):
        raise ScenarioError(path, None, None, "no such file" if not os.path.exists(path)
                            else "not a file")
    if not path.endswith(".py"):
        raise ScenarioError(path, None, None, "not a program (a .py file with "
                            "async def main(k))")
    spec = importlib.util.spec_from_file_location(f"kmm_program_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ScenarioError(path, None, None, "cannot load as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the program's own error on import: its frames, its name
        raise errors.ProgramLoadError(path, e) from e
    main = getattr(mod, "main", None)
    if main is None:
        raise ScenarioError(path, None, "main", "a program defines async def main(k)")
    if not inspect.iscoroutinefunction(main):
        raise ScenarioError(path, None, "main", "must be a coroutine function: "
                            "async def main(k), not def main(k)")
    return mod


def program_failure(e: BaseException, path: str) -> BaseException:
    """What an exception out of a program's run is: the program's own error
    (ProgramError, naming it) or, raised inside kmm, the exception itself."""
    if isinstance(e, errors.UserCodeError) or not isinstance(e, Exception):
        return e
    if errors.raised_by_user(e):
        return errors.ProgramError(path, e)
    return e


def program_machine(mod, path: str) -> dict[str, int]:
    """A program's machine: its module-level ``MACHINE`` dict (memory, swap, cpus; sizes
    as in scenarios, e.g. {"memory": "64MiB", "swap": "32MiB"}), else the defaults."""
    from kmm.tools.scenario import parse_size
    from kmm.tools.scenario import NUMA_MACHINE_KEYS, numa_machine_check, numa_machine_value
    spec = getattr(mod, "MACHINE", {})
    if not isinstance(spec, dict) or set(spec) - {"memory", "swap", "cpus",
                                                  *NUMA_MACHINE_KEYS}:
        raise ScenarioError(path, None, "MACHINE", "must be a dict with keys memory, swap, "
                            "cpus, nodes, node_memory, node_cpus")
    out = {}
    from kmm.tools.scenario import machine_size_error
    for key in ("memory", "swap"):
        if key in spec:
            out[key] = parse_size(spec[key], file=path, step=None, key=f"MACHINE.{key}")
            why = machine_size_error(key, out[key])
            if why:
                raise ScenarioError(path, None, f"MACHINE.{key}", why)
    if "cpus" in spec:
        cpus = spec["cpus"]
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ScenarioError(path, None, "MACHINE.cpus", f"must be at least 1, not {cpus!r}")
        out["cpus"] = cpus
    for key in NUMA_MACHINE_KEYS:
        if key in spec:
            v = spec[key]
            out[key] = numa_machine_value(key, list(v) if isinstance(v, tuple) else v,
                                          path, "MACHINE")
    numa_machine_check(out, path, "MACHINE")
    return out


def program_numa(spec: dict, cpus: int) -> dict:
    """The NUMA keys of a program's machine for MachineConfig (node_cpus only while the
    CPU count is the program's own)."""
    out = {k: spec[k] for k in ("nodes", "node_memory") if k in spec}
    if "node_cpus" in spec and cpus == spec.get("cpus", 2):
        out["node_cpus"] = spec["node_cpus"]
    return out


def run_program(path: str, *, cpus: int | None = None, seed: int = 1, mode: str = "free",
                memory: int | None = None, trace_file=None, knobs: dict | None = None,
                check: Callable | None = None, daemons: list | None = None,
                inject=(), spawn=frozenset(), child_timeout: float | None = None,
                child_startup: float | None = None, warn: Callable | None = None
                ) -> dict[str, Any]:
    """Run a program; its processes' mappings are reported as regions named by address.

    The machine is the program's ``MACHINE`` (program_machine); ``cpus`` and ``memory``
    given here override it; ``knobs`` (sysfs name -> value, as kmm sweep sets them) are
    written before the program starts (the program may write them again)."""
    mod = load_program(path)
    spec = program_machine(mod, path)
    cpus = cpus or spec.get("cpus", 2)
    cfg = MachineConfig(memory=memory or spec.get("memory", 1 << 30),
                        swap=spec.get("swap", 0), cpus=cpus, seed=seed,
                        **program_numa(spec, cpus))
    m = build_machine(cfg, seed=seed, mode=mode, trace_file=trace_file, cpus=cpus,
                      inject=inject, knobs=knobs)
    m.spawn, m.child_timeout = frozenset(spawn), child_timeout  # kmm.runtime.remote
    m.child_startup = child_startup
    k = Kernel(m)
    if check is not None:
        k.after_op = lambda: check(m, k)
    result: dict[str, Any] = {}

    async def driver() -> None:
        await start_daemons(k, daemons)
        if "cpus" in m.spawn:  # the program's code in child processes (remote_cpu)
            from kmm.runtime import remote_cpu
            result["value"] = await remote_cpu.run_main(
                k, path, Proc, (fault.Segv, fault.Sigbus, fault.OutOfMemory, KmmError,
                                OomKilled))
        else:
            result["value"] = await mod.main(k)

    try:
        run_machine(m, driver)
    except Exception as e:
        failure = program_failure(e, path)
        program_regions(m)
        failure.partial_report = partial_report(m, k, [])  # kmm sweep reports a failed run
        if failure is e:
            raise
        raise failure from e
    unspawned(m, warn)
    program_regions(m)
    rep = report(m, k, [])
    rep["result"] = result.get("value")
    return rep


def program_regions(m: Machine) -> None:
    """A program's processes' mappings, reported as regions named by address."""
    for task in m.tasks.values():
        if task.alive and not task.regions:
            task.regions = {f"{v.start:#x}": (v.start, v.end - v.start) for v in task.mm.vmas}


__all__ = ["run_scenario", "run_program", "report", "NotSupported", "KernelBug",
           "SchedError"]
