"""Run a scenario on the host kernel and report what it did (design.md section 5).

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

* Issue 3 resources, set up only for the scenarios that need them and released on every
  exit path like the knobs (the file in /run notes each one as soon as it exists):
  ``[machine] swap`` > 0 makes a fresh zram device of that size the only swap (the run is
  refused if another swap is active or zswap is on), and the report gains ``swap_kb`` per
  region and ``events`` (pswpin, pswpout); a ``split`` step writes the range to debugfs
  ``split_huge_pages`` (debugfs is mounted for the run if it is not); a ``reclaim`` step
  runs ``memory.force_empty`` on a cgroup-v1 memory cgroup that holds every worker of the
  run, with swappiness 0 (see ``memcg_reclaim``).

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
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from kmm import huge_memory_mthp, sysfs, vmstat
from kmm.tools import oracle_mthp
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
# the hugetlb pool (/proc/sys/vm): set for a run with a [hugetlb] table or hugetlb
# mappings, and always put back to 0 afterwards (HostKnobs.restore)
HUGETLB_SYSCTL = {"nr_hugepages": "/proc/sys/vm/nr_hugepages",
                  "nr_overcommit_hugepages": "/proc/sys/vm/nr_overcommit_hugepages"}
MEMINFO_KEYS = ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp")
HUGETLB_EVENTS = ("htlb_buddy_alloc_success", "htlb_buddy_alloc_fail")

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

# The worker program lives in oracle_worker.py beside this file; it runs under
# ``python -I -S`` (no site, no kmm on the path).
_WORKER_PATH = str(pathlib.Path(__file__).with_name("oracle_worker.py"))



class OracleError(Exception):
    """The oracle cannot run here, or the host did something it cannot report."""


class HostLacks(OracleError):
    """This host cannot run this scenario: it lacks something the scenario needs (zram,
    a writable debugfs, a cgroup-v1 memory controller) or holds something in the way
    (another active swap, zswap)."""


# --------------------------------------------------------------------------- host knobs


def _knob_path(name: str) -> str:
    return os.path.join(THP_DIR, name)


def read_knob(name: str) -> str:
    """The knob's current value as one would write it back ("[x]" words unbracketed)."""
    with open(_knob_path(name)) as f:
        text = f.read().strip()
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text


def write_knob(name: str, value: object) -> None:
    try:
        with open(_knob_path(name), "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        raise OracleError(f"cannot write {value!r} to {_knob_path(name)}: {e.strerror}") from None


def _mthp_knobs() -> list[str]:
    """The per-size anonymous mTHP ``enabled`` files (hugepages-<size>kB/enabled)."""
    try:
        names = sorted(os.listdir(THP_DIR))
    except OSError:
        return []
    return [f"{n}/enabled" for n in names
            if n.startswith("hugepages-") and os.path.exists(_knob_path(f"{n}/enabled"))]


def _mthp_shmem_knobs() -> list[str]:
    """The per-size shmem knobs (hugepages-<size>kB/shmem_enabled)."""
    try:
        names = sorted(os.listdir(THP_DIR))
    except OSError:
        return []
    return [f"{n}/shmem_enabled" for n in names if n.startswith("hugepages-")
            and os.path.exists(_knob_path(f"{n}/shmem_enabled"))]


def _pmd_mthp_knob() -> str:
    with open(_knob_path("hpage_pmd_size")) as f:
        kb = int(f.read()) // 1024
    return f"hugepages-{kb}kB/enabled"


class HostKnobs:
    """Saves every knob the oracle may touch and restores them all, once; and releases
    the host resources a run set up for itself (a zram swap device, a debugfs mount, a
    memory cgroup), each noted with ``hold`` as soon as it exists.

    The saved values and the held resources are written to SAVED_PATH before anything
    changes, so that if a run is killed outright the next run (holding the same lock), or
    ``--restore``, releases and restores them first.
    """

    def __init__(self) -> None:
        self.names = list(dict.fromkeys(list(sysfs.KNOBS) + _mthp_knobs()
                                        + _mthp_shmem_knobs()))
        self.saved: dict[str, str] = {}
        self.held: dict[str, object] = {}  # "memcg": path, "zram": device id, "debugfs": path

    def load(self) -> None:
        with open(SAVED_PATH) as f:
            state = json.load(f)
        if "knobs" in state:
            self.saved, self.held = state["knobs"], state.get("held", {})
        else:  # the file of a run from before resources were held: knobs only
            self.saved, self.held = state, {}

    def _persist(self) -> None:
        tmp = SAVED_PATH + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"knobs": self.saved, "held": self.held}, f)
        os.replace(tmp, SAVED_PATH)

    def save(self) -> None:
        if os.path.exists(SAVED_PATH):
            # A previous run died before restoring: its saved values are the real ones.
            self.load()
            self.restore(keep_file=True)
        self.saved = {n: read_knob(n) for n in self.names}
        self.held = {}
        self._persist()

    def hold(self, kind: str, what: object) -> None:
        """Note a resource the run now holds (before anything else can fail)."""
        self.held[kind] = what
        self._persist()

    def restore(self, keep_file: bool = False) -> None:
        errors = []
        if "hugetlb" in self.held:  # the pool first: overcommit, then nr_hugepages, to 0
            try:
                hugetlb_pool_release()
                del self.held["hugetlb"]
            except OSError as e:
                errors.append(f"hugetlb pool: {e}")
        # The memory cgroup first (its tasks are gone), then swap (nothing left uses it),
        # debugfs last.
        for kind, release in (("memcg", _memcg_release), ("zram", _zram_release),
                              ("debugfs", _debugfs_release)):
            if kind in self.held:
                try:
                    release(self.held[kind])
                    del self.held[kind]
                except (OSError, OracleError) as e:
                    errors.append(f"{kind} {self.held[kind]}: {e}")
        # enabled first (stops khugepaged scanning the run's leftovers under a mode it no
        # longer has), scan_sleep_millisecs last (its write wakes khugepaged).
        order = sorted(self.saved, key=lambda n: (n != "enabled", n == "khugepaged/scan_sleep_millisecs"))
        for name in order:
            try:
                if read_knob(name) != self.saved[name]:
                    write_knob(name, self.saved[name])
            except (OSError, OracleError) as e:
                errors.append(f"{name}: {e}")
        if errors:
            if os.path.exists(SAVED_PATH):
                self._persist()  # what is still held, for the next attempt
            raise OracleError("could not restore the host: " + "; ".join(errors))
        if not keep_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SAVED_PATH)


# --------------------------------------------------------------------------- host resources
#
# Set up only for scenarios that need them and released on every exit path (HostKnobs).

ZRAM_CONTROL = "/sys/class/zram-control"
ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"
DEBUGFS = "/sys/kernel/debug"
SPLIT_HUGE_PAGES = DEBUGFS + "/split_huge_pages"
MEMCG_ROOT = "/sys/fs/cgroup/memory"
MEMCG_PATH = MEMCG_ROOT + "/kmm-oracle"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _command(*argv: str) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise HostLacks(f"{argv[0]} is not installed") from None
    if r.returncode != 0:
        out = " ".join((r.stderr or r.stdout).split())
        raise OracleError(f"{' '.join(argv)} failed (exit {r.returncode}): {out}")


def active_swaps() -> list[str]:
    """The swap areas in use (the first column of /proc/swaps)."""
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:] if line.strip()]


def zswap_enabled() -> bool:
    try:
        return _read(ZSWAP_ENABLED) in ("Y", "y", "1")
    except FileNotFoundError:
        return False  # no zswap in this kernel


def _zram_swap_on(size: int, knobs: HostKnobs) -> str:
    """A fresh zram device of ``size`` bytes as the only swap; returns its path.

    zram is synchronous and non-rotational: a whole THP goes out in one piece
    (thp_swpout) when a free 2 MiB swap cluster exists, and swap-in bypasses the swap
    cache. zswap must be off, or pages would stop in its pool and never reach the device.
    """
    swaps = active_swaps()
    if swaps:
        raise HostLacks(f"swap is already active ({', '.join(swaps)}): a scenario with "
                        "[machine] swap needs its zram device to be the only swap; swapoff -a first")
    if zswap_enabled():
        raise HostLacks(f"zswap is enabled ({ZSWAP_ENABLED}): swapped pages would stay in "
                        "its pool; disable it for oracle runs")
    if not os.path.isdir(ZRAM_CONTROL):
        raise HostLacks(f"{ZRAM_CONTROL} does not exist: load the zram module (modprobe zram)")
    with _no_interrupts():  # no Ctrl-C between creating the device and noting it
        n = int(_read(ZRAM_CONTROL + "/hot_add"))
        knobs.hold("zram", n)
    dev = f"/dev/zram{n}"
    _write(f"/sys/block/zram{n}/disksize", str(size))
    _command("mkswap", dev)
    _command("swapon", dev)
    if active_swaps() != [dev]:
        raise OracleError(f"after swapon {dev}, /proc/swaps lists {active_swaps()}")
    return dev


def _zram_release(n: object) -> None:
    dev = f"/dev/zram{n}"
    if dev in active_swaps():
        _command("swapoff", dev)
    if os.path.exists(f"/sys/block/zram{n}"):
        _write(f"/sys/block/zram{n}/reset", "1")
        _write(ZRAM_CONTROL + "/hot_remove", str(n))


def _debugfs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1:3] == [DEBUGFS, "debugfs"] for line in f)


def _debugfs_mount(knobs: HostKnobs) -> None:
    """Mount debugfs for the run if it is not mounted (and note it, to unmount after);
    check split_huge_pages can be written before any step runs."""
    if not _debugfs_mounted():
        knobs.hold("debugfs", DEBUGFS)
        _command("mount", "-t", "debugfs", "debugfs", DEBUGFS)
    if not os.path.exists(SPLIT_HUGE_PAGES):
        raise HostLacks(f"{SPLIT_HUGE_PAGES} does not exist (a kernel without "
                        "CONFIG_DEBUG_FS or CONFIG_TRANSPARENT_HUGEPAGE): a split step needs it")
    try:  # opening is harmless; kernel lockdown refuses it here, not at the write
        os.close(os.open(SPLIT_HUGE_PAGES, os.O_WRONLY))
    except OSError as e:
        why = (" (kernel lockdown restricts debugfs: see /sys/kernel/security/lockdown)"
               if e.errno == errno_mod.EPERM else "")
        raise HostLacks(f"cannot open {SPLIT_HUGE_PAGES} for writing: {e.strerror}{why}; "
                        "a split step needs it") from None


def _debugfs_release(path: object) -> None:
    if _debugfs_mounted():
        _command("umount", str(path))


def _memcg_create(knobs: HostKnobs) -> str:
    """A fresh cgroup-v1 memory cgroup for the scenario's processes."""
    if not os.path.exists(MEMCG_ROOT + "/memory.limit_in_bytes"):
        raise HostLacks(f"{MEMCG_ROOT} is not a cgroup-v1 memory controller: "
                        "a reclaim step needs one")
    if os.path.isdir(MEMCG_PATH):
        _memcg_release(MEMCG_PATH)  # left over from a run that died before noting it
    knobs.hold("memcg", MEMCG_PATH)
    os.mkdir(MEMCG_PATH)
    return MEMCG_PATH


def _memcg_release(path: object) -> None:
    path = str(path)
    if not os.path.isdir(path):
        return
    # Tasks still inside (a killed run's workers on their way out) go to the root group.
    for _ in range(100):
        pids = _read(path + "/cgroup.procs").split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, OSError):
                _write(MEMCG_ROOT + "/cgroup.procs", pid)
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno_mod.EBUSY:
                raise
        time.sleep(0.02)
    os.rmdir(path)


def hugetlb_pool_set(pool: dict[str, int], knobs: "HostKnobs") -> None:
    """The scenario's [hugetlb] pool on the host (noted as held first, so every exit
    path, a killed run's successor included, puts it back to 0). A pool the host
    cannot fully allocate is an error: the run would not be the scenario's."""
    knobs.hold("hugetlb", 1)
    over = pool.get("nr_overcommit_hugepages", 0)
    nr = pool.get("nr_hugepages", 0)
    _write(HUGETLB_SYSCTL["nr_overcommit_hugepages"], f"{over}\n")
    _write(HUGETLB_SYSCTL["nr_hugepages"], f"{nr}\n")
    got = int(_read(HUGETLB_SYSCTL["nr_hugepages"]))
    if got != nr:
        raise HostLacks(f"the host allocated {got} of the {nr} huge pages asked for")


def hugetlb_pool_release(_held: object = None) -> None:
    """Put /proc/sys/vm/nr_overcommit_hugepages and nr_hugepages back to 0."""
    for name in ("nr_overcommit_hugepages", "nr_hugepages"):
        if _read(HUGETLB_SYSCTL[name]) != "0":
            _write(HUGETLB_SYSCTL[name], "0\n")


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo's HugePages_* counts."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in MEMINFO_KEYS:
                out[name] = int(rest.split()[0])
    return out


def hugetlb_changes(before: dict[str, int], after: dict[str, int], keys) -> dict[str, int]:
    return {k: after[k] - before[k] for k in keys if after[k] != before[k]}


def split_huge_pages(pid: int, start: int, end: int) -> tuple[int, int]:
    """The ``split`` step: debugfs split_huge_pages_pid splits every THP mapped in
    [start, end) of the process. Returns (status, errno) like a worker reply."""
    try:
        fd = os.open(SPLIT_HUGE_PAGES, os.O_WRONLY)
    except OSError as e:
        raise OracleError(f"cannot open {SPLIT_HUGE_PAGES}: {e.strerror}") from None
    try:
        os.write(fd, f"{pid},0x{start:x},0x{end:x}".encode())
    except OSError as e:
        return -1, e.errno or 0
    finally:
        os.close(fd)
    return 0, 0


def memcg_reclaim(path: str) -> None:
    """The ``reclaim`` step: ``memory.force_empty`` of the run's memory cgroup.

    The kernel drains the per-CPU LRU batches, then calls try_to_free_mem_cgroup_pages
    until the group is empty or 16 passes free nothing. Every pass walks the priorities
    from DEF_PRIORITY down to 0 and runs the group's memcg-aware shrinkers at each, so the
    deferred split shrinker scans the group's whole queue. The group's swappiness is 0,
    so no anonymous page is swapped out even with swap on; the file LRU is scanned, which
    holds the clean MADV_FREE'd (lazyfree) folios, and those are discarded.
    """
    try:
        _write(path + "/memory.force_empty", "0")
    except OSError as e:
        raise OracleError(f"reclaim: writing {path}/memory.force_empty: {e.strerror}") from None


# --------------------------------------------------------------------------- khugepaged


_kthread_pid: int | None = None


def _is_khugepaged(pid: int | str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "khugepaged":
                return False
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[1] == "2"  # a kernel thread (parent kthreadd)


def _khugepaged_pid() -> int | None:
    """The khugepaged kthread's pid (it changes when enabled=never stops the thread)."""
    global _kthread_pid
    if _kthread_pid is not None and _is_khugepaged(_kthread_pid):
        return _kthread_pid
    _kthread_pid = None
    for d in os.listdir("/proc"):
        if d.isdigit() and _is_khugepaged(d):
            _kthread_pid = int(d)
            break
    return _kthread_pid


def full_scans() -> int:
    return int(read_knob("khugepaged/full_scans"))


class Khugepaged:
    """Watches the khugepaged thread: asleep in its wait between scans, or not."""

    def _state(self) -> tuple[str, str, int] | None:
        pid = _khugepaged_pid()
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read().strip()
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", f.read(), re.M)
        except OSError:
            return None
        return state, wchan, int(m.group(1)) if m else 0

    def switches(self) -> int:
        st = self._state()
        return st[2] if st else 0

    def running(self) -> bool:
        return _khugepaged_pid() is not None

    def wait_asleep(self, since_switches: int, deadline: float) -> None:
        """Wait until khugepaged has slept since ``since_switches`` and is now asleep in
        its wait between scans, with full_scans steady."""
        while True:
            st = self._state()
            if st is None:
                return  # no khugepaged thread: nothing can scan
            state, wchan, sw = st
            # Asleep between scans: in khugepaged_wait_work (inlined into khugepaged()).
            if state == "S" and wchan.startswith("khugepaged") and sw > since_switches:
                f0 = full_scans()
                time.sleep(0.005)
                st2 = self._state()
                if st2 is not None and st2[0] == "S" and st2[2] == sw and full_scans() == f0:
                    return
            if time.monotonic() > deadline:
                raise OracleError("khugepaged did not go back to sleep within the timeout")
            time.sleep(0.002)

    def kick(self, deadline: float) -> None:
        """Wake khugepaged for one scan round (writing scan_sleep_millisecs resets its
        sleep) and wait until it sleeps again; the long sleep stays in force."""
        sw = self.switches()
        write_knob("khugepaged/scan_sleep_millisecs", LONG_SLEEP_MS)
        self.wait_asleep(sw, deadline)


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
        for w in self.order:
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    self._reap(w)
        for fd in self.open_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()


# --------------------------------------------------------------------------- measuring


def read_thp_vmstat() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("thp_"):
                name, value = line.split()
                values[name] = int(value)
    missing = [n for n in vmstat.THP_EVENTS if n not in values]
    if missing:
        raise OracleError(f"/proc/vmstat lacks {', '.join(missing)}: not the kernel kmm models")
    return values


_VMA_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def read_smaps(pid: int) -> list[tuple[int, ...]]:
    """(start, end, Rss kB, AnonHugePages kB, Swap kB, ShmemPmdMapped kB,
    Private_Hugetlb kB, Shared_Hugetlb kB) for each VMA of the process."""
    vmas: list[list[int]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _VMA_RE.match(line)
            if m:
                vmas.append([int(m.group(1), 16), int(m.group(2), 16), 0, 0, 0, 0, 0, 0])
            elif line.startswith("ShmemPmdMapped:"):
                vmas[-1][5] = int(line.split()[1])
            elif line.startswith("Private_Hugetlb:"):
                vmas[-1][6] = int(line.split()[1])
            elif line.startswith("Shared_Hugetlb:"):
                vmas[-1][7] = int(line.split()[1])
            elif line.startswith("Rss:"):
                vmas[-1][2] = int(line.split()[1])
            elif line.startswith("AnonHugePages:"):
                vmas[-1][3] = int(line.split()[1])
            elif line.startswith("Swap:"):
                vmas[-1][4] = int(line.split()[1])
    return [tuple(v) for v in vmas]  # type: ignore[misc]


def region_figures(vmas, addr: int, size: int, *, swap: bool = False) -> dict[str, int]:
    """smaps sums over the region's VMAs; ``swap_kb`` only for a run with swap."""
    end = addr + round_up(size, PAGE_SIZE)
    rss = huge = swapped = shpmd = priv = shared = 0
    for v in vmas:
        start, stop = v[0], v[1]
        if start >= addr and stop <= end:
            rss += v[2]
            huge += v[3]
            swapped += v[4]
            shpmd += v[5]
            priv += v[6]
            shared += v[7]
    figures = {"rss_kb": rss, "anon_huge_kb": huge}
    if swap:
        figures["swap_kb"] = swapped
    if shpmd:  # extension (issue 12): shmem THPs mapped by PMD, only when nonzero
        figures["shmem_pmd_mapped_kb"] = shpmd
    if priv:  # extension (issue 13): hugetlb mappings, only when nonzero
        figures["private_hugetlb_kb"] = priv
    if shared:
        figures["shared_hugetlb_kb"] = shared
    return figures


def read_meminfo_keys(keys) -> dict[str, int]:
    """The named /proc/meminfo lines (kB or counts)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


SWAP_EVENTS = ("pswpin", "pswpout")  # the report's "events" in a run with swap


def read_vmstat(names) -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name in names:
                values[name] = int(value)
    return values


# --------------------------------------------------------------------------- the run


def _check_host() -> None:
    if not os.path.isdir(THP_DIR):
        raise OracleError(f"{THP_DIR} does not exist: this kernel has no transparent huge pages")
    if os.geteuid() != 0:
        raise OracleError("kmm oracle needs root to set /sys/kernel/mm/transparent_hugepage knobs")


@contextlib.contextmanager
def _run_lock(timeout: float = 300.0):
    """One oracle run at a time on this machine: runs share the knobs and the counters."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OracleError(f"another kmm oracle run holds {LOCK_PATH}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


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
    w = decoy.spawn("decoy")
    size = (2 << 20) + PAGE_SIZE
    for op, *args in ((OP_MMAP, DECOY_ADDR, size),
                      (OP_TOUCH, DECOY_ADDR + (2 << 20), DECOY_ADDR + size, PAGE_SIZE, 1, 1),
                      (OP_MADVISE, DECOY_ADDR, size, MADV["hugepage"])):
        status, err, _ = decoy.call(w, op, *args)
        if status != 0:
            decoy.kill_all()
            raise OracleError(f"decoy setup failed: {errno_mod.errorcode.get(err, err)}")
    return decoy


def _errno_result(op: str, err: int) -> dict:
    return {"op": op, "ok": False, "errno": errno_mod.errorcode.get(err, str(err))}


class _Run:
    def __init__(self, scenario: Scenario, workers: Workers, khugepaged: Khugepaged,
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
            memcg_reclaim(self.memcg)
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
                status, err = split_huge_pages(w.pid, a, b)
            elif op == "punch_hole":  # file offsets: the region maps its memfd from 0
                status, err, _ = call(w, OP_PUNCH_HOLE, addr, start, end - start)
            elif op == "ftruncate":
                status, err, _ = call(w, OP_FTRUNCATE, addr, step.size)
            else:
                raise OracleError(f"step {step.index}: op {op!r} is not supported")
        if status != 0:
            return _errno_result(op, err)
        return {"op": op, "ok": True}

    def _khugepaged(self, rounds: int) -> None:
        if not self.khugepaged.running():
            raise OracleError("a khugepaged step, but the host's khugepaged is not running "
                              "(enabled=never?)")
        target = full_scans() + rounds
        deadline = time.monotonic() + KHUGEPAGED_TIMEOUT
        while full_scans() < target:
            if time.monotonic() > deadline:
                raise OracleError(
                    f"khugepaged did not complete {rounds} full scans in {KHUGEPAGED_TIMEOUT:.0f} s")
            self.khugepaged.kick(deadline)

    def regions(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for w in self.workers.order:
            if not w.alive:
                continue
            vmas = read_smaps(w.pid)
            for name, (addr, size) in w.regions.items():
                fig = out[f"{w.name}/{name}"] = region_figures(vmas, addr, size, swap=self.swap)
                folios = oracle_mthp.region_folio_kb(w.pid, addr, size)
                if folios:  # extension (issue 11): kB mapped by mTHPs, per folio size
                    fig["mthp_kb"] = folios
            # Self-check: a worker must never fault huge pages of its own (its interpreter
            # heap under enabled=always), or the counters would not be the scenario's.
            own = sum(v[3] for v in vmas if not any(
                v[0] >= a and v[1] <= a + round_up(s, PAGE_SIZE) for a, s in w.regions.values()))
            if own:
                raise OracleError(f"worker {w.name} has {own} kB of THPs outside its regions: "
                                  "the counters include the worker's own faults")
        return out


def run_oracle(scenario: Scenario) -> dict:
    """Run the scenario on the host kernel; return the report (design.md section 5)."""
    _check_host()
    with _run_lock(), _terminating_raises():
        knobs = HostKnobs()
        khugepaged = Khugepaged()
        decoy: Workers | None = None
        workers: Workers | None = None
        try:
            knobs.save()
            effective = effective_knobs(scenario)
            # Set-up under known conditions: PMD-size mTHP follows the global knob and no
            # other size is on (the emulator models PMD THPs only); khugepaged running.
            pmd_mthp = _pmd_mthp_knob()
            for name in _mthp_knobs():
                want = "inherit" if name == pmd_mthp else "never"
                if read_knob(name) != want:
                    write_knob(name, want)
            # the same for the per-size shmem knobs (before the scenario's own values)
            pmd_shmem = pmd_mthp.replace("/enabled", "/shmem_enabled")
            for name in _mthp_shmem_knobs():
                want = "inherit" if name == pmd_shmem else "never"
                if name not in effective and read_knob(name) != want:
                    write_knob(name, want)
            write_knob("enabled", "madvise")
            _drop_caches()
            decoy = _setup_decoy()
            if scenario.machine.swap > 0:
                _zram_swap_on(scenario.machine.swap, knobs)
            if any(step.op == "split" for step in scenario.steps):
                _debugfs_mount(knobs)
            if scenario.hugetlb is not None or any(
                    step.op == "mmap" and step.backing != "anon" for step in scenario.steps):
                hugetlb_pool_set(scenario.hugetlb or {}, knobs)
            memcg = None
            if any(step.op == "reclaim" for step in scenario.steps):
                memcg = _memcg_create(knobs)
            workers = Workers(len(_plan_slots(scenario)))
            main = workers.spawn("main")
            if memcg is not None:
                # Before the first step, so every page of the scenario is charged here;
                # forked workers inherit the group.
                _write(memcg + "/memory.swappiness", "0")
                _write(memcg + "/cgroup.procs", str(main.pid))
            for name, value in effective.items():
                if name not in ("enabled", "khugepaged/scan_sleep_millisecs"):
                    write_knob(name, value)
            deadline = time.monotonic() + KHUGEPAGED_TIMEOUT
            # This write wakes khugepaged for one round over the decoy; it then sleeps long.
            khugepaged.kick(deadline)
            write_knob("enabled", effective["enabled"])
            run = _Run(scenario, workers, khugepaged, memcg)
            assert main is workers.by_name["main"]
            # The driver (this process) must not fault or collapse THPs of its own during
            # the run. Set after the workers were spawned: execve keeps the flag.
            with _thp_disabled_here():
                before = read_thp_vmstat()
                events0 = read_vmstat(SWAP_EVENTS + HUGETLB_EVENTS)
                mthp0 = oracle_mthp.read_mthp_stats()
                shmem0 = read_meminfo_keys(SHMEM_MEMINFO_KEYS)
                meminfo0 = read_meminfo()
                results = [run.step(step) for step in scenario.steps]
                after = read_thp_vmstat()
                events1 = read_vmstat(SWAP_EVENTS + HUGETLB_EVENTS)
                mthp1 = oracle_mthp.read_mthp_stats()
                shmem1 = read_meminfo_keys(SHMEM_MEMINFO_KEYS)
                meminfo1 = read_meminfo()
            report = {
                "vmstat": {n: after[n] - before[n] for n in vmstat.THP_EVENTS},
                "regions": run.regions(),
                "steps": results,
            }
            if run.swap:  # extension: swap traffic of a run with swap
                report["events"] = {n: events1[n] - events0[n] for n in SWAP_EVENTS}
            # extension (issue 12): shared-memory/file THP meminfo lines that moved
            moved = {k: shmem1[k] - shmem0[k] for k in SHMEM_MEMINFO_KEYS
                     if shmem1.get(k, 0) != shmem0.get(k, 0)}
            if moved:
                report.setdefault("meminfo", {}).update(moved)
            # extension (issue 13): the hugetlb pool's change over the run, what moved
            meminfo = hugetlb_changes(meminfo0, meminfo1, MEMINFO_KEYS)
            if meminfo:
                report.setdefault("meminfo", {}).update(meminfo)
            htlb = hugetlb_changes(events0, events1, HUGETLB_EVENTS)
            if htlb:
                report["hugetlb_events"] = htlb
            mthp = huge_memory_mthp.mthp_report(mthp0, mthp1)
            if mthp:  # extension (issue 11): hugepages-<size>kB/stats/ files that moved
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
        knobs = HostKnobs()
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


if __name__ == "__main__":
    sys.exit(main())
