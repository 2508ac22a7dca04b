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
           "start_daemon", "wake_up"]


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


def start_daemon(m, daemon: Daemon) -> None:
    """Run a daemon as a daemon actor of the machine (the run ends without it)."""
    ctx = DaemonContext(m, daemon.name)
    m.sched.spawn(m.sched.nursery, daemon.name, daemon.run, ctx, kind="daemon",
                  daemon=True)


ENTRY_POINT_GROUP = "kmm.daemons"


class DaemonLoadError(Exception):
    """A daemon plug-in that cannot be used; the message names it and its source."""


def load_daemons(names=None) -> list:
    """The daemon classes installed under the ``kmm.daemons`` entry-point group (the
    built-in kswapd and kcompactd come through the same door as third-party plug-ins),
    validated on load. ``names`` selects some; unknown names are an error."""
    from importlib.metadata import entry_points
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    wanted = sorted(found) if names is None else list(names)
    out = []
    for name in wanted:
        ep = found.get(name)
        if ep is None:
            raise DaemonLoadError(f"no daemon named {name!r} in entry-point group "
                                  f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(sorted(found))})")
        dist = getattr(ep.dist, "name", "?")
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in is reported, not raised through
            raise DaemonLoadError(f"daemon {name!r} ({ep.value}, from {dist}): "
                                  f"cannot load: {e}") from None
        if not isinstance(getattr(cls, "name", None), str) or not callable(getattr(cls, "run", None)):
            raise DaemonLoadError(f"daemon {name!r} ({ep.value}, from {dist}): needs a "
                                  "str `name` and an `async def run(self, ctx)`")
        out.append(cls)
    return out
