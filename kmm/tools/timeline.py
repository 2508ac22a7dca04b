"""``kmm timeline TRACE.jsonl -o FILE``: a kmm trace as a trace Perfetto's UI opens.

The output is the Chrome JSON trace-event format (the "JSON Array/Object Format" that
Perfetto's UI, trace_processor and chrome://tracing all read): one process per actor
(each CPU, the program's driver, khugepaged, kswapd, kcompactd, user daemons, the page
allocator), named by metadata events; in each, a thread for the actor's kernel functions
(nested complete events, "X") and one per lock class it took (its holds and waits), and
flow events from each wait to the holds it waited for. A "memory" process carries the
counter tracks ("C"). Times are emulated: 1 ns of emulated time is 1 ns on the timeline.
docs/timeline.md gives the whole mapping; timeline_model.py reads the trace.

The file is a pure function of the trace (sorted keys, events in a fixed order), so the
same trace gives the same bytes.
"""

from __future__ import annotations

import json
import re
from typing import IO, Iterable

from kmm.tools import timeline_model as tm
from kmm.tools.timeline_model import Run, Slice

_DAEMONS = ("khugepaged", "kswapd", "kcompactd")


def actor_order(name: str) -> tuple:
    """CPUs first (by number), then the program's driver, the kernel daemons, user
    daemons, and the page allocator last."""
    m = re.match(r"cpu(\d+)", name)
    if m:
        return (0, int(m.group(1)), name)
    if name == "main":
        return (1, 0, name)
    if name in _DAEMONS:
        return (2, _DAEMONS.index(name), name)
    if name == "page_alloc":
        return (4, 0, name)
    return (3, 0, name)


def pack(slices: list[Slice]) -> None:
    """Give each slice a lane of its (actor, track) so that on every lane the slices
    nest (Perfetto draws a thread's slices as a stack): a slice goes on the first lane
    whose open slice contains it. Lock holds taken hand over hand overlap without
    nesting; the second goes one lane down."""
    groups: dict[tuple[str, str], list[Slice]] = {}
    for s in slices:
        groups.setdefault((s.actor, s.track), []).append(s)
    for group in groups.values():
        group.sort(key=lambda s: (s.start, -s.end, s.name))
        lanes: list[list[int]] = []
        for s in group:
            for i, stack in enumerate(lanes):
                while stack and stack[-1] <= s.start and not (stack[-1] == s.start
                                                              and s.end == s.start):
                    stack.pop()
                if not stack or stack[-1] >= s.end:
                    stack.append(s.end)
                    s.lane = i
                    break
            else:
                lanes.append([s.end])
                s.lane = len(lanes) - 1


def _us(ns: int) -> float:
    """The trace-event format's microseconds for ``ns``. Perfetto truncates ``ts * 1000``
    to an integer: half a nanosecond more lands it on ``ns`` exactly (a rounded value,
    243 ns as 0.243, may truncate to 242 and break a slice's nesting)."""
    return (ns + 0.5) / 1000


def to_chrome(run: Run, *, title: str = "") -> dict:
    """The trace-event JSON object of a Run."""
    pack(run.slices)
    actors = sorted(run.actors, key=actor_order)
    pid = {a: i + 1 for i, a in enumerate(actors)}
    mem_pid = len(actors) + 1
    meta: list[dict] = []
    body: list[dict] = []
    tids: dict[tuple[str, str, int], int] = {}

    def M(name: str, p: int, args: dict, tid: int = 0) -> None:
        meta.append({"ph": "M", "name": name, "pid": p, "tid": tid, "args": args})

    for a in actors:
        M("process_name", pid[a], {"name": a})
        M("process_sort_index", pid[a], {"sort_index": pid[a]})
    M("process_name", mem_pid, {"name": "memory"})
    M("process_sort_index", mem_pid, {"sort_index": mem_pid})
    # threads: the functions thread of every actor (marks go there), then lock classes
    keys = {(s.actor, s.track, s.lane) for s in run.slices}
    keys |= {(a, "", 0) for a in actors}
    for a, track, lane in sorted(keys, key=lambda k: (actor_order(k[0]), k[1], k[2])):
        tid = tids[(a, track, lane)] = len(tids) + 1
        name = (track or a) + (f" #{lane + 1}" if lane else "")
        M("thread_name", pid[a], {"name": name}, tid)
        M("thread_sort_index", pid[a], {"sort_index": tid}, tid)
    order = sorted(run.slices, key=lambda s: (s.start, -s.end, actor_order(s.actor),
                                             s.track, s.lane, s.name))
    for s in order:
        body.append({"ph": "X", "name": s.name, "cat": s.track or "function",
                     "pid": pid[s.actor], "tid": tids[(s.actor, s.track, s.lane)],
                     "ts": _us(s.start), "dur": _us(s.end - s.start),
                     "args": s.args})
    for t, a, name, args in run.marks:
        body.append({"ph": "i", "s": "t", "name": name, "cat": "tracepoint",
                     "pid": pid[a], "tid": tids[(a, "", 0)], "ts": _us(t), "args": args})
    flow = 0
    for w in run.waits:
        ws = w.slice
        for h in w.holds:
            flow += 1
            # v1 flow events bind to the slice enclosing them on their thread: the
            # start just inside the wait, the end inside the hold, as near as it can be
            at = ws.start + min(1, ws.end - ws.start)
            body.append({"ph": "s", "id": flow, "name": "waits for", "cat": "lock",
                         "pid": pid[ws.actor], "tid": tids[(ws.actor, ws.track, ws.lane)],
                         "ts": _us(at)})
            body.append({"ph": "f", "bp": "e", "id": flow, "name": "waits for",
                         "cat": "lock", "pid": pid[h.actor],
                         "tid": tids[(h.actor, h.track, h.lane)],
                         "ts": _us(min(max(at, h.start), h.end))})
    # Perfetto names a counter track "NAME KEY" (each key of a C event's args is one)
    tracks = [(tm.FREE, "free", "pages" if run.free_anchored else "pages (change)"),
              (tm.RSS, "Rss", "kB"), (tm.AHP, "AnonHugePages", "kB")]
    tracks += [(c, "vmstat", c) for c in tm.THP_COUNTERS]
    for series, name, key in tracks:
        for t, v in run.counters[series]:
            body.append({"ph": "C", "name": name, "pid": mem_pid, "tid": 0,
                         "ts": _us(t), "args": {key: v}})
    body.sort(key=lambda ev: ev["ts"])  # stable: slices stay parent-first at a tie
    return {"traceEvents": meta + body, "displayTimeUnit": "ns",
            "otherData": {"generator": "kmm timeline", "source": title,
                          "events": run.events, "emulated_ns": run.end}}


def write(run: Run, out: IO[str], *, title: str = "") -> dict:
    """Write the Run's trace-event JSON; returns its counts (docs/timeline.md)."""
    doc = to_chrome(run, title=title)
    # dumps, not dump: one string from the C encoder, several times faster than
    # json.dump's chunked pure-Python encoder
    out.write(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    out.write("\n")
    return counts(doc)


def counts(doc: dict) -> dict:
    """What a trace-event file holds: tracks, slices, marks, flows, counter tracks."""
    evs = doc["traceEvents"]
    return {
        "processes": sum(1 for e in evs if e["ph"] == "M" and e["name"] == "process_name"),
        "threads": sum(1 for e in evs if e["ph"] == "M" and e["name"] == "thread_name"),
        "slices": sum(1 for e in evs if e["ph"] == "X"),
        "marks": sum(1 for e in evs if e["ph"] == "i"),
        "flows": sum(1 for e in evs if e["ph"] == "s"),
        "counter_tracks": len({(e["name"], *e["args"]) for e in evs if e["ph"] == "C"}),
    }


def convert(events: Iterable[dict], path: str, *, title: str = "",
            final_free: int | None = None, all_points: bool = False) -> dict:
    """A trace's events to a trace-event file at ``path``; returns its counts."""
    run = tm.build(events, final_free=final_free, all_points=all_points)
    with open(path, "w") as out:
        return write(run, out, title=title)


def cmd_timeline(args) -> int:
    """kmm timeline TRACE.jsonl -o FILE [--report REPORT.json] [--all-points]."""
    import sys
    from kmm.tools import locks
    final_free = None
    if args.report:
        try:
            with open(args.report) as f:
                final_free = json.load(f)["zone"]["nr_free"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = e.strerror if isinstance(e, OSError) else "no zone.nr_free in it"
            print(f"kmm timeline: {args.report}: not a kmm report ({why})", file=sys.stderr)
            return 2
    try:
        c = convert(locks.read_events(args.trace), args.output, title=args.trace,
                    final_free=final_free, all_points=args.all_points)
    except locks.TraceError as e:
        print(f"kmm timeline: {e}{failure_hint(args.trace, args.output)}", file=sys.stderr)
        return 2
    except tm.BadEvent as e:
        print(f"kmm timeline: {args.trace}: not a kmm trace: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kmm timeline: {args.output}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    print(summary_line(args.output, c))
    return 0


class Recorder:
    """The trace a ``--timeline FILE`` option needs: the ``--trace`` file when there is
    one, else a temporary file. Either way the run writes JSON lines to a sink, which
    changes neither its scheduling nor its digest (kmm/runtime/trace.py)."""

    def __init__(self, trace_path: str | None, timeline_path: str | None) -> None:
        import tempfile
        self.timeline = timeline_path
        self.trace_path = trace_path
        self.tmp = None
        if timeline_path:  # a path that cannot be written is bad input before the run
            open(timeline_path, "w").close()
        if trace_path:
            self.sink = open(trace_path, "w")
        elif timeline_path:
            self.tmp = tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False)
            self.sink = self.tmp
            self.trace_path = self.tmp.name
        else:
            self.sink = None

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def discard(self) -> None:
        """Close the sink and drop the temporary trace: no timeline (bad input, Ctrl-C)."""
        import os
        self.close()
        if self.tmp is not None:
            os.unlink(self.tmp.name)
            self.tmp = None
        self.timeline = None

    def finish_partial(self, title: str) -> None:
        """After a kernel BUG or a dead child: the timeline of the trace so far."""
        import sys
        line = self.finish(title)
        if line:
            print(line, file=sys.stderr)

    def finish(self, title: str, final_free: int | None = None) -> str | None:
        """Convert the run's trace; the summary line, or None without --timeline."""
        import os
        from kmm.runtime.trace import read_trace
        self.close()
        try:
            if not self.timeline or not os.path.getsize(self.trace_path):
                return None
            c = convert(read_trace(self.trace_path), self.timeline, title=title,
                        final_free=final_free)
            return summary_line(self.timeline, c)
        finally:
            if self.tmp is not None:
                os.unlink(self.tmp.name)
                self.tmp = None
            self.timeline = None  # once


def failure_hint(path: str, out: str = "OUT.json", plot: bool = False) -> str:
    """For a failure file of kmm explore given where a trace is wanted: what to run."""
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return ""
    if isinstance(head, dict) and str(head.get("format", "")).startswith("kmm-failure/"):
        if plot:
            return (f" (a failure file of kmm explore: kmm replay {path} --trace OUT.jsonl, "
                    "then kmm plot OUT.jsonl)")
        return f" (a failure file of kmm explore: kmm replay {path} --timeline {out})"
    return ""


def add_parser(sub) -> None:
    """``kmm timeline``'s arguments (kmm/tools/cli.py)."""
    tl = sub.add_parser("timeline", help="a trace (kmm run --trace) as a timeline "
                        "Perfetto's UI opens (trace-event JSON, docs/timeline.md)")
    tl.add_argument("trace", help="a trace written by kmm run --trace (JSON lines)")
    tl.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="the timeline to write (.json)")
    tl.add_argument("--report", metavar="REPORT.json", help="the run's report (kmm run "
                    "--json), to show free pages as a count rather than a change")
    tl.add_argument("--all-points", action="store_true",
                    help="mark every preemption point, not only the tracepoints")
    tl.set_defaults(fn=cmd_timeline)


def summary_line(path: str, c: dict) -> str:
    return (f"timeline {path}: {c['processes'] - 1} actors, {c['threads']} tracks, "
            f"{c['slices']} slices, {c['flows']} flows, {c['counter_tracks']} counters "
            f"(open it in Perfetto's UI or chrome://tracing)")
