"""The event trace: a cheap digest of every preemption point, JSON lines on demand.

Every point is one event: the sequence number, the emulated time, the actor and the
kernel-style event name with its fields, and nothing from the host (no wall time, no
pids, no object ids), so the same seed and inputs give the same events.

The digest (``Trace.digest``) is what proves it, and it costs no rendering: each event
is folded as a compact record of integers, ``(seq, t, actor, event, field names...,
values...)`` with every name and value replaced by its id, into a running 64-bit hash
(Python's tuple hash over ints, which is not randomized per process). Ids are given in
order of first appearance (an interning table compared by equality, never by a str's
per-process hash); the final digest is sha256 over the running hash, the event count and
the interning table, so two traces with equal digests have the same events in the same
order, whichever process computed them.

Lines are rendered (structlog's JSONRenderer, sorted keys) only when there is a sink
(``kmm run --trace FILE``): the digest is the same with or without one.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from typing import IO, Any, Iterator

import structlog


class _Ids(dict):
    """Interned values: each new key gets the next small id (a lookup of a known key
    stays in C). Keys compare by equality, so an id never depends on a str's
    per-process hash; 1 and True (equal in Python) share one."""

    def __missing__(self, key: Any) -> int:
        i = self[key] = len(self)
        return i


class Trace:
    """Folds events into the digest; writes JSON lines to ``sink`` if there is one, and
    keeps the last ``keep`` events (for a failure file) if asked."""

    BATCH = 4096

    def __init__(self, sink: IO[str] | None = None, keep: int = 0) -> None:
        self.sink = sink
        self._buf: list[tuple] = []
        self._count = 0  # events folded so far (count: with the batch)
        self._h = 0
        self._ids = _Ids()
        self._get = self._ids.__getitem__
        self.last: deque | None = deque(maxlen=keep) if keep else None
        self._render = structlog.processors.JSONRenderer(sort_keys=True)
        # nothing but the digest: a point in free mode is a tick and a fold (sched.quiet)
        self.cheap = sink is None and not keep

    def fold(self, seq: int, t: int, actor: str, event: str, fields: dict[str, Any]) -> None:
        """The digest's part of an event: kept, and folded with the others of its batch
        (a tight loop, cheaper than one call per event)."""
        buf = self._buf
        buf.append((seq, t, actor, event, fields))
        if len(buf) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        """Fold the batch: one tuple hash per event over its compact record (the ids
        of the actor, the event, each field name and each value)."""
        buf = self._buf
        if not buf:
            return
        self._buf = []
        g = self._get
        h = self._h
        for seq, t, actor, event, fields in buf:
            try:
                h = hash((h, seq, t, g(actor), g(event), *map(g, fields),
                          *map(g, fields.values())))
            except TypeError:  # an unhashable value (a list that crossed the wire)
                vals = [tuple(v) if v.__class__ is list else v for v in fields.values()]
                h = hash((h, seq, t, g(actor), g(event), *map(g, fields), *map(g, vals)))
        self._h = h
        self._count += len(buf)

    @property
    def count(self) -> int:
        """Events so far."""
        return self._count + len(self._buf)

    def emit(self, seq: int, t: int, actor: str, event: str, fields: dict[str, Any]) -> None:
        buf = self._buf
        buf.append((seq, t, actor, event, fields))
        if len(buf) >= self.BATCH:
            self._flush()
        if self.cheap:
            return
        if self.last is not None:
            self.last.append((seq, t, actor, event, fields))
        if self.sink is not None:
            line = self._render(None, "msg", {"seq": seq, "t": t, "actor": actor,
                                              "event": event, **fields})
            self.sink.write(line)
            self.sink.write("\n")

    def digest(self) -> str:
        """Hex digest of every event so far: equal digests mean identical traces (and
        byte-identical trace files)."""
        self._flush()
        h = hashlib.sha256(f"kmm-trace/2 {self._count} {self._h}\n".encode())
        h.update(repr(list(self._ids)).encode())
        return h.hexdigest()

    def tail(self) -> list[dict[str, Any]]:
        """The last ``keep`` events, as the trace file would hold them."""
        return [{"seq": s, "t": t, "actor": a, "event": e, **f}
                for s, t, a, e, f in (self.last or ())]


def read_trace(path: str) -> Iterator[dict[str, Any]]:
    """The events of a trace file, in order."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
