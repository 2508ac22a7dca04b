"""``kmm timeline``, ``kmm run --timeline`` and ``kmm replay --timeline``: a kmm trace as
a trace-event JSON timeline (docs/timeline.md), read back and checked: its tracks, the
kernel-function slices and their nesting, lock waits with flows to their holders, and
the counters. A timeline changes neither the schedule nor the trace digest.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm import cost
from kmm.tools import cli, timeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
W = ROOT / "workloads"
RACE = str(W / "race_fault_fault.py")
# seed 3 of the random scheduler: the two CPUs meet on page_table_lock twice
RUN = ["run", RACE, "--cpus", "2", "--mode", "random", "--seed", "3"]


class Timeline:
    """A trace-event file, indexed: process and thread names, slices per track."""

    def __init__(self, path) -> None:
        self.doc = json.loads(pathlib.Path(path).read_text())
        evs = self.doc["traceEvents"]
        self.proc = {e["pid"]: e["args"]["name"] for e in evs
                     if e["ph"] == "M" and e["name"] == "process_name"}
        self.thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
                       if e["ph"] == "M" and e["name"] == "thread_name"}
        self.slices = [e for e in evs if e["ph"] == "X"]
        self.flows = [e for e in evs if e["ph"] in "sf"]
        self.counters: dict[str, list] = {}  # named as Perfetto names them: NAME KEY
        for e in evs:
            if e["ph"] == "C":
                for key, v in e["args"].items():
                    self.counters.setdefault(f"{e['name']} {key}", []).append(v)

    def track(self, e) -> tuple[str, str]:
        return self.proc[e["pid"]], self.thread[(e["pid"], e["tid"])]

    def named(self, name: str, actor: str | None = None) -> list[dict]:
        return [e for e in self.slices if e["name"] == name
                and (actor is None or self.proc[e["pid"]] == actor)]

    def around(self, e) -> list[str]:
        """The names of the slices enclosing ``e`` on its thread, outermost first."""
        a, b = span(e)
        return [o["name"] for o in self.slices if o is not e and o["pid"] == e["pid"]
                and o["tid"] == e["tid"] and span(o)[0] <= a and b <= span(o)[1]]


def ns(us: float) -> int:
    """A timestamp as Perfetto's JSON importer reads it: int(us * 1000), truncated."""
    return int(us * 1000.0)


def span(e) -> tuple[int, int]:
    """A complete event's [start, end] in ns, as Perfetto places it."""
    return ns(e["ts"]), ns(e["ts"]) + ns(e["dur"])


def assert_nested(tl: Timeline) -> None:
    """On every thread, two slices are disjoint or one contains the other (how
    Perfetto stacks a thread's slices)."""
    by: dict[tuple, list] = {}
    for e in tl.slices:
        by.setdefault((e["pid"], e["tid"]), []).append(span(e))
    for track, spans in by.items():
        open_: list[int] = []
        for a, b in sorted(spans, key=lambda s: (s[0], -s[1])):
            while open_ and open_[-1] <= a and not (open_[-1] == a == b):
                open_.pop()
            assert not open_ or b <= open_[-1], (tl.thread[track], a, b, open_)
            open_.append(b)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """race_fault_fault, seed 3: its report and trace without a timeline, and with one."""
    d = tmp_path_factory.mktemp("tl")
    plain = cli.main(RUN + ["--json", "--trace", str(d / "plain.jsonl")])
    assert plain == 0
    rc = cli.main(RUN + ["--trace", str(d / "t.jsonl"), "--timeline", str(d / "t.json")])
    assert rc == 0
    return d


def test_timeline_changes_neither_schedule_nor_digest(known, capsys):
    """--timeline only adds a trace sink: the same events, byte for byte, and the same
    digest as a run without it (kmm/runtime/trace.py: the digest ignores the sink)."""
    assert (known / "t.jsonl").read_bytes() == (known / "plain.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(RUN + ["--json"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert cli.main(RUN + ["--json", "--timeline", str(known / "again.json")]) == 0
    out = capsys.readouterr()
    with_tl = json.loads(out.out)
    assert with_tl == without
    assert "timeline" in out.err  # the summary line goes to stderr beside --json
    assert (known / "again.json").read_bytes() == (known / "t.json").read_bytes()


def test_tracks_per_actor_and_lock_class(known):
    """A process per actor (CPUs first), named by metadata; in each a thread for its
    kernel functions and one per lock class it took; a memory process for counters."""
    tl = Timeline(known / "t.json")
    assert list(tl.proc.values()) == ["cpu0.4", "cpu1.5", "main", "page_alloc", "memory"]
    threads = {}
    for (pid, _), name in tl.thread.items():
        threads.setdefault(tl.proc[pid], set()).add(name)
    # both CPUs fault under mmap_lock, allocate tables under page_table_lock and map
    # under the PMD lock; main's mmap and madvise take mmap_lock for write
    assert {"cpu0.4", "mmap_lock", "page_table_lock", "ptlock_pmd"} <= threads["cpu0.4"]
    assert {"cpu1.5", "mmap_lock", "page_table_lock", "ptlock_pmd"} <= threads["cpu1.5"]
    assert threads["main"] == {"main", "mmap_lock"}
    assert threads["page_alloc"] == {"page_alloc", "zone_lock"}
    assert_nested(tl)


def test_fault_slices_nest_by_kernel_function(known):
    """Each CPU's write fault is a do_user_addr_fault slice (mmap_lock held for read);
    the winner's __do_huge_pmd_anonymous_page (PMD lock) nests in it, and so do the
    table allocations (__pud_alloc/__pmd_alloc, page_table_lock). The loser (pmd_none
    recheck under the PMD lock fails) also takes the PMD lock, then refaults."""
    tl = Timeline(known / "t.json")
    for cpu in ("cpu0.4", "cpu1.5"):
        faults = tl.named("do_user_addr_fault", cpu)
        assert faults, cpu
        assert all(tl.track(f) == (cpu, cpu) for f in faults)
    huge = tl.named("__do_huge_pmd_anonymous_page")
    assert {tl.proc[e["pid"]] for e in huge} == {"cpu0.4", "cpu1.5"}
    for e in huge + tl.named("__pmd_alloc"):
        assert tl.around(e) == ["do_user_addr_fault"], e
    assert [e["name"] for e in tl.slices if tl.proc[e["pid"]] == "main"
            and e["cat"] == "function"] == ["do_mmap", "do_madvise"]
    holds = [e for e in tl.slices if tl.track(e) == ("cpu0.4", "mmap_lock")]
    assert holds and all(e["name"] == "hold mmap_lock:main (read)" for e in holds)


def test_waits_have_flows_to_their_holders(known):
    """Each contended acquisition (an unlock line with ``contended``) is a wait slice
    on the waiter's lock-class track, and a flow goes from it to the hold of the actor
    that had the lock (the ``owners`` of the line)."""
    tl = Timeline(known / "t.json")
    trace = [json.loads(ln) for ln in (known / "t.jsonl").read_text().splitlines()]
    contended = [e for e in trace if e.get("contended")]
    assert len(contended) == 2
    waits = [e for e in tl.slices if e["name"].startswith("wait ")]
    assert sorted((tl.proc[w["pid"]], w["args"]["wait_ns"]) for w in waits) == sorted(
        (e["actor"], e["wait"]) for e in contended)
    starts = {f["id"]: f for f in tl.flows if f["ph"] == "s"}
    ends = {f["id"]: f for f in tl.flows if f["ph"] == "f"}
    assert len(starts) == 2 and starts.keys() == ends.keys()
    for i, s in starts.items():
        f = ends[i]
        wait = [w for w in waits if (w["pid"], w["tid"]) == (s["pid"], s["tid"])
                and span(w)[0] <= ns(s["ts"]) <= span(w)[1]]
        hold = [h for h in tl.slices if (h["pid"], h["tid"]) == (f["pid"], f["tid"])
                and h["name"].startswith("hold ") and span(h)[0] <= ns(f["ts"]) <= span(h)[1]]
        assert len(wait) == 1 and len(hold) == 1
        assert tl.proc[f["pid"]] in wait[0]["args"]["owners"]
        assert tl.track(wait[0])[1] == tl.track(hold[0])[1] == "page_table_lock"


def test_counters_follow_the_run(known, capsys):
    """The counter tracks: free pages anchored to the report's zone.nr_free, Rss and
    AnonHugePages of the one THP the two faults leave (2048 kB each), thp_fault_alloc
    counting both CPUs' allocations (the loser's too, as vma_alloc_anon_folio_pmd counts)."""
    tl = Timeline(known / "t.json")
    assert sorted(tl.counters) == sorted(
        ["free pages", "Rss kB", "AnonHugePages kB", "vmstat thp_fault_alloc",
         "vmstat thp_collapse_alloc", "vmstat thp_split_page", "vmstat thp_split_page_failed",
         "vmstat thp_split_pmd"])
    capsys.readouterr()
    cli.main(RUN + ["--json"])
    rep = json.loads(capsys.readouterr().out)
    assert tl.counters["free pages"][-1] == rep["zone"]["nr_free"]
    assert tl.counters["Rss kB"][-1] == rep["regions"]["main/0x200000200000"]["rss_kb"]
    assert tl.counters["AnonHugePages kB"] == [0, 2048]
    assert tl.counters["vmstat thp_fault_alloc"][-1] == rep["vmstat"]["thp_fault_alloc"]


def test_timeline_command_matches_run_timeline(known, capsys):
    """``kmm timeline TRACE --report REP`` and ``run --timeline`` draw the same events;
    without the report free pages are a change from the start."""
    rep = known / "rep.json"
    capsys.readouterr()
    cli.main(RUN + ["--json"])
    rep.write_text(capsys.readouterr().out)
    out = known / "conv.json"
    assert cli.main(["timeline", str(known / "t.jsonl"), "-o", str(out),
                     "--report", str(rep)]) == 0
    assert "4 actors" in capsys.readouterr().out
    a = json.loads(out.read_text())["traceEvents"]
    b = json.loads((known / "t.json").read_text())["traceEvents"]
    assert a == b
    assert cli.main(["timeline", str(known / "t.jsonl"), "-o", str(out)]) == 0
    assert "free pages (change)" in Timeline(out).counters  # no report: no anchor
    # --all-points: every event of the trace is a mark on its actor's thread
    assert cli.main(["timeline", str(known / "t.jsonl"), "-o", str(out), "--all-points"]) == 0
    marks = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "i"]
    assert len(marks) == len((known / "t.jsonl").read_text().splitlines())


def test_replayed_race_opens_as_a_timeline(tmp_path, monkeypatch, capsys):
    """The injected huge_fault_no_pmd_none_recheck: both CPUs install their own THP over
    the same PMD. The replayed failure's timeline shows it: two do_user_addr_fault
    slices on two CPUs each with __do_huge_pmd_anonymous_page nested, two THP
    allocations, and AnonHugePages counting 4096 kB of PMD mappings for one 2 MiB range
    (the first PMD's mapcount leaks). Replay with --timeline still reproduces."""
    monkeypatch.chdir(tmp_path)
    fail = tmp_path / "f.jsonl"
    assert cli.main(["explore", RACE, "--quiet", "--schedules", "20", "--inject",
                     "huge_fault_no_pmd_none_recheck", "--out", str(fail)]) == 1
    capsys.readouterr()
    assert cli.main(["replay", str(fail), "--last", "0", "--timeline", "r.json"]) == 1
    out = capsys.readouterr().out
    assert "reproduced" in out and "timeline r.json" in out
    tl = Timeline(tmp_path / "r.json")
    assert_nested(tl)
    huge = tl.named("__do_huge_pmd_anonymous_page")
    assert sorted(tl.proc[e["pid"]] for e in huge) == ["cpu0.4", "cpu1.5"]
    assert all(tl.around(e) == ["do_user_addr_fault"] for e in huge)
    assert tl.counters["vmstat thp_fault_alloc"][-1] == 2
    assert tl.counters["AnonHugePages kB"] == [0, 2048, 4096]
    # each CPU clears its own 2 MiB (vma_alloc_anon_folio_pmd's folio_zero_user) inside
    # its fault: the point's cost, COST_CLEAR_HUGE, is the slice
    zero = tl.named("folio_zero_user")
    assert sorted(tl.proc[e["pid"]] for e in zero) == ["cpu0.4", "cpu1.5"]
    assert all(tl.around(e) == ["do_user_addr_fault"] for e in zero)
    assert {ns(e["dur"]) for e in zero} == {cost.COST_CLEAR_HUGE}
    # the failure file itself is no trace: the message says how to get its timeline
    assert cli.main(["timeline", str(fail), "-o", "x.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"kmm replay {fail} --timeline x.json" in err
    again = tmp_path / "r2.json"
    assert cli.main(["replay", str(fail), "--last", "0", "--timeline", str(again)]) == 1
    assert again.read_bytes() == (tmp_path / "r.json").read_bytes()


@pytest.mark.parametrize("text, words", [
    (None, ["no such file"]),
    ("", ["empty file"]),
    ("hello world\n", [":1:", "not a JSON line"]),
    ('{"seq": 1, "t": 0, "actor": "cpu0"}\n', [":1:", "'event'"]),
    ('[1, 2]\n', [":1:", "must be an object"]),
    ('{"seq": 1, "t": 5, "actor": "cpu0", "event": "rmqueue", "order": "x"}\n',
     ["event seq 1 (rmqueue)", "wrong type"]),
])
def test_not_a_trace_is_one_line_exit_2(tmp_path, capsys, text, words):
    """A file that is not a kmm trace: exit 2 and one stderr line naming the file."""
    path = tmp_path / "bad.jsonl"
    if text is not None:
        path.write_text(text)
    for cmd in (["timeline", str(path), "-o", str(tmp_path / "o.json")], ["plot", str(path)]):
        capsys.readouterr()
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
        for w in words:
            assert w in err, (cmd, err)


def test_pack_puts_overlapping_holds_on_lanes():
    """Holds taken hand over hand (A, B, unlock A, unlock B) do not nest: the second
    goes one lane down, so each thread's slices still nest."""
    from kmm.tools.timeline_model import Slice
    a = Slice("cpu0", "folio_lock", "hold folio:1", 0, 10)
    b = Slice("cpu0", "folio_lock", "hold folio:2", 5, 15)
    c = Slice("cpu0", "folio_lock", "hold folio:3", 11, 12)
    timeline.pack([a, b, c])
    assert (a.lane, b.lane, c.lane) == (0, 1, 0)


def test_hand_over_hand_holds_are_one_slice():
    """Locks of one class an actor takes hand over hand (lock A, lock B, unlock A,
    unlock B: __collapse_huge_page_isolate's folio locks) do not nest: their holds become
    one slice ``hold 2 folio_lock`` naming both locks; a nested pair stays two slices."""
    from kmm.tools import timeline_model as tm

    def ev(seq, t, event, lock, **f):
        return {"seq": seq, "t": t, "actor": "khugepaged", "event": event, "lock": lock,
                "class": "folio_lock", "site": "__collapse_huge_page_isolate", **f}
    run = tm.build([ev(1, 0, "lock", "folio:1"), ev(2, 10, "lock", "folio:2"),
                    ev(3, 20, "unlock", "folio:1", hold=20), ev(4, 30, "unlock", "folio:2", hold=20),
                    ev(5, 40, "lock", "folio:3"), ev(6, 50, "lock", "folio:4"),
                    ev(7, 60, "unlock", "folio:4", hold=10), ev(8, 70, "unlock", "folio:3", hold=30)])
    holds = sorted((s.name, s.start, s.end, s.args.get("locks")) for s in run.slices
                   if s.track == "folio_lock")
    assert holds == [("hold 2 folio_lock", 0, 30, ["folio:1", "folio:2"]),
                     ("hold folio:3", 40, 70, None), ("hold folio:4", 50, 60, None)]
    fn = sorted((s.name, s.start, s.end) for s in run.slices if not s.track)
    assert fn == [("__collapse_huge_page_isolate", 0, 30), ("__collapse_huge_page_isolate", 40, 70)]


def test_khugepaged_collapse_scenario(tmp_path, capsys):
    """A built-in scenario, selftests/mm/khugepaged.c collapse_single_pte_entry: one
    present PTE and 511 none collapse into a THP. On khugepaged's track the collapse is
    a collapse_huge_page slice holding one copy_mc_user_highpage (the present page) and
    511 clear_user_highpage (__collapse_huge_page_copy: none PTEs read zero), marked by
    mm_collapse_huge_page "succeeded"; the counters end where the report does."""
    tl_path = tmp_path / "c.json"
    toml = str(W / "khugepaged_collapse_single_pte_entry.toml")
    assert cli.main(["run", toml, "--json", "--timeline", str(tl_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    tl = Timeline(tl_path)
    assert "khugepaged" in tl.proc.values()
    assert_nested(tl)
    # collapse_huge_page takes mmap_lock for read briefly (hugepage_vma_revalidate),
    # then for write around the isolate and the copy: the long slice
    collapse = max(tl.named("collapse_huge_page", "khugepaged"), key=lambda e: e["dur"])
    inside = [e["name"] for e in tl.slices if tl.proc[e["pid"]] == "khugepaged"
              and span(collapse)[0] <= span(e)[0] and span(e)[1] <= span(collapse)[1]]
    assert inside.count("copy_mc_user_highpage") == 1
    assert inside.count("clear_user_highpage") == 511
    marks = [e for e in tl.doc["traceEvents"] if e["ph"] == "i"
             and e["name"] == "mm_collapse_huge_page"]
    assert [m["args"]["status"] for m in marks] == ["succeeded"]
    assert tl.counters["vmstat thp_collapse_alloc"][-1] == rep["vmstat"]["thp_collapse_alloc"] == 1
    assert tl.counters["AnonHugePages kB"][-1] == rep["regions"]["main/p"]["anon_huge_kb"]
    assert tl.counters["free pages"][-1] == rep["zone"]["nr_free"]


def test_timeline_path_that_cannot_be_written(tmp_path, capsys):
    """--timeline into a missing directory: one line and exit 2, before the run."""
    bad = tmp_path / "no" / "t.json"
    assert cli.main(RUN + ["--timeline", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err
