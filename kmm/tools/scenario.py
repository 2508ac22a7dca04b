"""Load and validate scenario TOML files (docs/scenario-format.md).

A scenario is a sequence of steps by named processes. Loading checks everything that can
be checked without running it: the tables and keys, each value's type and range, the
sysfs knobs (with the kernel's own validation, ``kmm.sysfs.validate``), and the process
and region names in force at each step. What only the kernel can decide (an offset
outside the region, an unaligned length, a touch of unmapped memory) is left to the run.

Every problem raises ``ScenarioError``, whose text is one line naming the file, the step
number (for steps) and the key.

Two ops act on the machine rather than a system call: ``split`` (keys region, offset,
length, as munmap: split every THP mapped in the range, the kernel's debugfs
split_huge_pages) and ``reclaim`` (no keys of its own: memory pressure on all the
scenario's processes; its semantics are those of the oracle's ``memcg_reclaim``).
``[machine] swap`` is also the size of the oracle's swap device; a scenario with swap >
0 reports ``swap_kb`` per region and ``events``.

Region addresses are fixed at load time so the emulator and the oracle place every
region at the same address: a cursor starts at ``REGION_BASE``; each mmap step takes the
cursor as its address, then the cursor moves on by the size rounded up to 2 MiB plus a
2 MiB gap, so neighbouring regions never merge into one VMA.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from kmm import madvise, mmap, mprotect, sysfs
from kmm.machine import MachineConfig  # the [machine] table

REGION_BASE = 0x2000_0000_0000
PAGE_SIZE = 4096
PMD_SIZE = 2 << 20
MAX_SIZE = 1 << 57  # beyond any user address space; keeps every address within 64 bits

_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"(\d+)(KiB|MiB|GiB|TiB)?")
# Names appear in report keys as "proc/region", so no slashes or blanks.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# The one table of advice and protection names: the program API checks against the
# same (kmm.workload), the kernel's numbers beside them (kmm.madvise, kmm.mprotect).
ADVICE = tuple(sorted(madvise.ADVICE, key=("hugepage", "nohugepage", "dontneed", "collapse",
                                           "pageout", "cold", "free").index))
PROT = tuple(mprotect.PROT)
TOP_LEVEL = ("description", "machine", "thp", "khugepaged", "hugetlb", "steps")
BACKING = mmap.BACKINGS  # the mmap kinds (kmm.mmap.BACKINGS says which flags each is)
MEMFD_BACKINGS = ("memfd", "memfd_private")
# [hugetlb]: /proc/sys/vm/nr_hugepages and nr_overcommit_hugepages, set before the steps
HUGETLB_KEYS = ("nr_hugepages", "nr_overcommit_hugepages")

# The keys each op accepts besides "op" and "proc"; True marks a required key.
OP_KEYS: dict[str, dict[str, bool]] = {
    "mmap": {"region": True, "size": True, "backing": False, "noreserve": False},
    "munmap": {"region": True, "offset": False, "length": False},
    "mprotect": {"region": True, "offset": False, "length": False, "prot": True},
    "madvise": {"region": True, "advice": True, "offset": False, "length": False},
    "touch": {
        "region": True,
        "offset": False,
        "length": False,
        "write": False,
        "value": False,
        "stride": False,
    },
    "check": {"region": True, "offset": False, "length": False, "value": False, "stride": False},
    "fork": {"child": True},
    "exit": {},
    "khugepaged": {"full_scans": False},
    # split every THP mapped in a range (the kernel's debugfs split_huge_pages),
    # and memory pressure on the scenario's processes (the shrinkers; see the oracle)
    "split": {"region": True, "offset": False, "length": False},
    "reclaim": {},
    # fallocate(PUNCH_HOLE|KEEP_SIZE) and ftruncate of a memfd region's file
    # (offsets are file offsets: the region maps the file from 0)
    "punch_hole": {"region": True, "offset": False, "length": False},
    "ftruncate": {"region": True, "size": True},
    # move_pages(2) of one address per stride (node absent: only where each page is)
    # and migrate_pages(2) of the process (kmm.migrate_syscalls)
    "move_pages": {"region": True, "offset": False, "length": False, "stride": False,
                   "node": False, "move_all": False},
    "migrate_pages": {"from_nodes": True, "to_nodes": True},
    # NUMA memory policy (kmm.mempolicy): set_mempolicy(2) of the process, mbind(2) of
    # a range of a region; mode one of MPOL_MODES, nodes an array of node ids, flags an
    # array of MBIND_FLAGS
    "set_mempolicy": {"mode": True, "nodes": False},
    "mbind": {"region": True, "offset": False, "length": False, "mode": True,
              "nodes": False, "flags": False},
}
MPOL_MODES = ("default", "local", "preferred", "bind", "interleave")
MBIND_FLAGS = ("strict", "move", "move_all")
OPS = tuple(OP_KEYS)


class ScenarioError(Exception):
    """Bad scenario input. ``str(e)`` is one line: "<file>: step <n>: <key>: <message>".

    ``step`` is None for top-level tables ("<file>: [thp] enabled: <message>") and for
    TOML syntax errors ("<file>: line <L>: <message>"); ``key`` is None when no single
    key is at fault.
    """

    def __init__(
        self,
        file: str,
        step: int | None,
        key: str | None,
        message: str,
        *,
        table: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.step = step
        self.key = key
        self.table = table
        self.line = line
        self.message = " ".join(str(message).split())  # always one line
        parts = [file]
        if line is not None:
            parts.append(f"line {line}")
        if step is not None:
            parts.append(f"step {step}")
        if key is not None:
            parts.append(f"[{table}] {key}" if table else key)
        parts.append(self.message)
        super().__init__(": ".join(parts))




@dataclass(frozen=True)
class Step:
    index: int  # 1-based position in [[steps]]
    op: str  # one of OPS
    proc: str = "main"
    region: str | None = None
    size: int | None = None  # mmap
    offset: int = 0
    length: int | None = None  # None = to the end of the region
    advice: str | None = None  # one of ADVICE
    prot: str | None = None  # one of PROT
    write: bool = True
    value: int = 1
    stride: int = 4096
    child: str | None = None  # fork
    full_scans: int | None = None  # khugepaged
    addr: int | None = None  # mmap: the region's start address
    backing: str = "anon"  # mmap: one of BACKING
    noreserve: bool = False  # mmap: MAP_NORESERVE
    node: int | None = None  # move_pages: the target node (None: query only)
    move_all: bool = False  # move_pages: MPOL_MF_MOVE_ALL
    from_nodes: tuple[int, ...] = ()  # migrate_pages
    to_nodes: tuple[int, ...] = ()  # migrate_pages
    mode: str | None = None  # set_mempolicy, mbind: one of MPOL_MODES
    nodes: tuple = ()  # set_mempolicy, mbind: node ids
    flags: tuple = ()  # mbind: MBIND_FLAGS


@dataclass(frozen=True)
class Scenario:
    path: str
    description: str
    machine: MachineConfig
    knobs: dict[str, object]  # kmm.sysfs.KNOBS name -> validated value, as set by the file
    steps: tuple[Step, ...]
    hugetlb: dict[str, int] | None = None  # [hugetlb]: HUGETLB_KEYS -> value, if given

    def regions(self) -> dict[str, int]:
        """Region name -> size, in mmap order.

        A name may be mapped by more than one process (each process has its own
        namespace); the first mmap of the name gives the size here. ``Step.addr`` of each
        mmap step is the authority on where a process's region lives.
        """
        sizes: dict[str, int] = {}
        for step in self.steps:
            if step.op == "mmap":
                sizes.setdefault(step.region, step.size)  # type: ignore[arg-type]
        return sizes


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def parse_size(text_or_int: object, *, file: str, step: int | None, key: str) -> int:
    """A size in bytes: a non-negative int, or a string "<n>", "<n>KiB", "<n>MiB",
    "<n>GiB" or "<n>TiB". Anything else (floats, "4MB", negatives, bools) is an error."""
    n = _parse_size(text_or_int, file=file, step=step, key=key)
    if n > MAX_SIZE:
        raise ScenarioError(file, step, key, f"must be at most 128 PiB (the user address space), got {n}")
    return n


def _parse_size(text_or_int: object, *, file: str, step: int | None, key: str) -> int:
    v = text_or_int
    if isinstance(v, bool):
        raise ScenarioError(file, step, key, f"must be a size (bytes or \"<n>KiB|MiB|GiB|TiB\"), not {_show(v)}")
    if isinstance(v, int):
        if v < 0:
            raise ScenarioError(file, step, key, f"must not be negative, got {v}")
        return v
    if isinstance(v, str):
        m = _SIZE_RE.fullmatch(v)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2) or ""]
    raise ScenarioError(file, step, key, f"must be a size (bytes or \"<n>KiB|MiB|GiB|TiB\"), not {_show(v)}")


def _show(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\n", "\\n") + '"'
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return repr(v)


def _int(v: object, *, lo: int | None, hi: int | None, file: str, step: int | None,
         key: str, table: str | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ScenarioError(file, step, key, f"must be an integer, not {_show(v)}", table=table)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ScenarioError(file, step, key, f"must be {rng}, got {v}", table=table)
    return v


def _name(v: object, *, file: str, step: int, key: str) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise ScenarioError(
            file, step, key, f"must be a name of letters, digits, '_', '.' or '-', not {_show(v)}"
        )
    return v


def _word(v: object, words: tuple[str, ...], *, file: str, step: int, key: str) -> str:
    if not isinstance(v, str) or v not in words:
        raise ScenarioError(file, step, key, f"must be one of {', '.join(words)}, not {_show(v)}")
    return v


def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ScenarioError(path, None, None, "not valid UTF-8", line=line) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            line = int(m.group(1))
            msg = msg[: m.start()] + f" (column {m.group(2)})"
        else:
            line = text.count("\n") + 1
            msg = re.sub(r"\s*\(at end of document\)$", " (at end of document)", msg)
        raise ScenarioError(path, None, None, msg, line=line) from None


MIN_MEMORY = 16 << 20  # the emulated machine's smallest (kmm.machine.Machine)


def machine_size_error(key: str, n: int) -> str | None:
    """What is wrong with a machine's ``memory`` or ``swap`` size, if anything."""
    if key == "memory" and (n < MIN_MEMORY or n % PAGE_SIZE):
        return f"must be a multiple of 4KiB and at least 16MiB, got {n}"
    if key == "swap" and n and (n < 2 * PAGE_SIZE or n % PAGE_SIZE):
        return f"must be 0 (no swap) or a multiple of 4KiB of at least 8KiB, got {n}"
    return None


def _machine(table: object, file: str) -> MachineConfig:
    if not isinstance(table, dict):
        raise ScenarioError(file, None, "machine", f"must be a table, not {_show(table)}")
    kw: dict[str, int] = {}
    for key, v in table.items():
        if key in ("memory", "swap"):
            try:
                kw[key] = parse_size(v, file=file, step=None, key=key)
            except ScenarioError as e:
                raise ScenarioError(file, None, key, e.message, table="machine") from None
            why = machine_size_error(key, kw[key])
            if why:
                raise ScenarioError(file, None, key, why, table="machine")
        elif key == "cpus":
            kw[key] = _int(v, lo=1, hi=None, file=file, step=None, key=key, table="machine")
        elif key == "seed":
            kw[key] = _int(v, lo=0, hi=None, file=file, step=None, key=key, table="machine")
        elif key in NUMA_MACHINE_KEYS:
            kw[key] = numa_machine_value(key, v, file, "machine")
        else:
            raise ScenarioError(
                file, None, key, "unknown key (allowed: memory, swap, cpus, seed, nodes, "
                "node_memory, node_cpus)", table="machine"
            )
    numa_machine_check(kw, file, "machine")
    return MachineConfig(**kw)


# [machine] keys of a NUMA machine (kmm.mmzone): the node count, and optionally each
# node's memory (sizes, their sum the machine's memory) and CPU count
NUMA_MACHINE_KEYS = ("nodes", "node_memory", "node_cpus")


def numa_machine_value(key: str, v: object, file: str, table: str | None):
    """One of NUMA_MACHINE_KEYS, parsed: nodes an int 1..64, node_memory a list of
    sizes, node_cpus a list of CPU counts (>= 0)."""
    from kmm import mmzone
    where = dict(file=file, step=None, key=key, table=table)
    if key == "nodes":
        return _int(v, lo=1, hi=mmzone.MAX_NUMNODES, **where)
    if not isinstance(v, list) or not v:
        raise ScenarioError(file, None, key, f"must be a non-empty array, one entry per "
                            f"node, not {_show(v)}", table=table)
    if key == "node_memory":
        out = []
        for x in v:
            try:
                out.append(parse_size(x, file=file, step=None, key=key))
            except ScenarioError as e:
                raise ScenarioError(file, None, key, e.message, table=table) from None
        return tuple(out)
    return tuple(_int(x, lo=0, hi=None, **where) for x in v)


def numa_machine_check(kw: dict, file: str, table: str | None) -> None:
    """The node layout the keys describe is possible (kmm.mmzone.node_layout and
    cpu_layout); node_memory also fixes the machine's memory (given too, it must
    match). Raises ScenarioError naming the key at fault."""
    from kmm import mmzone
    nodes = kw.get("nodes", 1)
    for key in ("node_memory", "node_cpus"):
        if key in kw and len(kw[key]) != nodes:
            raise ScenarioError(file, None, key, f"has {len(kw[key])} entries, the machine "
                                f"has {nodes} nodes", table=table)
    if "node_memory" in kw:
        total = sum(kw["node_memory"])
        if "memory" in kw and kw["memory"] != total:
            raise ScenarioError(file, None, "node_memory", f"adds up to {total} bytes, "
                                f"memory is {kw['memory']}", table=table)
        kw["memory"] = total
    memory = kw.get("memory", MachineConfig.memory)
    try:
        mmzone.node_layout(memory // PAGE_SIZE, nodes, kw.get("node_memory", ()))
    except ValueError as e:
        key = "node_memory" if "node_memory" in kw else "nodes"
        raise ScenarioError(file, None, key, str(e), table=table) from None
    try:
        mmzone.cpu_layout(kw.get("cpus", MachineConfig.cpus), nodes, kw.get("node_cpus", ()))
    except ValueError as e:
        raise ScenarioError(file, None, "node_cpus", str(e), table=table) from None


def _knobs(doc: dict, file: str) -> dict[str, object]:
    knobs: dict[str, object] = {}
    for table, prefix in sysfs.TABLES.items():
        if table not in doc:
            continue
        t = doc[table]
        if not isinstance(t, dict):
            raise ScenarioError(file, None, table, f"must be a table, not {_show(t)}")
        allowed = [
            n[len(prefix):] for n in sysfs.KNOBS
            if n.startswith(prefix) and "/" not in n[len(prefix):]
        ]
        for key, v in t.items():
            if table == "thp" and key.startswith("hugepages-"):
                knobs.update(_size_knobs(key, v, file))
                continue
            if key not in allowed:
                raise ScenarioError(
                    file, None, key, f"unknown knob (allowed: {', '.join(allowed)})", table=table
                )
            if isinstance(v, (dict, list)):
                raise ScenarioError(file, None, key, f"must be a value, not {_show(v)}", table=table)
            try:
                knobs[prefix + key] = sysfs.validate(prefix + key, v)
            except sysfs.KnobError as e:
                raise ScenarioError(file, None, key, str(e), table=table) from None
    return knobs


def _size_knobs(folder: str, t: object, file: str) -> dict[str, object]:
    """[thp.hugepages-<size>kB]: the per-size knobs of one sysfs folder."""
    table = f"thp.{folder}"
    if folder not in sysfs.SIZE_DIRS:
        key = next(iter(t)) if isinstance(t, dict) and t else None
        raise ScenarioError(file, None, key, f"unknown size folder {folder} (the kernel has "
                            f"{', '.join(sysfs.SIZE_DIRS)})", table=table)
    if not isinstance(t, dict):
        raise ScenarioError(file, None, folder, f"must be a table, not {_show(t)}", table="thp")
    allowed = [n[len(folder) + 1:] for n in sysfs.KNOBS if n.startswith(folder + "/")]
    out: dict[str, object] = {}
    for key, v in t.items():
        if key not in allowed:
            raise ScenarioError(file, None, key, f"unknown knob (allowed: {', '.join(allowed)})",
                                table=table)
        name = f"{folder}/{key}"
        try:
            out[name] = sysfs.validate(name, v)
        except sysfs.KnobError as e:
            raise ScenarioError(file, None, key, str(e), table=table) from None
    return out


class _Namespace:
    """Which processes exist and which regions each knows, as the steps unfold."""

    def __init__(self) -> None:
        self.procs: dict[str, list[str]] = {"main": []}
        self.ever: set[str] = {"main"}
        self.backing: dict[tuple[str, str], str] = {}  # (proc, region) -> mmap backing


def _step(raw: object, index: int, file: str, ns: _Namespace, cursor: list[int]) -> Step:
    if not isinstance(raw, dict):
        raise ScenarioError(file, index, None, f"must be a table ([[steps]]), not {_show(raw)}")
    if "op" not in raw:
        raise ScenarioError(file, index, "op", f"required (one of {', '.join(OPS)})")
    op = raw["op"]
    if not isinstance(op, str) or op not in OP_KEYS:
        raise ScenarioError(file, index, "op", f"unknown op {_show(op)} (one of {', '.join(OPS)})")
    keys = OP_KEYS[op]
    for key in raw:
        if key not in keys and key not in ("op", "proc"):
            allowed = ", ".join(["op", "proc", *keys])
            raise ScenarioError(file, index, key, f"unknown key for {op} (allowed: {allowed})")
    for key, required in keys.items():
        if required and key not in raw:
            raise ScenarioError(file, index, key, f"required for {op}")

    kw: dict[str, object] = {"index": index, "op": op}
    proc = _name(raw.get("proc", "main"), file=file, step=index, key="proc")
    if proc not in ns.procs:
        why = "has exited" if proc in ns.ever else "does not exist"
        raise ScenarioError(file, index, "proc", f"process {proc!r} {why} at this step")
    kw["proc"] = proc
    regions = ns.procs[proc]

    if "region" in raw:
        region = _name(raw["region"], file=file, step=index, key="region")
        if op == "mmap":
            if region in regions:
                raise ScenarioError(
                    file, index, "region", f"region {region!r} is already mapped by {proc!r}"
                )
        elif region not in regions:
            raise ScenarioError(file, index, "region", f"unknown region {region!r} for {proc!r}")
        kw["region"] = region

    for key in ("size", "offset", "length", "stride"):
        if key in raw:
            kw[key] = parse_size(raw[key], file=file, step=index, key=key)
    if kw.get("stride") == 0:
        raise ScenarioError(file, index, "stride", "must be above 0")
    if "value" in raw:
        kw["value"] = _int(raw["value"], lo=0, hi=255, file=file, step=index, key="value")
    if "write" in raw:
        if not isinstance(raw["write"], bool):
            raise ScenarioError(file, index, "write", f"must be true or false, not {_show(raw['write'])}")
        kw["write"] = raw["write"]
    if "advice" in raw:
        kw["advice"] = _word(raw["advice"], ADVICE, file=file, step=index, key="advice")
    if "backing" in raw:
        kw["backing"] = _word(raw["backing"], BACKING, file=file, step=index, key="backing")
    if "noreserve" in raw:
        if not isinstance(raw["noreserve"], bool):
            raise ScenarioError(file, index, "noreserve",
                                f"must be true or false, not {_show(raw['noreserve'])}")
        kw["noreserve"] = raw["noreserve"]
    if "prot" in raw:
        kw["prot"] = _word(raw["prot"], PROT, file=file, step=index, key="prot")
    if "mode" in raw:
        kw["mode"] = _word(raw["mode"], MPOL_MODES, file=file, step=index, key="mode")
    if "nodes" in raw:
        # an id the kernel's bitmap cannot hold is the kernel's EINVAL, not an input error
        v = raw["nodes"]
        if not isinstance(v, list):
            raise ScenarioError(file, index, "nodes", f"must be an array of node ids, not "
                                f"{_show(v)}")
        kw["nodes"] = tuple(_int(n, lo=0, hi=None, file=file, step=index, key="nodes")
                            for n in v)
    if "flags" in raw:
        v = raw["flags"]
        if not isinstance(v, list):
            raise ScenarioError(file, index, "flags", f"must be an array of "
                                f"{', '.join(MBIND_FLAGS)}, not {_show(v)}")
        kw["flags"] = tuple(_word(f, MBIND_FLAGS, file=file, step=index, key="flags")
                            for f in v)
    if "backing" in raw:
        kw["backing"] = _word(raw["backing"], BACKING, file=file, step=index, key="backing")
    if op in ("punch_hole", "ftruncate"):
        if ns.backing.get((proc, kw["region"]), "anon") not in MEMFD_BACKINGS:
            raise ScenarioError(file, index, "region",
                                f"{op} needs a memfd region (backing = \"memfd\")")
    if "node" in raw:  # any int: a node that does not exist is the kernel's ENODEV
        kw["node"] = _int(raw["node"], lo=None, hi=None, file=file, step=index, key="node")
    if "move_all" in raw:
        if not isinstance(raw["move_all"], bool):
            raise ScenarioError(file, index, "move_all",
                                f"must be true or false, not {_show(raw['move_all'])}")
        kw["move_all"] = raw["move_all"]
    for key in ("from_nodes", "to_nodes"):
        if key in raw:
            v = raw[key]
            if not isinstance(v, list) or not v:
                raise ScenarioError(file, index, key,
                                    f"must be a non-empty list of node numbers, not {_show(v)}")
            kw[key] = tuple(_int(n, lo=0, hi=63, file=file, step=index, key=key) for n in v)
    if op == "khugepaged":
        kw["full_scans"] = _int(raw.get("full_scans", 1), lo=1, hi=None, file=file, step=index,
                                key="full_scans")

    if op == "mmap":
        size = kw["size"]
        assert isinstance(size, int)
        kw["addr"] = cursor[0]
        cursor[0] += round_up(size, PMD_SIZE) + PMD_SIZE
        regions.append(kw["region"])  # type: ignore[arg-type]
        ns.backing[(proc, kw["region"])] = kw.get("backing", "anon")  # type: ignore[index]
    elif op == "fork":
        child = _name(raw["child"], file=file, step=index, key="child")
        if child in ns.ever:
            raise ScenarioError(file, index, "child", f"process name {child!r} is already used")
        ns.procs[child] = list(regions)
        for r in regions:
            ns.backing[(child, r)] = ns.backing.get((proc, r), "anon")
        ns.ever.add(child)
        kw["child"] = child
    elif op == "exit":
        del ns.procs[proc]
    return Step(**kw)  # type: ignore[arg-type]


def load_scenario(path: str | os.PathLike) -> Scenario:
    """Read and validate one scenario file; raise ScenarioError on any problem."""
    file = os.fspath(path)
    doc = _load_toml(file)
    for key in doc:
        if key not in TOP_LEVEL:
            raise ScenarioError(
                file, None, key, f"unknown top-level key (allowed: {', '.join(TOP_LEVEL)})"
            )
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(file, None, "description", f"must be a string, not {_show(description)}")
    machine = _machine(doc.get("machine", {}), file)
    knobs = _knobs(doc, file)
    hugetlb = _hugetlb(doc.get("hugetlb"), file)
    raw_steps = doc.get("steps", [])
    if not isinstance(raw_steps, list):
        raise ScenarioError(file, None, "steps", "must be an array of tables ([[steps]])")
    if not raw_steps:  # an empty file runs nothing: surely not what was meant
        raise ScenarioError(file, None, "steps", "no steps: a scenario needs at least one "
                            "[[steps]] table (docs/scenario-format.md)")
    ns = _Namespace()
    cursor = [REGION_BASE]
    steps = tuple(_step(raw, i, file, ns, cursor) for i, raw in enumerate(raw_steps, start=1))
    return Scenario(path=file, description=description, machine=machine, knobs=knobs,
                    steps=steps, hugetlb=hugetlb)


def _hugetlb(table: object, file: str) -> dict[str, int] | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ScenarioError(file, None, "hugetlb", f"must be a table, not {_show(table)}")
    out = {}
    for key, v in table.items():
        if key not in HUGETLB_KEYS:
            raise ScenarioError(file, None, key,
                                f"unknown key (allowed: {', '.join(HUGETLB_KEYS)})",
                                table="hugetlb")
        out[key] = _int(v, lo=0, hi=1 << 20, file=file, step=None, key=key, table="hugetlb")
    return out


def step_range(step: Step, size: int) -> tuple[int, int]:
    """The [start, end) offsets a munmap/mprotect/madvise/touch/check step acts on, relative
    to its region's start: ``length`` None means to the end of the region (empty when
    ``offset`` is past the end)."""
    length = step.length if step.length is not None else max(size - step.offset, 0)
    return step.offset, step.offset + length
