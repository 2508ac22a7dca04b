"""Modelled kernel locks: owners, FIFO wait queues, lockdep checks and lock_stat.

One lock class per kernel lock, with the kernel's name (``lockdep.ORDER``):
``mmap_lock`` (rwsem per mm), ``page_table_lock`` (per mm), ``ptlock_pmd`` and
``ptlock_pte`` (split page-table locks in the table page's struct page), ``anon_vma``
(the root's rwsem), ``folio_lock`` (PG_locked), ``split_queue_lock`` and ``zone_lock``.

Acquire and release are preemption points. A contended lock puts the actor on the lock's
FIFO queue and blocks it; release hands the lock to the first waiter (qspinlock and rwsem
hand-off). Statistics per class use the fields of /proc/lock_stat, in emulated time.

What the trace carries (``kmm locks`` rebuilds lock_stat, the order graph and the
waits from it alone). Every point writes its line *before* the operation takes effect
(the scheduler may run others in between), so an acquisition's outcome is written on
the line of the release that ends it:

- ``lock`` / ``trylock``: ``lock`` (instance), ``class`` (lockdep class), ``site``,
  ``mode`` (read/write, rwsems only);
- ``unlock``: ``lock``, ``class``, ``mode``, ``site`` (where the hold began), ``hold``
  (ns); if the acquisition waited: ``contended``, ``owners`` (the actors holding the
  lock when it was found taken), ``wait`` (ns); ``acq_bounce`` / ``con_bounce`` when
  the acquisition or contention moved the lock to another CPU; ``trylock`` (the seq of
  the trylock line) when a trylock took it.

A hold ends at its ``unlock`` line's time, and lock_stat counts an acquisition (its
contention, wait and hold) then, from the figures that line carries: a lock still held
or waited for when a run stops (a daemon cancelled at the end) is in neither.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kmm.lockdep import HeldLock, Lockdep
from kmm.cost import COST_LOCK

LOCK_STAT_FIELDS = (
    "class name", "con-bounces", "contentions", "waittime-min", "waittime-max",
    "waittime-total", "waittime-avg", "acq-bounces", "acquisitions", "holdtime-min",
    "holdtime-max", "holdtime-total", "holdtime-avg",
)



@dataclass(slots=True)
class ClassStats:
    con_bounces: int = 0
    contentions: int = 0
    wait_min: int = 0
    wait_max: int = 0
    wait_total: int = 0
    acq_bounces: int = 0
    acquisitions: int = 0
    hold_min: int = 0
    hold_max: int = 0
    hold_total: int = 0
    holds: int = 0

    def waited(self, ns: int) -> None:
        """After ``contentions`` counted this wait's contention."""
        self.wait_min = ns if self.contentions == 1 else min(self.wait_min, ns)
        self.wait_max = max(self.wait_max, ns)
        self.wait_total += ns

    def held(self, ns: int) -> None:
        self.holds += 1
        self.hold_min = ns if self.holds == 1 else min(self.hold_min, ns)
        self.hold_max = max(self.hold_max, ns)
        self.hold_total += ns

    def row(self, name: str) -> dict:
        """One /proc/lock_stat line (times in emulated microseconds, as lock_stat prints)."""
        us = lambda ns: round(ns / 1000, 2)  # noqa: E731
        return dict(zip(LOCK_STAT_FIELDS, (
            name, self.con_bounces, self.contentions, us(self.wait_min), us(self.wait_max),
            us(self.wait_total), us(self.wait_total / self.contentions) if self.contentions else 0.0,
            self.acq_bounces, self.acquisitions, us(self.hold_min), us(self.hold_max),
            us(self.hold_total), us(self.hold_total / self.holds) if self.holds else 0.0)))


class Locks:
    """The machine's lock world: scheduler, lockdep graph and per-class statistics."""

    def __init__(self, sched) -> None:
        self.sched = sched
        self.lockdep = Lockdep()
        self.stats: dict[str, ClassStats] = {}

    def stats_for(self, cls: str) -> ClassStats:
        st = self.stats.get(cls)
        if st is None:
            st = self.stats[cls] = ClassStats()
        return st

    def spinlock(self, cls: str, name: str) -> "SpinLock":
        return SpinLock(self, cls, name)

    def rwsem(self, cls: str, name: str) -> "RwSem":
        return RwSem(self, cls, name)

    def lock_stat(self) -> list[dict]:
        """/proc/lock_stat: one row per lock class with a finished acquisition."""
        return [st.row(cls) for cls, st in sorted(self.stats.items()) if st.acquisitions]


def _drop_held(actor, lock) -> int:
    held = actor.held
    for i in range(len(held) - 1, -1, -1):
        if held[i].lock is lock:
            del held[i]
            return i
    raise RuntimeError(f"{actor.name} releases {lock.name}, which it does not hold")


class _Lock:
    __slots__ = ("world", "cls", "name", "stats", "waiters", "t_acq", "last_cpu")

    def __init__(self, world: Locks, cls: str, name: str) -> None:
        self.world = world
        self.cls = cls
        self.name = name
        self.stats = world.stats_for(cls)
        self.waiters: deque = deque()
        # actor -> its hold: (t acquired, site, acq bounce, trylock seq, wait record)
        self.t_acq: dict = {}
        self.last_cpu: int | None = None

    def _fields(self, site: str | None, mode: str | None) -> dict:
        f = {"lock": self.name, "class": self.cls}
        if site is not None:
            f["site"] = site
        if mode is not None:
            f["mode"] = mode
        return f

    def _acquired(self, actor, site: str, subclass: int, read: bool, now: int,
                  waited: tuple | None = None, try_seq: int = 0) -> None:
        actor.held.append(HeldLock(self, site, subclass, read))
        bounce = self.last_cpu is not None and self.last_cpu != actor.cpu
        self.last_cpu = actor.cpu
        self.t_acq[actor] = (now, site, bounce, try_seq, waited)

    def _contended(self, actor) -> tuple[int, list[str], bool]:
        """lock_contended: the wait starts now; who holds the lock; did it bounce."""
        bounce = self.last_cpu is not None and self.last_cpu != actor.cpu
        return self.world.sched.now, self.owner_names(), bounce

    def _waited(self, t0: int, owners: list[str], bounce: bool) -> tuple:
        """lock_acquired after a wait: the wait record the hold carries to its unlock."""
        return (self.world.sched.now - t0, owners, bounce)

    def _end_hold(self, actor, t: int) -> tuple | None:
        """Account the hold that ends at ``t`` (the unlock line's time) in lock_stat.

        The whole acquisition (bounces, contention, wait, hold) is counted here, when
        its unlock line is written with the same figures: a run stopped while actors
        hold locks (daemons cancelled at the end) then gives the same table from the
        machine as from its trace."""
        rec = self.t_acq.get(actor)
        if rec is None:
            return None  # not held: the caller reports the bug after its point
        t_acq, _, bounce, _, waited = rec
        st = self.stats
        st.acquisitions += 1
        if bounce:
            st.acq_bounces += 1
        if waited is not None:
            st.contentions += 1
            if waited[2]:
                st.con_bounces += 1
            st.waited(waited[0])
        st.held(t - t_acq)
        return rec

    def _release_fields(self, rec: tuple | None, t: int, mode: str | None = None) -> dict:
        """The ``unlock`` line: the hold it ends (from its acquisition to ``t``)."""
        f = self._fields(None, mode)
        if rec is None:
            return f
        t_acq, site, bounce, try_seq, waited = rec
        f["site"] = site
        f["hold"] = t - t_acq
        if bounce:
            f["acq_bounce"] = 1
        if try_seq:
            f["trylock"] = try_seq
        if waited is not None:
            wait, owners, con_bounce = waited
            f["contended"] = True
            f["wait"] = wait
            f["owners"] = owners
            if con_bounce:
                f["con_bounce"] = 1
        return f

    def _released(self, actor) -> None:
        _drop_held(actor, self)
        del self.t_acq[actor]

    def owner_names(self) -> list[str]:
        raise NotImplementedError


class SpinLock(_Lock):
    """spinlock_t: one owner; waiters queue in arrival order (qspinlock's MCS queue)."""

    __slots__ = ("owner",)

    def __init__(self, world: Locks, cls: str, name: str) -> None:
        super().__init__(world, cls, name)
        self.owner = None

    def owner_names(self) -> list[str]:
        return [self.owner.name] if self.owner is not None else []

    async def lock(self, site: str, subclass: int = 0) -> None:
        """spin_lock / spin_lock_nested. Context: returns with the lock held."""
        sched = self.world.sched
        actor = sched.current
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "lock", self._fields(site, None))
        else:
            await sched.point("lock", COST_LOCK, **self._fields(site, None))
        self.world.lockdep.check_acquire(actor, self, site, subclass)
        waited = None
        if self.owner is not None:
            contended = self._contended(actor)
            self.waiters.append(actor)
            await sched.block(self)  # unlock hands us the lock
            waited = self._waited(*contended)
        else:
            self.owner = actor
        self._acquired(actor, site, subclass, False, sched.now, waited)

    async def trylock(self, site: str) -> bool:
        """spin_trylock: never waits, so it adds no lock-order dependency."""
        sched = self.world.sched
        actor = sched.current
        seq = sched.seq + 1
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "trylock", self._fields(site, None))
        else:
            await sched.point("trylock", COST_LOCK, **self._fields(site, None))
        if self.owner is not None:
            return False
        self.owner = actor
        self._acquired(actor, site, 0, False, sched.now, try_seq=seq)
        return True

    async def unlock(self) -> None:
        sched = self.world.sched
        actor = sched.current
        t = sched.now + COST_LOCK  # the unlock line's time: the hold ends there
        rec = self._end_hold(actor, t)
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "unlock", self._release_fields(rec, t))
        else:
            await sched.point("unlock", COST_LOCK, **self._release_fields(rec, t))
        if self.owner is not actor:
            raise RuntimeError(f"{actor.name} unlocks {self.name} owned by "
                               f"{self.owner.name if self.owner else 'no one'}")
        self._released(actor)
        if self.waiters:
            self.owner = self.waiters.popleft()
            sched.wake(self.owner)
        else:
            self.owner = None

    def is_locked(self) -> bool:
        return self.owner is not None


class RwSem(_Lock):
    """struct rw_semaphore: many readers or one writer; a queued writer stops new readers."""

    __slots__ = ("readers", "writer")

    def __init__(self, world: Locks, cls: str, name: str) -> None:
        super().__init__(world, cls, name)
        self.readers: list = []
        self.writer = None

    def owner_names(self) -> list[str]:
        if self.writer is not None:
            return [self.writer.name]
        return [a.name for a in self.readers]

    async def _down(self, site: str, write: bool, subclass: int) -> None:
        sched = self.world.sched
        actor = sched.current
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "lock",
                              self._fields(site, "write" if write else "read"))
        else:
            await sched.point("lock", COST_LOCK, **self._fields(site, "write" if write else "read"))
        self.world.lockdep.check_acquire(actor, self, site, subclass, read=not write)
        free = self.writer is None and (not self.readers if write else not self.waiters)
        waited = None
        if free:
            if write:
                self.writer = actor
            else:
                self.readers.append(actor)
        else:
            contended = self._contended(actor)
            self.waiters.append((actor, write))
            await sched.block(self)  # the releaser granted it to us
            waited = self._waited(*contended)
        self._acquired(actor, site, subclass, not write, sched.now, waited)

    async def down_read(self, site: str) -> None:
        await self._down(site, False, 0)

    async def down_write(self, site: str, subclass: int = 0) -> None:
        await self._down(site, True, subclass)

    async def down_read_trylock(self, site: str) -> bool:
        sched = self.world.sched
        actor = sched.current
        seq = sched.seq + 1
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "trylock", self._fields(site, "read"))
        else:
            await sched.point("trylock", COST_LOCK, **self._fields(site, "read"))
        if self.writer is not None or self.waiters:
            return False
        self.readers.append(actor)
        self._acquired(actor, site, 0, True, sched.now, try_seq=seq)
        return True

    async def up_read(self) -> None:
        sched = self.world.sched
        actor = sched.current
        t = sched.now + COST_LOCK
        rec = self._end_hold(actor, t)
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "unlock", self._release_fields(rec, t, "read"))
        else:
            await sched.point("unlock", COST_LOCK, **self._release_fields(rec, t, "read"))
        self.readers.remove(actor)
        self._released(actor)
        self._grant()

    async def up_write(self) -> None:
        sched = self.world.sched
        actor = sched.current
        t = sched.now + COST_LOCK
        rec = self._end_hold(actor, t)
        if sched.fast:
            sched.ticked(COST_LOCK)
        elif sched.quiet:
            sched.tick_fields(COST_LOCK, "unlock", self._release_fields(rec, t, "write"))
        else:
            await sched.point("unlock", COST_LOCK, **self._release_fields(rec, t, "write"))
        if self.writer is not actor:
            raise RuntimeError(f"{actor.name} up_write of {self.name} it does not own")
        self.writer = None
        self._released(actor)
        self._grant()

    def _grant(self) -> None:
        # rwsem_wake: a writer at the head gets the lock once it is free; readers at the
        # head are woken together, up to the first queued writer.
        sched = self.world.sched
        while self.waiters and self.writer is None:
            actor, write = self.waiters[0]
            if write:
                if self.readers:
                    return
                self.waiters.popleft()
                self.writer = actor
                sched.wake(actor)
                return
            self.waiters.popleft()
            self.readers.append(actor)
            sched.wake(actor)

    def is_locked(self) -> bool:
        return self.writer is not None or bool(self.readers)


class FolioLock(SpinLock):
    """PG_locked: a sleeping bit lock. Same queue discipline; taken with trylock by
    khugepaged and reclaim, which must never sleep on it under a spinlock.

    ``on_acquire`` (set by the machine) sees each acquisition: folio_lock and
    folio_trylock want the caller to hold a reference, so the folio must still be
    live when its lock is had."""

    __slots__ = ("on_acquire",)

    def __init__(self, world: Locks, cls: str, name: str) -> None:
        super().__init__(world, cls, name)
        self.on_acquire = None

    async def lock(self, site: str, subclass: int = 0) -> None:
        await super().lock(site, subclass)
        if self.on_acquire is not None:
            self.on_acquire(self)

    async def trylock(self, site: str) -> bool:
        got = await super().trylock(site)
        if got and self.on_acquire is not None:
            self.on_acquire(self)
        return got

    def set_locked_by(self, actor) -> None:
        """__folio_set_locked: set PG_locked on a folio no one else can reach yet (a
        new folio of a split copies the locked bit from the folio being split). Not a
        preemption point and no lockdep record: nothing can contend for it."""
        if self.owner is not None:
            raise RuntimeError(f"{self.name}: __folio_set_locked on a locked folio "
                               f"(owner {self.owner.name})")
        self.owner = actor

    def release_set_locked(self) -> None:
        """The folio_unlock matching set_locked_by, after the caller's point: the first
        waiter (migration_entry_wait_on_locked, folio_lock) gets the lock."""
        # shared-state op
        if self.waiters:
            self.owner = self.waiters.popleft()
            self.world.sched.wake(self.owner)
        else:
            self.owner = None
