"""The public daemon API: what a policy daemon (kswapd, kcompactd, khugepaged, a user's
plug-in) may see and do.

A daemon is a class with ``name`` and an ``async def run(self, ctx)``; ``ctx`` is a
``DaemonContext``. The mechanism it drives (reclaim a node, compact a zone, scan a PMD)
lives in kmm's kernel modules; the daemon chooses when and how much, sleeping in
emulated time and waking on the kernel's waitqueues (``kswapd_wait``, ...), as the
kernel's kthreads do. Daemons import only this module and the standard library.

Waitqueues: mechanism code calls ``wake_up(m, name)`` (e.g. the page allocator's
``wakeup_kswapd``); a daemon waits with ``ctx.wait(name, timeout_ns)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

__all__ = ["Daemon", "DaemonContext", "DaemonLoadError", "ZoneState", "load_daemons",
           "load_daemon_spec", "describe_daemons", "start_daemon", "wake_up"]


class Daemon(Protocol):
    name: ClassVar[str]

    async def run(self, ctx: "DaemonContext") -> None: ...


@dataclass(frozen=True, slots=True)
class ZoneState:
    """The zone as a reclaim policy sees it: free pages and the three watermarks."""

    free: int
    min: int
    low: int
    high: int
    managed: int


def wake_up(m, queue: str) -> bool:
    """wake_up: wake every daemon waiting on the named waitqueue. True if one was."""
    woken = False
    for actor in m.waitqueues.pop(queue, []):
        if m.sched.interrupt_sleep(actor):
            woken = True
        elif actor.state == "blocked" and actor.blocked_on == ("waitqueue", queue):
            m.sched.wake(actor)
            woken = True
    return woken


class DaemonContext:
    """One daemon's handle on the machine (in-process; the same calls go over the wire
    when a daemon runs in its own process)."""

    def __init__(self, m, name: str) -> None:
        self._m = m
        self.name = name

    @property
    def now(self) -> int:
        """Emulated time, in ns."""
        return self._m.sched.now

    async def sleep(self, ns: int) -> None:
        """Sleep in emulated time (schedule_timeout)."""
        await self._m.sched.sleep(ns)

    async def wait(self, queue: str, timeout_ns: int | None = None) -> bool:
        """wait_event(_timeout) on a named waitqueue: True if woken, False on timeout."""
        m = self._m
        me = m.sched.current
        m.waitqueues.setdefault(queue, []).append(me)
        if timeout_ns is None:
            await m.sched.block(("waitqueue", queue))
            return True
        await m.sched.sleep(timeout_ns)
        waiters = m.waitqueues.get(queue, [])
        if me in waiters:  # timed out: leave the queue
            waiters.remove(me)
            return False
        return True

    def knob(self, name: str):
        """A sysfs knob's current value (/sys/kernel/mm/transparent_hugepage/...)."""
        return self._m.sysfs[name]

    def zone(self) -> ZoneState:
        z = self._m.zone
        return ZoneState(z.nr_free, z.wmark["min"], z.wmark["low"], z.wmark["high"],
                         z.managed)

    # --- reclaim (mm/vmscan.c), for kswapd
    def kswapd_order(self) -> int:
        """READ_ONCE(pgdat->kswapd_order): the highest order wakeup_kswapd asked for."""
        from kmm import vmscan
        return vmscan.NODE_DATA(self._m).kswapd_order

    def set_kswapd_order(self, order: int) -> None:
        """WRITE_ONCE(pgdat->kswapd_order, order)."""
        from kmm import vmscan
        vmscan.NODE_DATA(self._m).kswapd_order = order

    def prepare_kswapd_sleep(self, order: int) -> bool:
        """prepare_kswapd_sleep: may kswapd sleep? The zone is balanced for ``order``
        (free pages above the high watermark), or the node is hopeless (reclaim failed
        MAX_RECLAIM_RETRIES times in a row)."""
        from kmm import vmscan
        return vmscan.prepare_kswapd_sleep(self._m, order)

    async def balance_pgdat(self, order: int) -> int:
        """balance_pgdat: reclaim, at falling priority, until the zone is balanced for
        ``order``; returns the order reclaim finished at (0 when a high-order goal was
        dropped for fragmentation)."""
        from kmm import vmscan
        return await vmscan.balance_pgdat(self._m, order)

    def count_vm_event(self, item: str) -> None:
        """count_vm_event for the daemon's own events (kswapd_low_wmark_hit_quickly,
        kswapd_high_wmark_hit_quickly)."""
        self._m.vmstat.count_vm_event(item)

    def kcompactd_work_requested(self) -> bool:
        """kcompactd_work_requested: an allocation asked kcompactd for an order
        (wakeup_kcompactd); the request stands until kcompactd_do_work serves it."""
        from kmm import compaction
        return compaction.kcompactd_work_requested(self._m)

    async def kcompactd_do_work(self) -> str:
        """kcompactd_do_work: compact the zone (MIGRATE_SYNC_LIGHT) until a free block
        of the requested order exists or the scanners meet, unless compaction is
        deferred or cannot help. Returns the enum compact_result name."""
        from kmm import compaction
        return (await compaction.kcompactd_do_work(self._m)).name

    def wakeup_kcompactd(self, order: int) -> None:
        """wakeup_kcompactd: ask kcompactd for a free block of ``order`` (kswapd does
        before it sleeps: reclaim freed pages, compaction makes them a block)."""
        from kmm import compaction
        compaction.wakeup_kcompactd(self._m, order)

    # -- khugepaged (mm/khugepaged.c): the mm_slot list, its cursor and the scan
    def hugepage_pmd_enabled(self) -> bool:
        """hugepage_pmd_enabled: PMD THPs may be made; khugepaged runs only then."""
        from kmm import khugepaged
        return khugepaged.hugepage_pmd_enabled(self._m)

    def khugepaged_has_work(self) -> bool:
        """khugepaged_has_work: some mm is registered and THPs are enabled."""
        from kmm import khugepaged
        return khugepaged.khugepaged_has_work(self._m)

    def khugepaged_scan_at_head(self) -> bool:
        """The scan cursor is NULL: the next mm scanned is the list's first, and a pass
        over the list is complete (khugepaged_do_scan counts these)."""
        return self._m.khugepaged_scan.mm_slot is None

    async def khugepaged_scan_mm_slot(self, pages: int) -> tuple[int, str]:
        """khugepaged_scan_mm_slot: scan the cursor's mm for up to ``pages`` of
        progress (each PMD is HPAGE_PMD_NR, each passed-over VMA 1), collapsing what
        may collapse with khugepaged's limits. Returns (progress, the last SCAN_*
        result's name); finishing the last mm counts a full scan."""
        from kmm import khugepaged
        cc = khugepaged.CollapseControl(is_khugepaged=True)
        progress, result = await khugepaged.khugepaged_scan_mm_slot(self._m, pages, cc)
        return progress, result.name

    @property
    def khugepaged_sleep_expire(self) -> int:
        """khugepaged_sleep_expire (emulated ns): a scan_sleep_millisecs or
        alloc_sleep_millisecs write resets it to 0 and wakes khugepaged_wait."""
        return self._m.khugepaged_scan.sleep_expire

    @khugepaged_sleep_expire.setter
    def khugepaged_sleep_expire(self, ns: int) -> None:
        self._m.khugepaged_scan.sleep_expire = ns


def start_daemon(m, daemon: Daemon) -> None:
    """Run a daemon as a daemon actor of the machine (the run ends without it)."""
    ctx = DaemonContext(m, daemon.name)
    m.sched.spawn(m.sched.nursery, daemon.name, daemon.run, ctx, kind="daemon",
                  daemon=True)


ENTRY_POINT_GROUP = "kmm.daemons"


class DaemonLoadError(Exception):
    """A daemon plug-in that cannot be used; the message names it and its source."""


def _validated(cls, label: str):
    """The checks every plug-in passes on load, whichever door it came through."""
    if not isinstance(getattr(cls, "name", None), str) or not callable(getattr(cls, "run", None)):
        raise DaemonLoadError(f"daemon {label}: needs a str `name` and an "
                              "`async def run(self, ctx)`")
    return cls


def load_daemons(names=None) -> list:
    """The daemon classes installed under the ``kmm.daemons`` entry-point group (the
    built-in kswapd, kcompactd and khugepaged come through the same door as
    third-party plug-ins), validated on load. ``names`` selects some; unknown names are
    an error."""
    from importlib.metadata import entry_points
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    wanted = sorted(found) if names is None else list(names)
    out = []
    for name in wanted:
        ep = found.get(name)
        if ep is None:
            raise DaemonLoadError(f"no daemon named {name!r} in entry-point group "
                                  f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(sorted(found))})")
        label = f"{name!r} ({ep.value}, from {getattr(ep.dist, 'name', '?')})"
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in is reported, not raised through
            raise DaemonLoadError(f"daemon {label}: cannot load: {e}") from None
        out.append(_validated(cls, label))
    return out


def load_daemon_spec(spec: str):
    """A daemon class named ``module:Class`` (``kmm run --daemon``), validated as an
    entry-point plug-in is."""
    import importlib
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DaemonLoadError(f"daemon {spec!r}: expected module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise DaemonLoadError(f"daemon {spec!r}: cannot load: {e}") from None
    return _validated(cls, repr(spec))


def describe_daemons() -> list[dict]:
    """What ``kmm daemons`` lists: each installed daemon's name, where it comes from
    and its knobs with their defaults."""
    from dataclasses import fields, is_dataclass
    from importlib.metadata import entry_points
    rows = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        row = {"name": ep.name, "class": ep.value,
               "distribution": getattr(ep.dist, "name", "?"), "knobs": {}}
        try:
            cls = _validated(ep.load(), repr(ep.name))
            knobs = getattr(cls, "Knobs", None)
            if knobs is not None and is_dataclass(knobs):
                row["knobs"] = {f.name: f.default for f in fields(knobs)}
        except Exception as e:
            row["error"] = str(e)
        rows.append(row)
    return rows
