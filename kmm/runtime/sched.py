"""The deterministic scheduler: it alone decides which actor runs between two points.

Actors are trio tasks, but trio's run queue decides nothing: every actor except the one
the scheduler calls *current* is parked in ``wait_task_rescheduled``, so exactly one actor
is runnable between two points. Choices come from the scheduler's own
``random.Random(seed)``; emulated time is the scheduler's clock, advanced by the cost of
each operation, with sleepers woken in ``(time, seq)`` order (SimPy's total order). No
wall clock reaches a trace.

Preemption points (``await sched.point(event, ...)``): every operation on shared machine
state is one, and each emits one trace event:

=====================  ============================================================
event                  operation
=====================  ============================================================
``lock`` ``unlock``    modelled lock acquire/release (spinlock, rwsem, folio lock)
``pgd/pud/pmd/pte``    page-table entry read (``*_read``), write (``set_*``), cmpxchg
``page_ref``           refcount change; ``mapcount``: mapcount/entire mapcount change
``alloc_pages``        allocator request/reply (a message to the page_alloc actor)
``tlb_flush``          local flush; ``ipi``: shootdown of another CPU's entries
``load`` ``store``     a user access to a frame through the TLB
``fault``              entry to the fault handler, and the kernel's named steps
=====================  ============================================================

Modes: ``free`` runs the current actor until it blocks (the fast path: a point is a
counter bump), ``random`` picks uniformly among runnable actors at every point, ``replay``
follows a recorded decision list, and two systematic-testing modes:

- ``pct`` (probabilistic concurrency testing, Burckhardt et al., ASPLOS 2010): every
  actor gets a random priority above ``depth`` when it is created; ``depth - 1`` change
  points are drawn uniformly from [1, n], n being the expected number of points of the
  run (the explorer measures it with a first run); at every point the highest-priority
  runnable actor runs, and at the i-th change point the running actor's priority drops
  to i. Guarantee: for a program with k actors and n points, a bug of depth d (one that
  needs d ordering constraints between points to show) is hit with probability at least
  1/(n * k^(d-1)) per run, so depth 1 is a strict-priority schedule and each extra
  change point buys one more forced ordering.
- ``preempt`` (CHESS-style preemption bounding, Musuvathi and Qadeer, PLDI 2007):
  non-preemptive by default (the current actor runs on while it is runnable; when it
  blocks, the lowest-id runnable actor runs), with either an explicit ``preemptions``
  map (choice position -> actor name) or a seeded plan of at most ``bound`` preemptions
  drawn among the first ``n`` opportunities. A preemption is a switch away from an actor
  that could have continued; the explorer runs bound 0, then 1, 2, ..., so the schedules
  with the fewest preempting switches come first.

Every choice among two or more runnable actors is appended to ``decisions``, so any run
replays exactly in ``replay`` mode; ``overrides`` keeps the choices that differ from the
non-preemptive default, keyed by their position in the current actor's own execution
(``"name:steps:stops"``: its points passed and times it stopped running, as CHESS keys a
preemption by thread and step, so removing one choice does not move the others), which
replayed in ``preempt`` mode give the same run again; ``preemptions`` counts the
preempting switches taken.

Spinning (``yield_spin``): an actor that waits by re-reading something (a program's
busy-wait, a kernel retry loop: migration_entry_wait's refault, a failed trylock that
backs off and retries) calls ``sched.yield_spin(site)`` once per retry; an actor that
passes ``SPIN_REPEAT`` identical points in a row (the same event with the same fields:
a load of one address) is taken to spin too. As the PCT paper's implementation does
for a thread that yields, ``pct`` then drops its priority below every other actor's
(so the actor it waits for progresses; without this a strict-priority schedule spins
forever once its change points are spent), and ``preempt`` switches to another runnable
actor at its next point without counting a preemption (CHESS's fair treatment of
yield). ``random`` and ``replay`` need nothing: their choices already give every
runnable actor its turn, and their schedules stay as they were.

Bounded schedules (``max_points``): a run that passes more points than that in a mode
that may switch is a livelock (``Livelock``, a SchedError): the scheduler records the
next ``LIVELOCK_WINDOW`` events and reports, per actor, the cycle of events it repeats.

Aimed schedules (``focus``, a predicate on (event, fields), see ``focus_matcher``):
only the points it accepts count as PCT's points (change points fall only there) and as
``preempt``'s opportunities, and ``random`` chooses only there (elsewhere the current
actor runs on), so a fixed budget of schedules is spent on the chosen window.
"""

from __future__ import annotations

import heapq
import random
import sys
from bisect import insort
from collections import deque
from typing import Any, Awaitable, Callable

import trio

from kmm.runtime.trace import Trace

FREE, RANDOM, PCT, PREEMPT, REPLAY = "free", "random", "pct", "preempt", "replay"
MODES = (FREE, RANDOM, PCT, PREEMPT, REPLAY)

RUNNABLE, BLOCKED, SLEEPING, IDLE, DONE = "runnable", "blocked", "sleeping", "idle", "done"


class SchedError(Exception):
    """The run cannot go on: a deadlock, or a replay that diverged."""


class Deadlock(SchedError):
    """No actor can run and some wait: the wait-for graph is in the message."""


class Livelock(SchedError):
    """The run passed its bound of points: the actors' repeating cycles are in the
    message."""


BATCH = Trace.BATCH   # events the digest folds at a time (kmm/runtime/trace.py)
SPIN_REPEAT = 4          # identical consecutive points of one actor that mean a spin
LIVELOCK_WINDOW = 400    # events recorded past the bound to find the cycles
# the fields that say what an event touched (a spin repeats them all)
_WHAT = ("site", "lock", "addr", "pt", "i", "pfn", "mode")


def focus_matcher(specs: list[str]) -> Callable[[str, dict], bool] | None:
    """A predicate on (event, fields) from ``--focus`` terms: ``lock:NAME`` matches the
    lock, trylock and unlock points of a lock whose name or class starts with NAME
    (``lock:ptl_pmd``); ``fn:NAME`` matches every point reached from inside the kernel
    function NAME (a frame of the await chain); a bare NAME matches an event of that
    name, a point whose ``site`` is NAME, or a point inside the function NAME."""
    if not specs:
        return None
    locks, fns, words = [], set(), set()
    for spec in specs:
        kind, _, name = spec.partition(":")
        if not name:
            words.add(spec)
        elif kind == "lock":
            locks.append(name)
        elif kind == "fn":
            fns.add(name)
        else:
            raise ValueError(f"focus {spec!r}: use EVENT, SITE, lock:NAME or fn:NAME")
    fns_or_words = fns | words
    locks_t = tuple(locks)

    def on_stack() -> bool:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_name in fns_or_words:
                return True
            f = f.f_back
        return False

    def match(event: str, fields: dict) -> bool:
        if words and (event in words or fields.get("site") in words):
            return True
        if locks_t and event in ("lock", "trylock", "unlock"):
            if (str(fields.get("lock", "")).startswith(locks_t)
                    or str(fields.get("class", "")).startswith(locks_t)):
                return True
        return bool(fns_or_words) and on_stack()

    return match


class Actor:
    """One actor: a CPU thread, the page allocator, a daemon, a driver.

    ``handle`` (for server actors) processes one message at a time; ``call`` runs it on
    the caller's trio task (a deterministic hand-off) while the trace attributes every
    point inside it to this actor.
    """

    __slots__ = (
        "name", "id", "kind", "state", "task", "go", "blocked_on", "daemon", "cpu",
        "held", "busy", "queue", "handle", "last_op", "prio", "steps", "stops",
        "yielded", "spin_ev", "spin_n",
    )

    def __init__(self, name: str, id: int, kind: str, daemon: bool = False,
                 cpu: int | None = None) -> None:
        self.name = name
        self.id = id
        self.kind = kind
        self.state = RUNNABLE
        self.task: trio.lowlevel.Task | None = None
        self.go = False
        self.blocked_on: object = None
        self.daemon = daemon
        self.cpu = cpu
        self.held: list = []  # lockdep's held-lock stack
        self.busy = False
        self.queue: deque[Actor] = deque()
        self.handle: Callable[[Any], Awaitable[Any]] | None = None
        self.last_op = ""
        self.prio = 0  # pct: the actor's priority (higher runs first)
        self.steps = 0  # points passed (modes that may switch): a choice's position
        self.stops = 0  # times it stopped running (blocked, slept, finished)
        self.yielded = False  # it spins: preempt switches away at its next point
        self.spin_ev: tuple | None = None  # its last point's (event, what it touched)
        self.spin_n = 0  # how many times in a row it passed that same point

    def __lt__(self, other: "Actor") -> bool:  # runnable list order
        return self.id < other.id

    def __repr__(self) -> str:
        return f"<actor {self.name} {self.state}>"


def _cycle(evs: list) -> list:
    """The shortest period p such that the second half of ``evs`` repeats with period
    p: one period of it (the whole list if none)."""
    half = len(evs) // 2
    tail = evs[half:]
    for p in range(1, max(half, 1)):
        if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
            return tail[-p:]
    return evs


def _by_priority(a: Actor) -> tuple[int, int]:
    return (a.prio, -a.id)


def _abort(_raise_cancel):  # parked actors may be cancelled when a run stops
    return trio.lowlevel.Abort.SUCCEEDED


class Scheduler:
    """Owns order and time for one machine."""

    def __init__(self, mode: str = FREE, seed: int = 0,
                 replay: list[str] | None = None, trace=None, **params: Any) -> None:
        self.trace = trace
        self.actors: list[Actor] = []
        self.current: Actor | None = None
        self.now = 0  # emulated nanoseconds
        self.seq = 0
        self.switches = 0
        self._runnable: list[Actor] = []
        self._sleepers: list[tuple[int, int, Actor]] = []
        self._finished: trio.Event | None = None
        self._on_point: Callable[[], None] | None = None
        self.configure(mode, seed, replay, **params)

    def configure(self, mode: str, seed: int = 0, replay: list[str] | None = None, *,
                  depth: int = 1, n: int = 0, preemptions: dict[str, str] | None = None,
                  bound: int = 0, plan: set[int] | None = None, max_points: int = 0,
                  focus: Callable[[str, dict], bool] | None = None) -> None:
        """Choose the mode and its parameters before the run starts.

        ``depth`` and ``n`` are PCT's bug depth and expected number of points;
        ``preemptions`` (choice position -> actor name), ``plan`` (the opportunity
        ordinals at which to preempt to a seeded-random other actor) or ``bound`` (that
        many ordinals drawn from the first ``n`` opportunities) drive ``preempt``.
        ``max_points`` (0: none) bounds the run; ``focus`` aims the choices (module
        docstring)."""
        if mode not in MODES:
            raise ValueError(f"scheduler mode must be one of {', '.join(MODES)}")
        if depth < 1 or n < 0 or bound < 0:
            raise ValueError("depth must be at least 1, n and bound at least 0")
        self.mode = MODES[MODES.index(mode)]  # the constant itself: compared with `is`
        self.seed = seed
        self.rng = random.Random(seed)
        self.replay = list(replay or ())
        self._replay_pos = 0
        self.decisions: list[str] = []
        self.overrides: dict[str, str] = {}
        self.preemptions = 0
        self.points = 0          # points seen in a mode that may switch (pct's clock)
        self.opportunities = 0   # choices at which the current actor could have run on
        self.depth = depth
        self.n = n
        self.change_points: dict[int, int] | None = None
        self.max_points = max_points
        self.focus = focus
        self.focus_points = 0    # points the focus accepted
        self._low = 0            # pct: the next priority of an actor that spins
        self._capture: list | None = None  # events past max_points (the livelock)
        for a in self.actors:
            a.yielded, a.spin_ev, a.spin_n = False, None, 0
        self._forced: dict[str, str] = {}
        self._plan: set[int] = set()
        if self.mode == PCT:
            for a in self.actors:
                a.prio = self._new_priority()
            if depth > 1 and n > 0:
                # change point i (1-based) at a point drawn uniformly from [1, n]; two
                # drawn at the same point keep the later (lower) one
                self.change_points = {}
                for i in range(1, depth):
                    self.change_points[self.rng.randint(1, n)] = i
        elif self.mode == PREEMPT:
            self._forced = dict(preemptions or {})
            if plan is not None:
                self._plan = set(plan)
            elif not preemptions and bound and n:
                self._plan = set(self.rng.sample(range(n), min(bound, n)))
        self._set_fast()

    def _new_priority(self) -> int:
        # above every change-point value (1 .. depth-1); ties broken by actor id
        return self.depth + 1 + self.rng.randrange(1 << 30)

    # A point at which nothing can switch and nothing is traced (free mode, no trace,
    # no hook) is only a clock tick: ``fast`` lets hot paths skip the coroutine
    # (kmm.atomic.ticked). ``quiet``: nothing can switch and nothing is rendered (free
    # mode, no hook, at most the digest): a point is a tick and the digest's fold,
    # which ``tick(cost, event, **fields)`` makes without a coroutine either.
    def _set_fast(self) -> None:
        tr = self._trace
        self._fold = tr._buf if tr is not None and hasattr(tr, "_buf") else None
        self.quiet = self.mode is FREE and self._on_point is None and (
            tr is None or tr.cheap)
        self.fast = self.quiet and tr is None

    @property
    def trace(self):
        """The event trace (kmm.runtime.trace.Trace), or None: no digest at all."""
        return self._trace

    @trace.setter
    def trace(self, trace) -> None:
        self._trace = trace
        self._fold = None
        if hasattr(self, "mode"):
            self._set_fast()

    @property
    def on_point(self) -> Callable[[], None] | None:
        """A hook run at every point (the invariant checker, for explore)."""
        return self._on_point

    @on_point.setter
    def on_point(self, hook: Callable[[], None] | None) -> None:
        self._on_point = hook
        self._set_fast()

    def tick(self, cost: int, event: str, **fields: Any) -> None:
        """The whole of a point when ``quiet``: the same sequence, time and digest as
        ``await point(event, cost, **fields)``."""
        self.tick_fields(cost, event, fields)

    def tick_fields(self, cost: int, event: str, fields: dict) -> None:
        """``tick`` with the fields as a dict already built (a lock's)."""
        self.seq = seq = self.seq + 1
        self.now = now = self.now + cost
        buf = self._fold  # Trace.fold, inline: the batch the digest is folded from
        if buf is not None:
            buf.append((seq, now, self.current.name, event, fields))
            if len(buf) >= BATCH:
                self._trace._flush()
        if self._sleepers and self._sleepers[0][0] <= now:
            self._wake_sleepers()

    def advance(self, cost: int) -> None:
        """Emulated time passes with no event (a user access that hits the TLB in free
        mode: no kernel entry, and no other actor can run at it, so it is neither a
        point nor a trace line; docs/points.md). Sleepers due by then wake, as at a
        point, so the next choice sees the same runnable actors."""
        self.now = now = self.now + cost
        if self._sleepers and self._sleepers[0][0] <= now:
            self._wake_sleepers()

    def ticked(self, cost: int) -> bool:
        """The fast path of a point, decided once for every caller (kmm.atomic.ticked):
        when ``fast``, the point is the clock tick, done here without a further call,
        and True is returned; otherwise False and the caller awaits ``point``."""
        if self.fast:
            self.seq += 1
            self.now += cost
            if self._sleepers and self._sleepers[0][0] <= self.now:
                self._wake_sleepers()
            return True
        return False

    def step(self, event: str, cost: int = 1, **fields: Any) -> None:
        """A recorded, non-preemptive point: the same sequence number, clock, trace
        line and hook as ``point``, but no scheduling choice (for operations no other
        actor can tell the order of: kmm.atomic.step, docs/points.md)."""
        self.seq += 1
        self.now += cost
        cur = self.current
        cur.last_op = event
        if self.trace is not None:
            self.trace.emit(self.seq, self.now, cur.name, event, fields)
        if self._sleepers and self._sleepers[0][0] <= self.now:
            self._wake_sleepers()
        if self._on_point is not None:
            self._on_point()

    # ------------------------------------------------------------------ points
    async def point(self, event: str, cost: int = 1, **fields: Any) -> None:
        """One preemption point: record the event, then let the scheduler choose."""
        self.seq += 1
        self.now += cost
        cur = self.current
        cur.last_op = event
        if self._trace is not None:
            self._trace.emit(self.seq, self.now, cur.name, event, fields)
        if self._sleepers and self._sleepers[0][0] <= self.now:
            self._wake_sleepers()
        if self._on_point is not None:
            self._on_point()
        if self.mode is FREE:
            return
        self.points += 1
        cur.steps += 1
        if self.max_points and self.points > self.max_points:
            self._over_bound(cur, event, fields)
        # a spin: the same point again and again (every mode that may switch, so a
        # replay in preempt mode sees the defaults the recorded run saw)
        g = fields.get  # _WHAT, spelled out (a generator per point cost more)
        what = (event, g("site"), g("lock"), g("addr"), g("pt"), g("i"), g("pfn"),
                g("mode"))
        if what == cur.spin_ev:
            cur.spin_n += 1
            if cur.spin_n >= SPIN_REPEAT:
                cur.spin_n = 0
                self.yield_spin(event)
        else:
            cur.spin_ev, cur.spin_n = what, 1
        if self.focus is None:
            hit, clock = True, self.points
        elif self.focus(event, fields):
            self.focus_points += 1
            hit, clock = True, self.focus_points
        else:
            hit, clock = False, 0
        if clock and self.change_points and clock in self.change_points:
            cur.prio = self.change_points[clock]
        if len(self._runnable) < 2:
            cur.yielded = False  # no one to yield to
            return
        # pct always runs the highest priority (the focus only places its change
        # points); random and preempt choose only at the points the focus accepts
        nxt = self._choose(aimed=hit or self.mode is PCT)
        if nxt is not cur:
            await self._switch(cur, nxt)

    def yield_spin(self, site: str = "") -> None:
        """The current actor is about to retry (a busy-wait or a kernel retry loop, at
        ``site``): ``pct`` drops its priority below every actor's, ``preempt`` switches
        away at its next point (module docstring). Not a point: nothing is traced."""
        cur = self.current
        if cur is None or self.mode is FREE:
            return
        # the default choice moves on in every mode (so the overrides a pct or random
        # run records replay in preempt mode); pct's priority drop decides its choices
        cur.yielded = True
        if self.mode is PCT:
            self._low -= 1
            cur.prio = self._low

    def _over_bound(self, cur: Actor, event: str, fields: dict) -> None:
        if self._capture is None:
            self._capture = []
        self._capture.append((cur.name, event, tuple(
            f"{k}={fields[k]:#x}" if k in ("addr", "pt", "pfn") and isinstance(fields[k], int)
            else f"{k}={fields[k]}" for k in _WHAT if k in fields)))
        if len(self._capture) >= LIVELOCK_WINDOW:
            raise Livelock(self.livelock_report())

    def livelock_report(self) -> str:
        """"schedule exceeded N points", then each actor's shortest repeating cycle of
        events in the window recorded past the bound."""
        lines = [f"livelock: schedule exceeded {self.max_points} points; each actor's "
                 f"repeating cycle of events over the next {len(self._capture)}:"]
        per: dict[str, list] = {}
        for name, ev, what in self._capture:
            per.setdefault(name, []).append((ev, what))
        for name, evs in per.items():
            cyc = _cycle(evs)
            held = next((", ".join(h.lock.name for h in a.held) or "nothing"
                         for a in self.actors if a.name == name), "?")
            lines.append(f"  {name} ({len(evs)} events, holds {held}): cycle of "
                         f"{len(cyc)}" + ("" if len(cyc) < len(evs) // 2 else " (no repeat)"))
            for ev, what in cyc[:12]:
                lines.append(f"    {ev} {' '.join(what)}".rstrip())
        return "\n".join(lines)

    def _choose(self, aimed: bool = True) -> Actor:
        run = self._runnable
        cur = self.current
        can_run_on = cur.state == RUNNABLE
        default = cur if can_run_on else run[0]
        if can_run_on and cur.yielded:
            cur.yielded = False  # a spinning actor lets the next one run (no preemption)
            default = run[0] if run[0] is not cur else run[1]
            can_run_on = False
        mode = self.mode
        if can_run_on and aimed:
            self.opportunities += 1
        if mode is RANDOM and aimed:
            # random.Random.randrange(n)'s own draw (_randbelow_with_getrandbits),
            # inline: the same stream of choices, two calls cheaper
            n = len(run)
            getrandbits = self.rng.getrandbits
            k = n.bit_length()
            r = getrandbits(k)
            while r >= n:
                r = getrandbits(k)
            nxt = run[r]
            if nxt is not default:
                self._override(cur, nxt, can_run_on)
            self.decisions.append(nxt.name)
            return nxt
        # where the choice is, in the current actor's own execution (CHESS's (thread,
        # step)): stable when other actors' schedules change, which ddmin relies on
        idx = f"{cur.name}:{cur.steps}:{cur.stops}"
        if not aimed and not self._forced:
            nxt = default
        elif mode == PREEMPT:
            nxt = default
            want = self._forced.get(idx)
            if want is not None:
                for a in run:
                    if a.name == want:
                        nxt = a
                        break
            elif can_run_on and self.opportunities - 1 in self._plan:
                others = [a for a in run if a is not cur]
                nxt = others[self.rng.randrange(len(others))]
        elif mode == PCT:
            nxt = max(run, key=_by_priority)
        elif mode == REPLAY:
            if self._replay_pos >= len(self.replay):
                nxt = run[0] if self.current not in run else self.current
            else:
                name = self.replay[self._replay_pos]
                self._replay_pos += 1
                for nxt in run:
                    if nxt.name == name:
                        break
                else:
                    raise SchedError(
                        f"replay diverged at decision {self._replay_pos}: {name} is not "
                        f"runnable (runnable: {', '.join(a.name for a in run)})")
        else:
            nxt = run[0]
        if nxt is not default:
            self._override(cur, nxt, can_run_on, idx)
        self.decisions.append(nxt.name)
        return nxt

    def _override(self, cur: Actor, nxt: Actor, can_run_on: bool, idx: str = "") -> None:
        """A choice that differs from the non-preemptive default, kept by its
        position in the current actor's own execution."""
        self.overrides[idx or f"{cur.name}:{cur.steps}:{cur.stops}"] = nxt.name
        if can_run_on:
            self.preemptions += 1

    # --------------------------------------------------------------- switching
    async def _switch(self, cur: Actor, nxt: Actor) -> None:
        self.current = nxt
        self.switches += 1
        self._resume(nxt)
        await trio.lowlevel.wait_task_rescheduled(_abort)

    @staticmethod
    def _resume(actor: Actor) -> None:
        if actor.task is None:
            actor.go = True  # not started yet: it runs on as soon as trio starts it
        else:
            trio.lowlevel.reschedule(actor.task)

    def _next(self) -> Actor | None:
        """The actor to run after the current one stopped being runnable."""
        while True:
            if self._runnable:
                if self.mode is FREE or len(self._runnable) == 1:
                    return self._runnable[0]
                return self._choose()
            if not self._sleepers:
                return None
            wake_at, _, actor = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake_at)
            self._make_runnable(actor)

    def _wake_sleepers(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, actor = heapq.heappop(self._sleepers)
            self._make_runnable(actor)

    def _make_runnable(self, actor: Actor) -> None:
        actor.state = RUNNABLE
        actor.blocked_on = None
        insort(self._runnable, actor)

    def _stop_running(self, actor: Actor, state: str, on: object = None) -> None:
        actor.stops += 1
        actor.state = state
        actor.blocked_on = on
        self._runnable.remove(actor)

    async def _give_up_cpu(self, cur: Actor) -> None:
        cur.yielded = False
        nxt = self._next()
        if nxt is None:
            self._no_one_runnable()
            return
        if nxt is cur:
            return
        await self._switch(cur, nxt)

    def _no_one_runnable(self) -> None:
        waiting = [a for a in self.actors if a.state == BLOCKED]
        if any(not a.daemon for a in waiting):
            raise Deadlock(self.wait_for_report(waiting))
        if self._finished is not None:
            self._finished.set()

    def wait_for_report(self, waiting: list[Actor]) -> str:
        lines = ["deadlock: no actor can run"]
        for a in waiting:
            on = a.blocked_on
            owners = getattr(on, "owner_names", lambda: [])()
            held = ", ".join(h.lock.name for h in a.held) or "nothing"
            lines.append(f"  {a.name} waits for {getattr(on, 'name', on)}"
                         f" (held by {', '.join(owners) or 'no one'}); holds {held}")
        return "\n".join(lines)

    # ------------------------------------------------------- blocking, waking
    async def block(self, on: object) -> None:
        """The current actor waits until someone calls ``wake`` on it."""
        cur = self.current
        self._stop_running(cur, BLOCKED, on)
        await self._give_up_cpu(cur)

    def wake(self, actor: Actor) -> None:
        """Make a blocked actor runnable again (it runs when the scheduler picks it)."""
        if actor.state != BLOCKED:
            raise SchedError(f"wake of {actor.name}, which is {actor.state}")
        self._make_runnable(actor)

    async def sleep(self, ns: int) -> None:
        """Sleep in emulated time."""
        cur = self.current
        self._stop_running(cur, SLEEPING)
        heapq.heappush(self._sleepers, (self.now + ns, self.seq, cur))
        self.seq += 1
        await self._give_up_cpu(cur)

    def interrupt_sleep(self, actor: Actor) -> bool:
        """End a sleep early (wake_up on a waitqueue an actor sleeps on with a
        timeout). False if the actor is not sleeping."""
        if actor.state != SLEEPING:
            return False
        for i, entry in enumerate(self._sleepers):
            if entry[2] is actor:
                self._sleepers.pop(i)
                heapq.heapify(self._sleepers)
                break
        self._make_runnable(actor)
        return True

    # ------------------------------------------------------------ server actors
    def server(self, name: str, handle: Callable[[Any], Awaitable[Any]],
               kind: str = "server") -> Actor:
        """An actor that handles one message at a time (the page allocator)."""
        actor = Actor(name, len(self.actors), kind, daemon=True)
        if self.mode == PCT:
            actor.prio = self._new_priority()
        actor.state = IDLE
        actor.handle = handle
        self.actors.append(actor)
        return actor

    async def call(self, server: Actor, msg: Any) -> Any:
        """Send ``msg`` to a server actor and wait for its reply.

        The caller blocks; the server's handler runs on the caller's trio task with
        ``current`` set to the server, so its points are the server's and another actor
        may be scheduled between them. A second caller queues until the first is served.
        """
        caller = self.current
        while server.busy:
            server.queue.append(caller)
            await self.block(server)
        server.busy = True
        server.task = caller.task
        self._stop_running(caller, BLOCKED, server)
        self._make_runnable(server)
        self.current = server
        try:
            return await server.handle(msg)
        finally:
            server.busy = False
            self._stop_running(server, IDLE)
            if server.queue:
                self.wake(server.queue.popleft())
            self._make_runnable(caller)
            self.current = caller

    # --------------------------------------------------------------- lifecycle
    def spawn(self, nursery: trio.Nursery, name: str,
              fn: Callable[..., Awaitable[Any]], *args: Any, kind: str = "cpu",
              daemon: bool = False, cpu: int | None = None) -> Actor:
        """Create an actor running ``fn(*args)``; it runs when the scheduler picks it."""
        actor = Actor(name, len(self.actors), kind, daemon=daemon, cpu=cpu)
        if self.mode == PCT:
            actor.prio = self._new_priority()
        self.actors.append(actor)
        self._make_runnable(actor)
        nursery.start_soon(self._actor_main, actor, fn, args, name=name)
        return actor

    async def spawn_and_join(self, actors: list[tuple[str, Callable[[], Awaitable[Any]],
                                                      int | None]]) -> list:
        """Run each (name, fn, cpu) as its own actor and wait until all have returned;
        their return values, in order. The caller blocks meanwhile (a deterministic join)."""
        me = self.current
        results: list = [None] * len(actors)
        left = [len(actors)]

        def body(i, fn):
            async def run() -> None:
                results[i] = await fn()
                left[0] -= 1
                if not left[0]:
                    self.wake(me)
            return run

        for i, (name, fn, cpu) in enumerate(actors):
            self.spawn(self.nursery, name, body(i, fn), cpu=cpu)
        if left[0]:
            await self.block("join")
        return results

    async def _actor_main(self, actor: Actor, fn, args) -> None:
        actor.task = trio.lowlevel.current_task()
        if not actor.go:
            await trio.lowlevel.wait_task_rescheduled(_abort)
        try:
            await fn(*args)
        finally:
            if actor.state == RUNNABLE:
                self._stop_running(actor, DONE)
            actor.state = DONE
        if all(a.state == DONE or a.daemon for a in self.actors):
            self._finished.set()  # the daemons left are cancelled by run()
            return
        nxt = self._next()
        if nxt is None:
            self._no_one_runnable()
        else:
            self.current = nxt
            self.switches += 1
            self._resume(nxt)

    async def run(self, main: Callable[..., Awaitable[Any]], *args: Any,
                  name: str = "main", cpu: int | None = 0) -> None:
        """Run ``main`` as the first actor until every non-daemon actor is done.

        Daemon actors still running then are cancelled.
        """
        self._finished = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            first = self.spawn(nursery, name, main, *args, cpu=cpu)
            self.current = first
            first.go = True
            await self._finished.wait()
            nursery.cancel_scope.cancel()
