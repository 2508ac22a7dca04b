"""Run a scenario on the host kernel and report what it did (docs/report-format.md).

The oracle is the emulator's ground truth: the same scenario file, run by real processes
on the machine's own Linux, reported in the same shape as ``kmm run --json``.

How a run goes:

* Each scenario process is a real process: a tiny Python *worker* (stdlib and ctypes only,
  started with ``python -I -S``) that reads fixed-size commands from a pipe and does the
  syscall or the memory accesses itself. Touch and check loops write and read one byte per
  stride through ctypes, so a worker allocates almost nothing while steps run; it marks
  its own anonymous memory MADV_NOHUGEPAGE at start-up, so neither a fault under
  enabled=always nor khugepaged gives it THPs of its own. The driver (this process) runs
  the steps under prctl(PR_SET_THP_DISABLE) for the same reason. Measured: 165 runs of the
  corpus and repeated enabled=always runs with 64 MiB touches and forks gave identical
  counters; other processes on the host can still add THP events under enabled=always.
* A ``fork`` step forks the worker with ``clone(CLONE_PARENT | SIGCHLD)``: the mm is
  duplicated exactly as by fork(2), but the new process is a child of the driver, so the
  driver can ``waitpid`` every worker and see a SIGSEGV for what it is.
* The THP knobs are set for the run (the scenario's values over the kernel defaults of
  ``kmm.sysfs.KNOBS``, which is what the emulator boots with) and always restored
  afterwards, also on errors and Ctrl-C; a file in /run remembers the saved values so a
  run that was killed outright is repaired by the next one. A lock file serialises runs.
* khugepaged is kept from acting between steps: a *decoy* process keeps the khugepaged mm
  list non-empty (so registering a scenario mm does not wake it) without giving it anything
  to collapse, and ``scan_sleep_millisecs`` is held very long during the run. A khugepaged
  step wakes it by writing that knob again, once per scan round, until ``full_scans`` has
  grown by the step's count, and waits until it sleeps again.
* ``echo 2 > /proc/sys/vm/drop_caches`` before the run runs the shrinkers, which free the
  huge zero folio when no mm holds it, so the run's first huge-zero use counts
  ``thp_zero_page_alloc`` 1 as it does on the emulator's freshly booted machine.

* Swap, debugfs and memory-cgroup resources, set up only for the scenarios that need
  them and released on every exit path like the knobs (the file in /run notes each one
  as soon as it exists): ``[machine] swap`` > 0 makes a fresh zram device of that size
  the only swap (the run is refused if another swap is active or zswap is on), and the
  report gains ``swap_kb`` per region and ``events`` (pswpin, pswpout); a ``split`` step
  writes the range to debugfs ``split_huge_pages`` (debugfs is mounted for the run if it
  is not); a ``reclaim`` step runs ``memory.force_empty`` on a cgroup-v1 memory cgroup
  that holds every worker of the run, with swappiness 0 (see ``memcg_reclaim``).

The host's knobs, swap/debugfs/cgroup resources, khugepaged control and /proc readings
are in oracle_host.py; the worker program is oracle_worker.py.

Run ``python -m kmm.tools.oracle FILE...`` to print reports, or
``python -m kmm.tools.oracle --record workloads/*.toml`` to (re)write the recordings
``<name>.oracle.json`` beside each file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno as errno_mod
import fcntl
import json
import os
import pathlib
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

from kmm import huge_memory_mthp, sysfs, vmstat
from kmm.tools import oracle_host, oracle_mthp
from kmm.tools.conformance import compare
from kmm.tools.scenario import (
    PAGE_SIZE,
    Scenario,
    ScenarioError,
    Step,
    load_scenario,
    round_up,
    step_range,
)

THP_DIR = sysfs.THP_DIR
LONG_SLEEP_MS = 3_600_000  # scan_sleep_millisecs while a run is in progress
LOCK_PATH = "/run/kmm-oracle.lock"
SAVED_PATH = "/run/kmm-oracle.saved.json"
STEP_TIMEOUT = 120.0  # seconds a worker may take over one step
KHUGEPAGED_TIMEOUT = 30.0  # seconds a khugepaged step may wait for full_scans
DECOY_ADDR = 0x1000_0000_0000

# mmap flags of each scenario backing (the worker's default is the "anon" one); the
# memfd backings map a fresh memfd_create file ftruncate'd to the region's size
MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x01, 0x20, 0x100000
MAP_NORESERVE, MAP_HUGETLB = 0x4000, 0x40000
MAP_BACKING = {"anon": MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
               "shmem": MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
               "memfd": MAP_SHARED | MAP_FIXED_NOREPLACE,
               "memfd_private": MAP_PRIVATE | MAP_FIXED_NOREPLACE,
               "hugetlb": MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_HUGETLB,
               "hugetlb_shared": MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_HUGETLB}
# /proc/meminfo lines of shared-memory and file THPs (kB), reported as their change
SHMEM_MEMINFO_KEYS = ("ShmemHugePages", "ShmemPmdMapped", "FileHugePages", "FilePmdMapped")
MEMINFO_KEYS = ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp")
HUGETLB_EVENTS = ("htlb_buddy_alloc_success", "htlb_buddy_alloc_fail")
MIGRATE_EVENTS = ("pgmigrate_success", "pgmigrate_fail")

MADV = {"hugepage": 14, "nohugepage": 15, "dontneed": 4, "collapse": 25, "pageout": 21,
        "cold": 20, "free": 8}
PROT = {"none": 0, "r": 1, "rw": 3}

# clone(2) on the architectures we know; CLONE_PARENT keeps every worker a child of the
# driver. SIGCHLD as the exit signal, as fork(2) uses.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
CLONE_PARENT = 0x00008000

# Worker commands: eight signed 64-bit words (op, six arguments); replies: three words
# (status 0 / -1, errno, value).
CMD = struct.Struct("<8q")
RES = struct.Struct("<3q")
OP_MMAP, OP_MUNMAP, OP_MPROTECT, OP_MADVISE, OP_TOUCH, OP_CHECK, OP_FORK, OP_EXIT, OP_PING = (
    range(1, 10)
)
OP_MMAP_MEMFD, OP_FTRUNCATE, OP_PUNCH_HOLE = 10, 11, 12
OP_SET_MEMPOLICY, OP_MBIND = 13, 14
# include/uapi/linux/mempolicy.h
MPOL = {"default": 0, "preferred": 1, "bind": 2, "interleave": 3, "local": 4}
MPOL_MF = {"strict": 1, "move": 2, "move_all": 4}
NODEMASK_BITS = 64  # the worker passes one unsigned long of nodemask
OP_MOVE_PAGES, OP_MOVE_STATUS, OP_MIGRATE_PAGES = 15, 16, 17

# The worker program lives in oracle_worker.py beside this file; it runs under
# ``python -I -S`` (no site, no kmm on the path).
_WORKER_PATH = str(pathlib.Path(__file__).with_name("oracle_worker.py"))



class OracleError(Exception):
    """The oracle cannot run here, or the host did something it cannot report."""


class HostLacks(OracleError):
    """This host cannot run this scenario: it lacks something the scenario needs (zram,
    a writable debugfs, a cgroup-v1 memory controller) or holds something in the way
    (another active swap, zswap)."""


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    name: str
    slot: int
    pid: int
    pidfd: int
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (addr, size)
    alive: bool = True


class WorkerDied(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class Workers:
    """The scenario's processes: spawns the first, forks the rest, talks to them."""

    def __init__(self, nslots: int) -> None:
        arch = os.uname().machine
        if arch not in _SYS_CLONE:
            raise OracleError(f"kmm oracle does not know clone(2) on {arch}")
        self.clone_nr = _SYS_CLONE[arch]
        self.pipes: list[tuple[int, int, int, int]] = []  # (cmd_r, cmd_w, res_r, res_w)
        self.open_fds: set[int] = set()
        for _ in range(nslots):
            cmd_r, cmd_w = os.pipe()
            res_r, res_w = os.pipe()
            self.pipes.append((cmd_r, cmd_w, res_r, res_w))
            self.open_fds.update((cmd_r, cmd_w, res_r, res_w))
        self.by_name: dict[str, Worker] = {}
        self.order: list[Worker] = []
        self.pgid: int | None = None

    def spawn(self, name: str) -> Worker:
        worker_fds = [fd for p in self.pipes for fd in (p[0], p[3])]
        for fd in worker_fds:
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", _WORKER_PATH,
                 ",".join(map(str, worker_fds)), "0", str(self.clone_nr),
                 str(CLONE_PARENT | signal.SIGCHLD)],
                {}, setsid=True,
            )
            # the first worker leads a session and process group that every worker
            # forked later joins: kill_all ends them all, known or not yet
            self.pgid = pid
        finally:
            for fd in worker_fds:
                os.set_inheritable(fd, False)
        # Only workers hold the worker ends now, so a worker that dies leaves no reader.
        for p in self.pipes:
            for fd in (p[0], p[3]):
                os.close(fd)
                self.open_fds.discard(fd)
        w = Worker(name, 0, pid, os.pidfd_open(pid))
        self._add(w)
        _, _, wpid = self.call(w, OP_PING)
        if wpid != pid:
            raise OracleError(f"worker {name} answered as pid {wpid}, expected {pid}")
        return w

    def _add(self, w: Worker) -> None:
        self.by_name[w.name] = w
        self.order.append(w)

    def call(self, w: Worker, op: int, *args: int, timeout: float = STEP_TIMEOUT) -> tuple[int, int, int]:
        """Send one command; return the reply, or raise WorkerDied with the wait status."""
        cmd_w, res_r = self.pipes[w.slot][1], self.pipes[w.slot][2]
        words = (op, *args) + (0,) * (7 - len(args))
        try:
            os.write(cmd_w, CMD.pack(*words))
        except BrokenPipeError:
            raise WorkerDied(self._reap(w)) from None
        if op == OP_EXIT:
            status = self._reap(w)
            if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                raise WorkerDied(status)
            return (0, 0, 0)
        buf = b""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(res_r, select.POLLIN)
        poller.register(w.pidfd, select.POLLIN)
        while len(buf) < RES.size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OracleError(f"worker {w.name} (pid {w.pid}) did not answer in {timeout:.0f} s")
            events = dict(poller.poll(left * 1000))
            if res_r in events:
                chunk = os.read(res_r, RES.size - len(buf))
                if chunk:
                    buf += chunk
                    continue
            if w.pidfd in events:
                raise WorkerDied(self._reap(w))
        return RES.unpack(buf)

    def _reap(self, w: Worker) -> int:
        _, status = os.waitpid(w.pid, 0)
        w.alive = False
        os.close(w.pidfd)
        return status

    def fork(self, parent: Worker, child_name: str, child_slot: int) -> Worker:
        status, err, pid = self.call(parent, OP_FORK, child_slot)
        if status != 0:
            raise OSError(err, os.strerror(err))
        child = Worker(child_name, child_slot, pid, os.pidfd_open(pid), dict(parent.regions))
        self._add(child)
        return child

    def kill_all(self) -> None:
        """SIGKILL and reap every worker: the known ones, and any a fork or a spawn
        interrupted half way left unknown (they share the first worker's process group;
        CLONE_PARENT made them our children)."""
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        for w in self.order:
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    self._reap(w)
        if self.pgid is not None:
            while True:  # the unknown ones: our children in that group
                try:
                    if os.waitid(os.P_PGID, self.pgid, os.WEXITED) is None:
                        break
                except ChildProcessError:
                    break
        for fd in self.open_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()


# --------------------------------------------------------------------------- the run


def _check_host() -> None:
    if not os.path.isdir(THP_DIR):
        raise OracleError(f"{THP_DIR} does not exist: this kernel has no transparent huge pages")
    if os.geteuid() != 0:
        raise OracleError("kmm oracle needs root to set /sys/kernel/mm/transparent_hugepage knobs")


def _check_nodes(scenario: Scenario) -> None:
    """A scenario of N NUMA nodes needs a host of N nodes (its results depend on them)."""
    want = scenario.machine.nodes
    if want > 1:
        have = len([d for d in os.listdir("/sys/devices/system/node")
                    if d.startswith("node") and d[4:].isdigit()])
        if have != want:
            raise HostLacks(f"the scenario's machine has {want} NUMA nodes, this host "
                            f"{have}")


@contextlib.contextmanager
def _run_lock(timeout: float = 300.0, waiting=None):
    """One oracle run at a time on this machine: runs share the knobs and the counters.
    ``waiting(text)`` is told once if another run holds the lock (we wait for it)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    told = True
                    (waiting or _stderr)(
                        f"waiting for another oracle run to finish (it holds {LOCK_PATH}; "
                        f"up to {timeout:g} s)")
                if time.monotonic() > deadline:
                    raise OracleError(f"another kmm oracle run holds {LOCK_PATH}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _stderr(text: str) -> None:
    print(f"kmm oracle: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _no_interrupts():
    """Hold off SIGINT/SIGTERM while knobs are restored, so a second Ctrl-C cannot stop
    the restore half way."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Terminated(BaseException):
    """SIGTERM or SIGHUP during a run: raised so every finally restores the host."""


@contextlib.contextmanager
def _terminating_raises():
    """SIGTERM and SIGHUP raise Terminated while a run holds host state (SIGINT already
    raises KeyboardInterrupt), so the knobs and the hugetlb pool are put back."""
    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)
    old = {}
    try:
        for s in (signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: nothing to install
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42


@contextlib.contextmanager
def _thp_disabled_here():
    """prctl(PR_SET_THP_DISABLE) on this process for the duration, then as it was."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong)
    old = libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)
    if old < 0 or libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OracleError(f"prctl(PR_SET_THP_DISABLE): {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, 1 if old else 0, 0, 0, 0)


def _plan_slots(scenario: Scenario) -> dict[str, int]:
    """Pipe slot of each process name: main is 0, then each fork's child in step order."""
    slots = {"main": 0}
    for step in scenario.steps:
        if step.op == "fork":
            slots[step.child] = len(slots)  # type: ignore[index]
    return slots


def effective_knobs(scenario: Scenario) -> dict[str, object]:
    """The value of every knob for the run: the scenario's over the kernel defaults."""
    knobs = {name: knob.default for name, knob in sysfs.KNOBS.items()}
    knobs.update(scenario.knobs)
    return knobs


def _drop_caches() -> None:
    # Mode 2 runs the slab shrinkers, among them the huge zero folio's (frees it when no
    # mm holds it) and the deferred split queue's.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _setup_decoy() -> Workers:
    """A process whose mm khugepaged keeps on its list and never collapses anything in:
    a MADV_HUGEPAGE VMA whose only aligned 2 MiB block has no page table, and one written
    page in the unaligned tail (a VMA needs an anon_vma to register)."""
    decoy = Workers(1)
    try:  # the caller has no handle on it yet: an error (or Ctrl-C) here kills it here
        w = decoy.spawn("decoy")
        size = (2 << 20) + PAGE_SIZE
        for op, *args in ((OP_MMAP, DECOY_ADDR, size),
                          (OP_TOUCH, DECOY_ADDR + (2 << 20), DECOY_ADDR + size, PAGE_SIZE, 1, 1),
                          (OP_MADVISE, DECOY_ADDR, size, MADV["hugepage"])):
            status, err, _ = decoy.call(w, op, *args)
            if status != 0:
                raise OracleError(f"decoy setup failed: {errno_mod.errorcode.get(err, err)}")
    except BaseException:
        with _no_interrupts():
            decoy.kill_all()
        raise
    return decoy


def _nodemask(step: Step) -> int:
    """A step's nodes as the bits of one unsigned long (as a signed 64-bit value)."""
    bits = 0
    for n in step.nodes:
        if n >= NODEMASK_BITS:
            raise OracleError(f"step {step.index}: node {n}: the oracle passes node ids "
                              f"below {NODEMASK_BITS} only")
        bits |= 1 << n
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def _errno_result(op: str, err: int) -> dict:
    return {"op": op, "ok": False, "errno": errno_mod.errorcode.get(err, str(err))}


class _Run:
    def __init__(self, scenario: Scenario, workers: Workers, khugepaged: oracle_host.Khugepaged,
                 memcg: str | None = None) -> None:
        self.scenario = scenario
        self.workers = workers
        self.khugepaged = khugepaged
        self.slots = _plan_slots(scenario)
        self.swap = scenario.machine.swap > 0
        self.memcg = memcg

    def step(self, step: Step) -> dict:
        op = step.op
        w = self.workers.by_name.get(step.proc)
        if op == "khugepaged":
            self._khugepaged(step.full_scans or 1)
            return {"op": op, "ok": True}
        if op == "reclaim":
            assert self.memcg is not None
            oracle_host.memcg_reclaim(self.memcg)
            return {"op": op, "ok": True}
        if w is None or not w.alive:
            # Died of a signal earlier (or its parent did before forking it).
            return {"op": op, "ok": False, "error": "no such process"}
        try:
            return self._step(step, w)
        except WorkerDied as died:
            st = died.status
            if os.WIFSIGNALED(st):
                return {"op": op, "ok": False, "signal": signal.Signals(os.WTERMSIG(st)).name}
            raise OracleError(
                f"step {step.index}: worker {w.name} exited unexpectedly (status {st})"
            ) from None

    def _step(self, step: Step, w: Worker) -> dict:
        op = step.op
        call = self.workers.call
        if op == "mmap":
            addr, size = step.addr, step.size
            assert addr is not None and size is not None
            w.regions[step.region] = (addr, size)  # type: ignore[index]
            if step.backing in ("memfd", "memfd_private"):
                status, err, _ = call(w, OP_MMAP_MEMFD, addr, size, MAP_BACKING[step.backing])
            else:
                flags = MAP_BACKING[step.backing] | (MAP_NORESERVE if step.noreserve else 0)
                status, err, _ = call(w, OP_MMAP, addr, size, flags)
        elif op == "fork":
            try:
                self.workers.fork(w, step.child, self.slots[step.child])  # type: ignore[arg-type]
            except OSError as e:
                return _errno_result(op, e.errno or 0)
            return {"op": op, "ok": True}
        elif op == "exit":
            call(w, OP_EXIT)
            return {"op": op, "ok": True}
        elif op == "set_mempolicy":
            status, err, _ = call(w, OP_SET_MEMPOLICY, MPOL[step.mode], _nodemask(step),
                                  NODEMASK_BITS + 1)
        elif op == "migrate_pages":
            old = sum(1 << n for n in step.from_nodes)
            new = sum(1 << n for n in step.to_nodes)
            status, err, value = call(w, OP_MIGRATE_PAGES, old, new)
            if status == 0:
                return {"op": op, "ok": True, "not_migrated": value}
        elif op == "move_pages":
            addr, size = w.regions[step.region]  # type: ignore[index]
            start, end = step_range(step, size)
            flags = MPOL_MF["move_all" if step.move_all else "move"]
            node = -1 if step.node is None else step.node
            if step.node is not None and step.node < 0:  # the worker's -1 is "nodes NULL"
                return _errno_result(op, errno_mod.ENODEV)  # do_pages_move: node < 0
            status, err, n = call(w, OP_MOVE_PAGES, addr + start, addr + end, step.stride,
                                  node, flags)
            if status == 0:
                out = [call(w, OP_MOVE_STATUS, i)[2] for i in range(n)]
                return {"op": op, "ok": True, "not_migrated": err, "status": out}
        else:
            addr, size = w.regions[step.region]  # type: ignore[index]
            start, end = step_range(step, size)
            a, b = addr + start, addr + end
            if op == "munmap":
                status, err, _ = call(w, OP_MUNMAP, a, b - a)
            elif op == "mprotect":
                status, err, _ = call(w, OP_MPROTECT, a, b - a, PROT[step.prot])  # type: ignore[index]
            elif op == "madvise":
                status, err, _ = call(w, OP_MADVISE, a, b - a, MADV[step.advice])  # type: ignore[index]
            elif op == "touch":
                status, err, _ = call(w, OP_TOUCH, a, b, step.stride, int(step.write), step.value)
            elif op == "check":
                status, err, bad = call(w, OP_CHECK, a, b, step.stride, step.value)
                return {"op": op, "ok": True, "mismatches": bad}
            elif op == "split":
                status, err = oracle_host.split_huge_pages(w.pid, a, b)
            elif op == "punch_hole":  # file offsets: the region maps its memfd from 0
                status, err, _ = call(w, OP_PUNCH_HOLE, addr, start, end - start)
            elif op == "ftruncate":
                status, err, _ = call(w, OP_FTRUNCATE, addr, step.size)
            elif op == "mbind":
                flags = sum(MPOL_MF[f] for f in step.flags)
                status, err, _ = call(w, OP_MBIND, a, b - a, MPOL[step.mode], _nodemask(step),
                                      NODEMASK_BITS + 1, flags)
            else:
                raise OracleError(f"step {step.index}: op {op!r} is not supported")
        if status != 0:
            return _errno_result(op, err)
        return {"op": op, "ok": True}

    def _khugepaged(self, rounds: int) -> None:
        if not self.khugepaged.running():
            raise OracleError("a khugepaged step, but the host's khugepaged is not running "
                              "(enabled=never?)")
        target = oracle_host.full_scans() + rounds
        deadline = time.monotonic() + KHUGEPAGED_TIMEOUT
        while oracle_host.full_scans() < target:
            if time.monotonic() > deadline:
                raise OracleError(
                    f"khugepaged did not complete {rounds} full scans in {KHUGEPAGED_TIMEOUT:.0f} s")
            self.khugepaged.kick(deadline)

    def regions(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for w in self.workers.order:
            if not w.alive:
                continue
            vmas = oracle_host.read_smaps(w.pid)
            for name, (addr, size) in w.regions.items():
                fig = out[f"{w.name}/{name}"] = oracle_host.region_figures(vmas, addr, size, swap=self.swap)
                folios = oracle_mthp.region_folio_kb(w.pid, addr, size)
                if folios:  # extension: kB mapped by mTHPs, per folio size
                    fig["mthp_kb"] = folios
            # Self-check: a worker must never fault huge pages of its own (its interpreter
            # heap under enabled=always), or the counters would not be the scenario's.
            own = sum(v[3] for v in vmas if not any(
                v[0] >= a and v[1] <= a + round_up(s, PAGE_SIZE) for a, s in w.regions.values()))
            if own:
                raise OracleError(f"worker {w.name} has {own} kB of THPs outside its regions: "
                                  "the counters include the worker's own faults")
        return out


def run_oracle(scenario: Scenario, waiting=None) -> dict:
    """Run the scenario on the host kernel; return the report (docs/report-format.md).
    ``waiting(text)`` hears it once if another run holds the lock."""
    _check_host()
    _check_nodes(scenario)
    with _run_lock(waiting=waiting), _terminating_raises():
        knobs = oracle_host.HostKnobs()
        khugepaged = oracle_host.Khugepaged()
        decoy: Workers | None = None
        workers: Workers | None = None
        try:
            knobs.save()
            effective = effective_knobs(scenario)
            # Set-up under known conditions: PMD-size mTHP follows the global knob and no
            # other size is on (the emulator models PMD THPs only); khugepaged running.
            pmd_mthp = oracle_host._pmd_mthp_knob()
            for name in oracle_host._mthp_knobs():
                want = "inherit" if name == pmd_mthp else "never"
                if oracle_host.read_knob(name) != want:
                    oracle_host.write_knob(name, want)
            # the same for the per-size shmem knobs (before the scenario's own values)
            pmd_shmem = pmd_mthp.replace("/enabled", "/shmem_enabled")
            for name in oracle_host._mthp_shmem_knobs():
                want = "inherit" if name == pmd_shmem else "never"
                if name not in effective and oracle_host.read_knob(name) != want:
                    oracle_host.write_knob(name, want)
            oracle_host.write_knob("enabled", "madvise")
            _drop_caches()
            decoy = _setup_decoy()
            if scenario.machine.swap > 0:
                oracle_host._zram_swap_on(scenario.machine.swap, knobs)
            if any(step.op == "split" for step in scenario.steps):
                oracle_host._debugfs_mount(knobs)
            if scenario.hugetlb is not None or any(
                    step.op == "mmap" and step.backing != "anon" for step in scenario.steps):
                oracle_host.hugetlb_pool_set(scenario.hugetlb or {}, knobs)
            memcg = None
            if any(step.op == "reclaim" for step in scenario.steps):
                memcg = oracle_host._memcg_create(knobs)
            workers = Workers(len(_plan_slots(scenario)))
            main = workers.spawn("main")
            if memcg is not None:
                # Before the first step, so every page of the scenario is charged here;
                # forked workers inherit the group.
                oracle_host._write(memcg + "/memory.swappiness", "0")
                oracle_host._write(memcg + "/cgroup.procs", str(main.pid))
            for name, value in effective.items():
                if name not in ("enabled", "khugepaged/scan_sleep_millisecs"):
                    oracle_host.write_knob(name, value)
            deadline = time.monotonic() + KHUGEPAGED_TIMEOUT
            # This write wakes khugepaged for one round over the decoy; it then sleeps long.
            khugepaged.kick(deadline)
            oracle_host.write_knob("enabled", effective["enabled"])
            run = _Run(scenario, workers, khugepaged, memcg)
            assert main is workers.by_name["main"]
            # The driver (this process) must not fault or collapse THPs of its own during
            # the run. Set after the workers were spawned: execve keeps the flag.
            with _thp_disabled_here():
                before = oracle_host.read_thp_vmstat()
                events0 = oracle_host.read_vmstat(oracle_host.SWAP_EVENTS + HUGETLB_EVENTS
                                                  + MIGRATE_EVENTS)
                mthp0 = oracle_mthp.read_mthp_stats()
                shmem0 = oracle_host.read_meminfo_keys(SHMEM_MEMINFO_KEYS)
                meminfo0 = oracle_host.read_meminfo()
                results = [run.step(step) for step in scenario.steps]
                after = oracle_host.read_thp_vmstat()
                events1 = oracle_host.read_vmstat(oracle_host.SWAP_EVENTS + HUGETLB_EVENTS
                                                  + MIGRATE_EVENTS)
                mthp1 = oracle_mthp.read_mthp_stats()
                shmem1 = oracle_host.read_meminfo_keys(SHMEM_MEMINFO_KEYS)
                meminfo1 = oracle_host.read_meminfo()
            report = {
                "vmstat": {n: after[n] - before[n] for n in vmstat.THP_EVENTS},
                "regions": run.regions(),
                "steps": results,
            }
            if run.swap:  # extension: swap traffic of a run with swap
                report["events"] = {n: events1[n] - events0[n] for n in oracle_host.SWAP_EVENTS}
            # extension: shared-memory/file THP meminfo lines that moved
            moved = {k: shmem1[k] - shmem0[k] for k in SHMEM_MEMINFO_KEYS
                     if shmem1.get(k, 0) != shmem0.get(k, 0)}
            if moved:
                report.setdefault("meminfo", {}).update(moved)
            # extension: the hugetlb pool's change over the run, what moved
            meminfo = oracle_host.hugetlb_changes(meminfo0, meminfo1, MEMINFO_KEYS)
            if meminfo:
                report.setdefault("meminfo", {}).update(meminfo)
            migr = oracle_host.hugetlb_changes(events0, events1, MIGRATE_EVENTS)
            if migr:  # extension: page migration that happened (move_pages, compaction)
                report["migrate_events"] = migr
            htlb = oracle_host.hugetlb_changes(events0, events1, HUGETLB_EVENTS)
            if htlb:
                report["hugetlb_events"] = htlb
            mthp = huge_memory_mthp.mthp_report(mthp0, mthp1)
            if mthp:  # extension: hugepages-<size>kB/stats/ files that moved
                report["mthp"] = mthp
        finally:
            with _no_interrupts():
                try:
                    if workers is not None:
                        workers.kill_all()
                    if decoy is not None:
                        decoy.kill_all()
                finally:
                    knobs.restore()
    return report


# --------------------------------------------------------------------------- CLI


def restore_saved_knobs() -> int:
    """Put back the knobs a killed run left changed (they are in SAVED_PATH)."""
    _check_host()
    with _run_lock():
        if not os.path.exists(SAVED_PATH):
            print("nothing to restore", file=sys.stderr)
            return 0
        knobs = oracle_host.HostKnobs()
        knobs.load()
        with _no_interrupts():
            knobs.restore()
    print("THP knobs restored and the run's swap, debugfs and memory cgroup released",
          file=sys.stderr)
    return 0


def kernel_release() -> str:
    return os.uname().release


def recording_path(scenario_path: str) -> str:
    base = scenario_path[:-5] if scenario_path.endswith(".toml") else scenario_path
    return base + ".oracle.json"


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=1) + "\n"


def run_repeated(scenario: Scenario, runs: int) -> tuple[dict, list[str]]:
    """Run ``runs`` times; return the first report and the differences of the others."""
    first = run_oracle(scenario)
    problems: list[str] = []
    for i in range(1, runs):
        again = run_oracle(scenario)
        problems += [f"run {i + 1}: {d}" for d in compare(first, again)]
    return first, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kmm.tools.oracle",
        description="Run scenarios on the host kernel and print or record their reports.",
    )
    ap.add_argument("files", nargs="*", help="scenario TOML files")
    ap.add_argument("--restore", action="store_true",
                    help="only put back the THP knobs saved by a run that was killed")
    ap.add_argument("--record", action="store_true",
                    help="write <name>.oracle.json beside each scenario instead of printing")
    ap.add_argument("--runs", type=int, default=1,
                    help="run each scenario this many times and refuse to record if they differ")
    args = ap.parse_args(argv)
    if args.restore:
        return restore_saved_knobs()
    if not args.files:
        ap.error("no scenario files given")
    rc = 0
    for path in args.files:
        try:
            scenario = load_scenario(path)
            report, problems = run_repeated(scenario, max(1, args.runs))
        except ScenarioError as e:
            print(e, file=sys.stderr)
            rc = 1
            continue
        except (OracleError, OSError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            rc = 1
            continue
        if problems:
            print(f"{path}: not reproducible, not recorded:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            rc = 1
            continue
        if args.record:
            out = recording_path(path)
            with open(out, "w") as f:
                f.write(dumps({"kernel": kernel_release(), "report": report}))
            print(f"{out}: recorded", file=sys.stderr)
        else:
            sys.stdout.write(dumps(report))
    return rc


def _main_interruptible() -> int:
    """``python -m kmm.tools.oracle``: Ctrl-C or SIGTERM is one line and 130/143 (the
    knobs are restored on the way out, as always)."""
    from kmm.tools import interrupt
    saved = interrupt.install()
    try:
        return main()
    except BaseException:
        if not interrupt.caught():
            raise
    finally:
        interrupt.restore(saved)
    print(f"kmm oracle: {interrupt.message()}", file=sys.stderr)
    return interrupt.exit_code()


if __name__ == "__main__":
    sys.exit(_main_interruptible())
