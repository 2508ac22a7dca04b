"""The knobs of /sys/kernel/mm/transparent_hugepage/, with the kernel's validation.

mm/huge_memory.c (enabled, defrag, use_zero_page, shrink_underused) and mm/khugepaged.c
(the khugepaged/ directory). The check for each knob lives here once and serves sysfs
writes, scenario TOML and daemon knobs alike: a value the kernel's store handler would
refuse with -EINVAL is refused here with ``KnobError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

HPAGE_PMD_NR = 512
UINT_MAX = 2**32 - 1

THP_DIR = "/sys/kernel/mm/transparent_hugepage"
ENABLED = ("always", "madvise", "never")
# hugepages-<size>kB/enabled and shmem_enabled (thpsize_enabled_store,
# thpsize_shmem_enabled_store): "inherit" follows the global knob.
MTHP_ENABLED = ("always", "inherit", "madvise", "never")
MTHP_SHMEM_ENABLED = ("always", "inherit", "within_size", "advise", "never")
HPAGE_PMD_ORDER = 9
# THP_ORDERS_ALL_ANON: orders 2..PMD_ORDER (order 1 cannot be an anonymous THP: a
# folio needs its second tail page for the deferred list); THP_ORDERS_ALL_FILE_DEFAULT
# starts at order 1, so hugepages-8kB has shmem_enabled only (as on the host).
ANON_ORDERS = tuple(range(2, HPAGE_PMD_ORDER + 1))
SHMEM_ORDERS = tuple(range(1, HPAGE_PMD_ORDER + 1))


def size_dir(order: int) -> str:
    """The sysfs folder of one THP order: hugepages-<size>kB."""
    return f"hugepages-{4 << order}kB"


SIZE_DIRS = {size_dir(o): o for o in SHMEM_ORDERS}
DEFRAG = ("always", "defer", "defer+madvise", "madvise", "never")
# shmem_enabled (shmem_enabled_store, mm/shmem.c): the huge= policy of the internal shm
# mount (MAP_SHARED|MAP_ANONYMOUS, memfd); deny and force are the emergency overrides
SHMEM_ENABLED = ("always", "within_size", "advise", "never", "deny", "force")


class KnobError(ValueError):
    """A value the knob's store handler refuses (-EINVAL)."""


def _choice(*words: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        # sysfs_streq: the written word, ignoring one trailing newline
        if isinstance(value, str) and value.rstrip("\n") in words:
            return value.rstrip("\n")
        raise KnobError(f"must be one of {', '.join(words)}")

    return check


def _ulong(value: object) -> int:
    # kstrtoul(buf, 10, ...): a decimal integer; TOML ints and their decimal strings.
    if isinstance(value, bool):
        raise KnobError("must be an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.rstrip("\n").isdigit():
        n = int(value.rstrip("\n"))
    else:
        raise KnobError("must be a non-negative integer")
    if n < 0:
        raise KnobError("must be a non-negative integer")
    return n


def _flag(value: object) -> int:
    # single_hugepage_flag_store: kstrtoul, then "value > 1" is -EINVAL
    n = _ulong(value)
    if n > 1:
        raise KnobError("must be 0 or 1")
    return n


def _bool(value: object) -> int:
    # split_underused_thp_store uses kstrtobool: 1/0, y/n, on/off (first letters decide)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "y", "yes", "on", "true"):
            return 1
        if v in ("0", "n", "no", "off", "false"):
            return 0
    raise KnobError("must be a boolean (0/1, y/n, on/off)")


def _max_ptes(value: object) -> int:
    # max_ptes_{none,swap,shared}_store: "err || max > HPAGE_PMD_NR - 1" is -EINVAL
    n = _ulong(value)
    if n > HPAGE_PMD_NR - 1:
        raise KnobError(f"must be in 0..{HPAGE_PMD_NR - 1}")
    return n


def _pages_to_scan(value: object) -> int:
    # pages_to_scan_store: kstrtouint, "err || !pages" is -EINVAL
    n = _ulong(value)
    if n == 0 or n > UINT_MAX:
        raise KnobError(f"must be in 1..{UINT_MAX}")
    return n


def _msecs(value: object) -> int:
    # scan_sleep_millisecs_store / alloc_sleep_millisecs_store: kstrtouint
    n = _ulong(value)
    if n > UINT_MAX:
        raise KnobError(f"must be in 0..{UINT_MAX}")
    return n


@dataclass(frozen=True, slots=True)
class Knob:
    name: str  # path below THP_DIR
    default: object
    check: Callable[[object], object]
    words: tuple[str, ...] = ()  # the choices a show handler lists, for word knobs


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("enabled", "madvise", _choice(*ENABLED), ENABLED),
        Knob("defrag", "madvise", _choice(*DEFRAG), DEFRAG),
        Knob("use_zero_page", 1, _flag),
        Knob("shrink_underused", 1, _bool),
        Knob("shmem_enabled", "never", _choice(*SHMEM_ENABLED), SHMEM_ENABLED),
        Knob("khugepaged/max_ptes_none", HPAGE_PMD_NR - 1, _max_ptes),
        Knob("khugepaged/max_ptes_swap", HPAGE_PMD_NR // 8, _max_ptes),
        Knob("khugepaged/max_ptes_shared", HPAGE_PMD_NR // 2, _max_ptes),
        Knob("khugepaged/pages_to_scan", HPAGE_PMD_NR * 8, _pages_to_scan),
        Knob("khugepaged/scan_sleep_millisecs", 10000, _msecs),
        Knob("khugepaged/alloc_sleep_millisecs", 60000, _msecs),
        Knob("khugepaged/defrag", 1, _flag),
    )
}
# Per-size knobs: PMD size "inherit" (so the global knob decides, as before mTHP), every
# smaller size "never" (the kernel's defaults without a thp_anon= boot parameter).
for _o in ANON_ORDERS:
    _n = size_dir(_o) + "/enabled"
    KNOBS[_n] = Knob(_n, "inherit" if _o == HPAGE_PMD_ORDER else "never",
                     _choice(*MTHP_ENABLED), MTHP_ENABLED)
for _o in SHMEM_ORDERS:
    _n = size_dir(_o) + "/shmem_enabled"
    KNOBS[_n] = Knob(_n, "inherit" if _o == HPAGE_PMD_ORDER else "never",
                     _choice(*MTHP_SHMEM_ENABLED), MTHP_SHMEM_ENABLED)

# The scenario tables map onto these directories (design.md section 4).
TABLES = {"thp": "", "khugepaged": "khugepaged/"}


def validate(name: str, value: object) -> object:
    """Check one knob write as the kernel's store handler would; return the stored value.

    Raises KeyError for an unknown knob and KnobError for a refused value.
    """
    knob = KNOBS[name]
    return knob.check(value)


class Sysfs:
    """The machine's knob values. Writes are validated; reads give the stored value.

    Mechanism modules add what the kernel's attributes do besides storing: read-only
    files (``readonly``: name -> show, e.g. khugepaged/full_scans) and side effects of a
    store (``on_store``: e.g. a write to scan_sleep_millisecs wakes khugepaged)."""

    def __init__(self) -> None:
        self._values: dict[str, object] = {n: k.default for n, k in KNOBS.items()}
        self.readonly: dict[str, Callable[[], object]] = {}
        self._store_hooks: dict[str, list[Callable[[object], None]]] = {}
        self._anon_orders()

    def on_store(self, name: str, hook: Callable[[object], None]) -> None:
        """Call ``hook(value)`` after each accepted write to the knob ``name``."""
        self._store_hooks.setdefault(name, []).append(hook)

    def __getitem__(self, name: str) -> object:
        show = self.readonly.get(name)
        if show is not None:
            return show()
        return self._values[name]

    def write(self, name: str, value: object) -> None:
        if name in self.readonly:
            raise KnobError("read-only")
        self._values[name] = validate(name, value)
        if name.endswith("/enabled"):
            self._anon_orders()
        for hook in self._store_hooks.get(name, ()):
            hook(self._values[name])

    def items(self):
        return self._values.items()

    def _anon_orders(self) -> None:
        # huge_anon_orders_{always,madvise,inherit}: one bit per order, set by each
        # size's store handler (each size is in exactly one of the three, or none)
        masks = {"always": 0, "madvise": 0, "inherit": 0, "never": 0}
        for o in ANON_ORDERS:
            masks[self._values[size_dir(o) + "/enabled"]] |= 1 << o  # type: ignore[index]
        self.anon_orders_always = masks["always"]
        self.anon_orders_madvise = masks["madvise"]
        self.anon_orders_inherit = masks["inherit"]

    # The fault path reads these on every fault; plain attributes keep that cheap.
    @property
    def enabled(self) -> str:
        return self._values["enabled"]  # type: ignore[return-value]

    @property
    def defrag(self) -> str:
        return self._values["defrag"]  # type: ignore[return-value]

    @property
    def use_zero_page(self) -> bool:
        return bool(self._values["use_zero_page"])

    def khugepaged(self, name: str) -> int:
        return self._values["khugepaged/" + name]  # type: ignore[return-value]
