"""The event trace: a cheap digest of every preemption point, JSON lines on demand.

Every point is one event: the sequence number, the emulated time, the actor and the
kernel-style event name with its fields, and nothing from the host (no wall time, no
pids, no object ids), so the same seed and inputs give the same events.

The digest (``Trace.digest``) is what proves it, and it costs no rendering: events are
kept in batches and each batch is serialized by pickle in its *fast* mode (no memo, so
the bytes depend on the values alone, never on which objects happen to be shared: a
str by its characters, an int by its value, a field dict in its insertion order) and
fed to a running sha256. All of that runs in C: about a quarter of a microsecond per
event, against a microsecond or more for an interned tuple hash per event (a Python
call per value never seen before). No str's per-process hash is ever used, so two
processes give the same digest for the same events. A field value pickle cannot write
(an object of a class it cannot reach) is written as its ``repr``, as the JSON line
would show it.

Lines are rendered (structlog's JSONRenderer, sorted keys) only when there is a sink
(``kmm run --trace FILE``): the digest is the same with or without one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import deque
from typing import IO, Any, Iterator

import structlog


class Trace:
    """Folds events into the digest; writes JSON lines to ``sink`` if there is one, and
    keeps the last ``keep`` events (for a failure file) if asked."""

    BATCH = 256  # small enough that a batch is still in the cache when it is pickled

    def __init__(self, sink: IO[str] | None = None, keep: int = 0) -> None:
        self.sink = sink
        self._buf: list[tuple] = []
        self._count = 0  # events folded so far (count: with the batch)
        self._sha = hashlib.sha256(b"kmm-trace/3\n")
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
        """Fold the batch: its events pickled in fast mode (values only, no memo) into
        the running sha256. The batch list itself is kept (the scheduler's tick
        appends to it directly)."""
        buf = self._buf
        if not buf:
            return
        out = io.BytesIO()
        p = pickle.Pickler(out, 5)
        p.fast = True  # no memo: equal values give equal bytes, shared or not
        try:
            p.dump(buf)
        except Exception:  # noqa: BLE001 - a value pickle cannot write: its repr
            out = io.BytesIO()
            p = pickle.Pickler(out, 5)
            p.fast = True
            p.dump([(seq, t, actor, event, {k: _plain(v) for k, v in fields.items()})
                    for seq, t, actor, event, fields in buf])
        self._sha.update(out.getbuffer())
        self._count += len(buf)
        buf.clear()

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
        h = self._sha.copy()
        h.update(f"{self._count}\n".encode())
        return h.hexdigest()

    def tail(self) -> list[dict[str, Any]]:
        """The last ``keep`` events, as the trace file would hold them."""
        return [{"seq": s, "t": t, "actor": a, "event": e, **f}
                for s, t, a, e, f in (self.last or ())]


_PLAIN = (int, float, str, bool, type(None))


def _plain(v: Any) -> Any:
    """A field value as pickle writes it by value: plain data as it is, containers
    element by element, anything else as its repr (what the JSON line shows)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return repr(v)


def read_trace(path: str) -> Iterator[dict[str, Any]]:
    """The events of a trace file, in order."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
