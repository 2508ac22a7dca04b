"""``kmm locks RUN.jsonl``: the lock study of one run, from its trace alone.

Three views, each what a kernel developer reads for a real lock problem:

- **lock_stat**: one row per lock class with /proc/lock_stat's fields
  (Documentation/locking/lockstat.rst), times in emulated microseconds; it equals the
  machine's own ``Locks.lock_stat()`` for the run that wrote the trace;
- **the lock-order graph**: class -> class edges as lockdep builds them (a ``lock``
  while holding locks of other classes; a trylock never waits, so it adds no edge of its
  own, but what it holds does), with the sites of the first occurrence and a count; a
  pair seen in both orders, or an edge against mm/rmap.c's order, is flagged;
- **waits**: which actor waited for a lock of which class held by which actor, how often
  and for how long.

The trace fields this reads are described in kmm/locking.py: an acquisition's outcome
(contended or not, its owners, its wait, its hold) is on the ``unlock`` line that ends it,
because a point's line is written before the operation takes effect.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from kmm.lockdep import RANK
from kmm.locking import LOCK_STAT_FIELDS, ClassStats

LOCK_EVENTS = ("lock", "trylock", "unlock")
_REQUIRED = (("seq", int), ("t", int), ("actor", str), ("event", str))


class TraceError(Exception):
    """The file is not a kmm trace this reader understands: ``FILE:LINE: why``."""


def read_events(path: str) -> Iterator[dict[str, Any]]:
    """The events of a trace file, validated line by line."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        n = got = 0
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                got += 1
                yield _parse(path, n, line)
        except UnicodeDecodeError:
            raise TraceError(f"{path}:{n + 1}: not a kmm trace (not UTF-8 text)") from None
        if not got:
            raise TraceError(f"{path}: empty file, not a kmm trace")


def _parse(path: str, n: int, line: str) -> dict[str, Any]:
    try:
        ev = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{n}: not a kmm trace (not a JSON line: {e.msg})") from None
    if not isinstance(ev, dict):
        raise TraceError(f"{path}:{n}: not a kmm trace (a JSON line must be an object)")
    for key, typ in _REQUIRED:
        if not isinstance(ev.get(key), typ) or isinstance(ev.get(key), bool):
            raise TraceError(f"{path}:{n}: not a kmm trace event (no {typ.__name__} "
                             f"field {key!r}; a trace line has seq, t, actor and event)")
    if ev["event"] in LOCK_EVENTS:
        if not isinstance(ev.get("lock"), str):
            raise TraceError(f"{path}:{n}: {ev['event']} event without a 'lock' name")
        if not isinstance(ev.get("class"), str):
            raise TraceError(f"{path}:{n}: {ev['event']} event without a lock 'class' "
                             "(a trace from an older kmm: run the program again)")
    return ev


@dataclass
class Edge:
    outer: str
    inner: str
    count: int = 0
    outer_site: str = ""
    inner_site: str = ""
    actor: str = ""
    seq: int = 0


@dataclass
class LockStudy:
    """What one trace says about its locks."""

    stats: dict[str, ClassStats] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    # (waiter, class, owner) -> [count, total wait ns, max wait ns]
    waits: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    events: int = 0
    lock_events: int = 0
    open_at_end: int = 0  # lock requests with no unlock: held or waiting when it stopped

    def lock_stat(self) -> list[dict]:
        """/proc/lock_stat rows, as ``Locks.lock_stat()`` gives them."""
        return [st.row(cls) for cls, st in sorted(self.stats.items()) if st.acquisitions]

    def graph(self) -> list[Edge]:
        return [self.edges[k] for k in sorted(self.edges)]

    def both_orders(self) -> list[tuple[str, str]]:
        """Class pairs taken in both orders somewhere in the run (a possible ABBA)."""
        return sorted((a, b) for a, b in self.edges if a < b and (b, a) in self.edges)

    def against_order(self) -> list[tuple[str, str]]:
        """Edges that take an outer class of mm/rmap.c's order inside an inner one."""
        return sorted((a, b) for a, b in self.edges
                      if a in RANK and b in RANK and RANK[b] < RANK[a])

    def wait_rows(self) -> list[dict]:
        us = lambda ns: round(ns / 1000, 2)  # noqa: E731
        return [{"waiter": w, "class": c, "owner": o, "count": n,
                 "wait-total": us(tot), "wait-max": us(mx)}
                for (w, c, o), (n, tot, mx) in sorted(self.waits.items())]

    def to_json(self) -> dict:
        against = set(self.against_order())
        return {
            "lock_stat": self.lock_stat(),
            "order": [{"outer": e.outer, "inner": e.inner, "count": e.count,
                       "first": {"outer_site": e.outer_site, "inner_site": e.inner_site,
                                 "actor": e.actor, "seq": e.seq},
                       "both_orders": (e.inner, e.outer) in self.edges,
                       "against_rmap_order": (e.outer, e.inner) in against}
                      for e in self.graph()],
            "waits": self.wait_rows(),
            "events": self.events, "lock_events": self.lock_events,
            "open_at_end": self.open_at_end,
        }


def study(events: list[dict[str, Any]]) -> LockStudy:
    """Build the lock study of a run from its events, in trace order."""
    s = LockStudy(events=len(events))
    # a trylock holds a lock only if it succeeded: its unlock line names its seq
    took = {ev["trylock"] for ev in events
            if ev["event"] == "unlock" and isinstance(ev.get("trylock"), int)}
    # actor -> its held locks, as lockdep's held stack: (lock, class, site)
    held: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for ev in events:
        kind = ev["event"]
        if kind not in LOCK_EVENTS:
            continue
        s.lock_events += 1
        actor, name, cls = ev["actor"], ev["lock"], ev["class"]
        stack = held[actor]
        if kind == "lock":
            _add_edges(s, ev, stack)
            stack.append((name, cls, ev.get("site", "")))
        elif kind == "trylock":
            if ev["seq"] in took:
                stack.append((name, cls, ev.get("site", "")))
        else:
            for i in range(len(stack) - 1, -1, -1):
                if stack[i][0] == name:
                    del stack[i]
                    break
            if "hold" in ev:
                _account(s, ev, actor, cls)
    s.open_at_end = sum(len(v) for v in held.values())
    return s


def _add_edges(s: LockStudy, ev: dict, stack: list[tuple[str, str, str]]) -> None:
    # lockdep's check_acquire: one dependency per held class (its first held lock)
    cls = ev["class"]
    seen: set[str] = set()
    for _, hcls, hsite in stack:
        if hcls == cls or hcls in seen:
            continue
        seen.add(hcls)
        e = s.edges.get((hcls, cls))
        if e is None:
            e = s.edges[(hcls, cls)] = Edge(hcls, cls, 0, hsite, ev.get("site", ""),
                                            ev["actor"], ev["seq"])
        e.count += 1


def _account(s: LockStudy, ev: dict, actor: str, cls: str) -> None:
    st = s.stats.get(cls)
    if st is None:
        st = s.stats[cls] = ClassStats()
    st.acquisitions += 1
    st.acq_bounces += 1 if ev.get("acq_bounce") else 0
    if ev.get("contended"):
        wait = ev.get("wait", 0)
        st.contentions += 1
        st.con_bounces += 1 if ev.get("con_bounce") else 0
        st.waited(wait)
        for owner in ev.get("owners") or ["(unknown)"]:
            row = s.waits.setdefault((actor, cls, owner), [0, 0, 0])
            row[0] += 1
            row[1] += wait
            row[2] = max(row[2], wait)
    st.held(ev["hold"])


def study_file(path: str) -> LockStudy:
    return study(list(read_events(path)))


# ------------------------------------------------------------------------ output
_SHORT = {"class name": "class", "con-bounces": "con-bnc", "contentions": "contend",
          "waittime-min": "wait-min", "waittime-max": "wait-max",
          "waittime-total": "wait-total", "waittime-avg": "wait-avg",
          "acq-bounces": "acq-bnc", "acquisitions": "acquire", "holdtime-min": "hold-min",
          "holdtime-max": "hold-max", "holdtime-total": "hold-total",
          "holdtime-avg": "hold-avg"}


def format_study(s: LockStudy, path: str) -> str:
    out = [f"{path}: {s.events} events, {s.lock_events} lock operations"]
    rows = s.lock_stat()
    out.append("\nlock_stat (/proc/lock_stat fields, emulated us)")
    cols = LOCK_STAT_FIELDS[1:]
    out.append(f"  {'class name':<18}" + "".join(f"{_SHORT[c]:>11}" for c in cols))
    for r in rows:
        out.append(f"  {r['class name']:<18}" + "".join(f"{r[c]:>11}" for c in cols))
    if not rows:
        out.append("  (no lock was taken)")
    if s.open_at_end:
        out.append(f"  ({s.open_at_end} lock requests still held or waiting at the end of "
                   "the trace are not counted)")

    out.append("\nlock-order graph (outer -> inner: count; sites of the first time seen)")
    against = set(s.against_order())
    for e in s.graph():
        flags = ""
        if (e.inner, e.outer) in s.edges:
            flags += "  !! BOTH ORDERS"
        if (e.outer, e.inner) in against:
            flags += "  !! against mm/rmap.c order"
        out.append(f"  {e.outer + ' -> ' + e.inner:<36} {e.count:>6}   "
                   f"{e.outer_site} -> {e.inner_site} ({e.actor}, seq {e.seq}){flags}")
    if not s.edges:
        out.append("  (no lock was taken while another class was held)")
    for a, b in s.both_orders():
        out.append(f"  possible ABBA: {a} and {b} were taken in both orders")

    out.append("\nwho waited on whom (waiter, lock class, owner: times, wait total/max us)")
    for r in s.wait_rows():
        out.append(f"  {r['waiter']:<14} {r['class']:<18} {r['owner']:<14} {r['count']:>6}"
                   f" {r['wait-total']:>12} {r['wait-max']:>10}")
    if not s.waits:
        out.append("  (no acquisition had to wait)")
    return "\n".join(out)


__all__ = ["TraceError", "LockStudy", "read_events", "study", "study_file", "format_study"]
