"""The host side of the oracle (kmm/tools/oracle.py): the knobs, resources and readings of
the machine's own Linux (mm/huge_memory.c's sysfs knobs, mm/khugepaged.c, mm/hugetlb.c's
pool sysctls, /proc/meminfo, /proc/vmstat, /proc/PID/smaps).

``HostKnobs`` sets the THP knobs for a run and restores them on every exit path, noting
the saved values (and each resource as soon as it exists) in a file in /run; the zram
swap, debugfs mount and cgroup-v1 memory cgroup a scenario needs are set up and released
here; ``Khugepaged`` wakes the host's khugepaged for a step and waits for it to sleep
again; the ``read_*`` functions and ``region_figures`` measure what a run did. The run
itself, its workers and the CLI stay in oracle.py.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import re
import subprocess
import time

from kmm import sysfs, vmstat
from kmm.tools import oracle
from kmm.tools.scenario import PAGE_SIZE, round_up

# the hugetlb pool (/proc/sys/vm): set for a run with a [hugetlb] table or hugetlb
# mappings, and always put back to 0 afterwards (HostKnobs.restore, below)
HUGETLB_SYSCTL = {"nr_hugepages": "/proc/sys/vm/nr_hugepages",
                  "nr_overcommit_hugepages": "/proc/sys/vm/nr_overcommit_hugepages"}

# --------------------------------------------------------------------------- host knobs


def _knob_path(name: str) -> str:
    return os.path.join(oracle.THP_DIR, name)


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
        raise oracle.OracleError(f"cannot write {value!r} to {_knob_path(name)}: {e.strerror}") from None


def _mthp_knobs() -> list[str]:
    """The per-size anonymous mTHP ``enabled`` files (hugepages-<size>kB/enabled)."""
    try:
        names = sorted(os.listdir(oracle.THP_DIR))
    except OSError:
        return []
    return [f"{n}/enabled" for n in names
            if n.startswith("hugepages-") and os.path.exists(_knob_path(f"{n}/enabled"))]


def _mthp_shmem_knobs() -> list[str]:
    """The per-size shmem knobs (hugepages-<size>kB/shmem_enabled)."""
    try:
        names = sorted(os.listdir(oracle.THP_DIR))
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
        with open(oracle.SAVED_PATH) as f:
            state = json.load(f)
        if "knobs" in state:
            self.saved, self.held = state["knobs"], state.get("held", {})
        else:  # the file of a run from before resources were held: knobs only
            self.saved, self.held = state, {}

    def _persist(self) -> None:
        tmp = oracle.SAVED_PATH + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"knobs": self.saved, "held": self.held}, f)
        os.replace(tmp, oracle.SAVED_PATH)

    def save(self) -> None:
        if os.path.exists(oracle.SAVED_PATH):
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
                except (OSError, oracle.OracleError) as e:
                    errors.append(f"{kind} {self.held[kind]}: {e}")
        # enabled first (stops khugepaged scanning the run's leftovers under a mode it no
        # longer has), scan_sleep_millisecs last (its write wakes khugepaged).
        order = sorted(self.saved, key=lambda n: (n != "enabled", n == "khugepaged/scan_sleep_millisecs"))
        for name in order:
            try:
                if read_knob(name) != self.saved[name]:
                    write_knob(name, self.saved[name])
            except (OSError, oracle.OracleError) as e:
                errors.append(f"{name}: {e}")
        if errors:
            if os.path.exists(oracle.SAVED_PATH):
                self._persist()  # what is still held, for the next attempt
            raise oracle.OracleError("could not restore the host: " + "; ".join(errors))
        if not keep_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(oracle.SAVED_PATH)


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
        raise oracle.HostLacks(f"{argv[0]} is not installed") from None
    if r.returncode != 0:
        out = " ".join((r.stderr or r.stdout).split())
        raise oracle.OracleError(f"{' '.join(argv)} failed (exit {r.returncode}): {out}")


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
        raise oracle.HostLacks(f"swap is already active ({', '.join(swaps)}): a scenario with "
                        "[machine] swap needs its zram device to be the only swap; swapoff -a first")
    if zswap_enabled():
        raise oracle.HostLacks(f"zswap is enabled ({ZSWAP_ENABLED}): swapped pages would stay in "
                        "its pool; disable it for oracle runs")
    if not os.path.isdir(ZRAM_CONTROL):
        raise oracle.HostLacks(f"{ZRAM_CONTROL} does not exist: load the zram module (modprobe zram)")
    with oracle._no_interrupts():  # no Ctrl-C between creating the device and noting it
        n = int(_read(ZRAM_CONTROL + "/hot_add"))
        knobs.hold("zram", n)
    dev = f"/dev/zram{n}"
    _write(f"/sys/block/zram{n}/disksize", str(size))
    _command("mkswap", dev)
    _command("swapon", dev)
    if active_swaps() != [dev]:
        raise oracle.OracleError(f"after swapon {dev}, /proc/swaps lists {active_swaps()}")
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
        raise oracle.HostLacks(f"{SPLIT_HUGE_PAGES} does not exist (a kernel without "
                        "CONFIG_DEBUG_FS or CONFIG_TRANSPARENT_HUGEPAGE): a split step needs it")
    try:  # opening is harmless; kernel lockdown refuses it here, not at the write
        os.close(os.open(SPLIT_HUGE_PAGES, os.O_WRONLY))
    except OSError as e:
        why = (" (kernel lockdown restricts debugfs: see /sys/kernel/security/lockdown)"
               if e.errno == errno_mod.EPERM else "")
        raise oracle.HostLacks(f"cannot open {SPLIT_HUGE_PAGES} for writing: {e.strerror}{why}; "
                        "a split step needs it") from None


def _debugfs_release(path: object) -> None:
    if _debugfs_mounted():
        _command("umount", str(path))


def _memcg_create(knobs: HostKnobs) -> str:
    """A fresh cgroup-v1 memory cgroup for the scenario's processes."""
    if not os.path.exists(MEMCG_ROOT + "/memory.limit_in_bytes"):
        raise oracle.HostLacks(f"{MEMCG_ROOT} is not a cgroup-v1 memory controller: "
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
        raise oracle.HostLacks(f"the host allocated {got} of the {nr} huge pages asked for")


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
            if name in oracle.MEMINFO_KEYS:
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
        raise oracle.OracleError(f"cannot open {SPLIT_HUGE_PAGES}: {e.strerror}") from None
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
        raise oracle.OracleError(f"reclaim: writing {path}/memory.force_empty: {e.strerror}") from None


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
                raise oracle.OracleError("khugepaged did not go back to sleep within the timeout")
            time.sleep(0.002)

    def kick(self, deadline: float) -> None:
        """Wake khugepaged for one scan round (writing scan_sleep_millisecs resets its
        sleep) and wait until it sleeps again; the long sleep stays in force."""
        sw = self.switches()
        write_knob("khugepaged/scan_sleep_millisecs", oracle.LONG_SLEEP_MS)
        self.wait_asleep(sw, deadline)


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
        raise oracle.OracleError(f"/proc/vmstat lacks {', '.join(missing)}: not the kernel kmm models")
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
    if shpmd:  # extension: shmem THPs mapped by PMD, only when nonzero
        figures["shmem_pmd_mapped_kb"] = shpmd
    if priv:  # extension: hugetlb mappings, only when nonzero
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
