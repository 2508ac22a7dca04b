"""The event trace: one canonical JSON line per preemption point.

Lines are rendered by structlog's JSONRenderer with sorted keys; they hold the sequence
number, the emulated time, the actor and the kernel-style event name with its fields,
and nothing from the host (no wall time, no pids, no object ids), so the same seed and
inputs give a byte-identical trace.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any, Iterator

import structlog


class Trace:
    """Writes events to a text stream (or only hashes them when ``sink`` is None)."""

    def __init__(self, sink: IO[str] | None = None) -> None:
        self.sink = sink
        self.count = 0
        self._hash = hashlib.sha256()
        self._render = structlog.processors.JSONRenderer(sort_keys=True)

    def emit(self, seq: int, t: int, actor: str, event: str, fields: dict[str, Any]) -> None:
        line = self._render(None, "msg", {"seq": seq, "t": t, "actor": actor,
                                          "event": event, **fields})
        self.count += 1
        self._hash.update(line.encode())
        if self.sink is not None:
            self.sink.write(line)
            self.sink.write("\n")

    def digest(self) -> str:
        """sha256 of every line so far: equal digests mean byte-identical traces."""
        return self._hash.hexdigest()


def read_trace(path: str) -> Iterator[dict[str, Any]]:
    """The events of a trace file, in order."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
