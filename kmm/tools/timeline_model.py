"""What a kmm trace says over time: slices, lock holds and waits, counters.

One pass over the events of a trace (``kmm run --trace``) builds a ``Run``: the
kernel-function slices of every actor, each lock hold and wait (with who it waited for),
the tracepoints worth a mark, and counter series over emulated time. ``timeline.py``
renders a Run as a trace Perfetto opens; ``plot.py`` draws it. docs/timeline.md says
which event becomes what.

Where the slices come from (the trace has no generic begin/end records, so a slice is
read off the structure the trace already has; no event is added to the mechanism):

- **lock sites.** Every ``lock`` line names its ``site``, the kernel function taking
  the lock, and the ``unlock`` that ends the hold carries ``hold`` and ``wait``. A
  function's slice runs from its first lock request at that site to the release of the
  last lock it took there (overlapping holds at one site are one slice), so a fault is
  the ``do_user_addr_fault`` slice (mmap_lock for read) with ``__do_huge_pmd_anonymous_page``
  or ``pte_offset_map_lock`` nested in it, a collapse is ``collapse_huge_page``, a split
  ``__folio_split``, a syscall ``do_mmap`` / ``do_madvise``, reclaim ``shrink_inactive_list``...
- **begin/end tracepoints**: ``mm_compaction_begin``/``_end`` (compact_zone) and
  ``mm_vmscan_direct_reclaim_begin``/``_end`` (the direct reclaim of try_to_free_pages).
- **timed points**: a page clear or copy (``folio_zero_user``, ``clear_page``, ...)
  costs emulated time at its own point, so it is the slice ending at its line.

Counters are integrated from the events that change them (page allocator lines for free
pages, mapcount lines for mapped and PMD-mapped pages, tracepoints for the thp_* events);
their start is 0 (a run starts with nothing mapped) except free pages, which the caller
may anchor to the run's final ``zone.nr_free``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

HPAGE_PMD_NR = 512

# begin tracepoint -> (end tracepoint, the kernel function the pair brackets)
PAIRS = {
    "mm_compaction_begin": ("mm_compaction_end", "compact_zone"),
    "mm_vmscan_direct_reclaim_begin": ("mm_vmscan_direct_reclaim_end",
                                       "try_to_free_pages"),
}
_ENDS = {end: begin for begin, (end, _) in PAIRS.items()}

# Points too frequent (and too low-level) for a mark of their own: they stay in the
# trace and in the counters. ``Run(all_points=True)`` marks them too.
NOISY = frozenset((
    "lock", "unlock", "trylock", "pgd_read", "pud_read", "pmd_read", "pte_read",
    "load", "store", "page_ref_mod", "mapcount", "clear_page", "clear_user_highpage",
    "copy_mc_user_highpage", "rmqueue", "mm_page_alloc", "mm_page_free", "set_pte",
    "ptep_get_and_clear", "folio_walk_start", "isolate_free_page", "folio_unlock",
))

# Points whose own cost is the work they model (clearing or copying a page): a point
# advances the emulated clock by its cost before its line is written, and nothing else
# runs in between, so the work is the slice from the previous event's time to its own.
TIMED = frozenset(("folio_zero_user", "clear_page", "clear_user_highpage",
                   "copy_mc_user_highpage", "copy_page"))

# PMD-lock sites whose clearing of a PMD is a split of it (split_huge_pmd, and reclaim's
# TTU_SPLIT_HUGE_PMD): a file or shmem PMD's split clears it, with no table to fill
_SPLIT_PMD_SITES = frozenset(("__split_huge_pmd", "try_to_unmap_one"))

# counter series, in the order their tracks are listed
FREE = "free pages"
RSS = "Rss kB"
AHP = "AnonHugePages kB"
THP_COUNTERS = ("thp_fault_alloc", "thp_collapse_alloc", "thp_split_page",
                "thp_split_page_failed", "thp_split_pmd")

# how a mapcount line changes (mapped pages, PMD mappings); None: nr from the line
_MAPCOUNT = {
    "new_anon": (None, 0), "new_anon_pmd": (HPAGE_PMD_NR, 1),
    "add_ptes": (None, 0), "remove_ptes": (None, 0), "dup_ptes": (None, 0),
    "add_pmd": (HPAGE_PMD_NR, 1), "dup_pmd": (HPAGE_PMD_NR, 1),
    "remove_pmd": (-HPAGE_PMD_NR, -1),
}


class BadEvent(Exception):
    """An event of the trace lacks a field its kind carries (not a kmm trace)."""


@dataclass(eq=False)
class Slice:
    """One slice on one track: ``track`` is "" for the actor's kernel functions, else
    a lock class. ``lane`` is set when tracks are packed (timeline.py)."""

    actor: str
    track: str
    name: str
    start: int
    end: int
    args: dict[str, Any] = field(default_factory=dict)
    lane: int = 0


@dataclass
class Wait:
    """A contended acquisition: ``waiter`` waited ``slice`` for ``owners``; ``holds``
    are the owners' hold slices of that lock found at the wait's start."""

    slice: Slice
    lock: str
    owners: list[str]
    holds: list[Slice] = field(default_factory=list)


@dataclass
class Fault:
    """One do_user_addr_fault: its actor, span and whether a THP was mapped in it."""

    actor: str
    start: int
    end: int
    huge: bool


@dataclass
class Run:
    """Everything the timeline and the plots show of one trace."""

    actors: list[str] = field(default_factory=list)   # in order of first event
    slices: list[Slice] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    marks: list[tuple[int, str, str, dict]] = field(default_factory=list)  # t, actor, name, args
    counters: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    hold_ns: dict[str, list[int]] = field(default_factory=dict)  # class -> every hold
    events: int = 0
    end: int = 0
    free_anchored: bool = False


class _Builder:
    """One pass over the events: open lock requests and site slices per actor, begin
    tracepoints waiting for their end, and the counters' running values."""

    def __init__(self, all_points: bool) -> None:
        self.run = Run()
        self.all_points = all_points
        self.seen: set[str] = set()
        # (actor, lock) -> [request t, site] of requests not yet released (a stack)
        self.requests: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self.trylocks: dict[tuple[str, str], tuple[int, int, str]] = {}
        # actor -> site -> [start t, open holds]
        self.sites: dict[str, dict[str, list[int]]] = {}
        self.pairs: dict[tuple[str, str], list[tuple[int, dict]]] = {}
        self.holds: dict[str, list[Slice]] = {}   # lock instance -> its hold slices
        self.pfn_alloc: dict[int, tuple[int, str]] = {}  # pfn -> (order, purpose)
        self.anon: set[int] = set()  # head pfns of anonymous folios (AnonHugePages)
        self.fault_open: dict[str, list] = {}   # actor -> [start, huge]
        self.values: dict[str, int] = {FREE: 0, RSS: 0, AHP: 0}
        self.values.update((c, 0) for c in THP_COUNTERS)
        for name in self.values:
            self.run.counters[name] = [(0, 0)]

    # ------------------------------------------------------------------ counters
    def bump(self, t: int, name: str, delta: int) -> None:
        if delta:
            v = self.values[name] = self.values[name] + delta
            series = self.run.counters[name]
            if series[-1][0] == t:
                series[-1] = (t, v)
            else:
                series.append((t, v))

    def mapcount(self, t: int, e: dict) -> None:
        how, pfn = e.get("how"), e.get("pfn")
        if self.pfn_alloc.get(pfn, (0, ""))[1] == "hugetlb":
            return  # smaps counts hugetlb pages in *_Hugetlb, not Rss or AnonHugePages
        nr, pmds = _MAPCOUNT.get(how, (0, 0))
        if how in ("new_anon", "new_anon_pmd"):
            self.anon.add(pfn)
        if nr is None:
            nr = 1 << self.pfn_alloc.get(pfn, (0, ""))[0] if how == "new_anon" else e["nr"]
        self.bump(t, RSS, 4 * nr)
        if pfn in self.anon:  # a shmem PMD is ShmemPmdMapped, not AnonHugePages
            self.bump(t, AHP, 2048 * pmds)

    # ------------------------------------------------------------------ locks
    def site_open(self, actor: str, site: str, t: int) -> None:
        s = self.sites.setdefault(actor, {}).get(site)
        if s is None:
            self.sites[actor][site] = [t, 1]
        else:
            s[1] += 1
        if site == "do_user_addr_fault":  # huge: a new_anon_pmd mapcount inside it
            self.fault_open.setdefault(actor, [t, False])

    def site_close(self, actor: str, site: str, start: int, t: int) -> None:
        s = self.sites.get(actor, {}).get(site)
        if s is None:  # its request is before the trace began (replay --last)
            self.function(actor, site, start, t)
            return
        s[1] -= 1
        if s[1] <= 0:
            del self.sites[actor][site]
            self.function(actor, site, min(s[0], start), t)
            if site == "do_user_addr_fault":
                f0, huge = self.fault_open.pop(actor, (start, False))
                self.run.faults.append(Fault(actor, f0, t, huge))

    def function(self, actor: str, name: str, start: int, end: int, **args) -> None:
        self.run.slices.append(Slice(actor, "", name, start, end, args))

    def unlock(self, t: int, actor: str, e: dict) -> None:
        run = self.run
        lock, cls = e["lock"], e["class"]
        key = (actor, lock)
        if "hold" not in e:
            return  # an unlock of a lock not held: the checker reports it
        hold, wait = e["hold"], e.get("wait", 0)
        t_acq = t - hold
        req = None
        if "trylock" in e:
            tr = self.trylocks.pop(key, None)
            start = tr[1] if tr and tr[0] == e["trylock"] else t_acq
            site = e.get("site", "?")
            self.function(actor, site, start, t)
        else:
            stack = self.requests.get(key)
            req = stack.pop() if stack else None
            start = req[0] if req else t_acq - wait
            self.site_close(actor, e.get("site", req[1] if req else "?"), start, t)
        mode = f" ({e['mode']})" if e.get("mode") else ""
        h = Slice(actor, cls, f"hold {lock}{mode}", t_acq, t,
                  {"lock": lock, "site": e.get("site"), "hold_ns": hold})
        self.run.slices.append(h)
        self.holds.setdefault(lock, []).append(h)
        run.hold_ns.setdefault(cls, []).append(hold)
        if e.get("contended"):
            w = Slice(actor, cls, f"wait {lock}{mode}", t_acq - wait, t_acq,
                      {"lock": lock, "site": e.get("site"), "wait_ns": wait,
                       "owners": list(e.get("owners") or ())})
            self.run.slices.append(w)
            self.run.waits.append(Wait(w, lock, list(e.get("owners") or ())))

    # ------------------------------------------------------------------ events
    def feed(self, e: dict) -> None:
        t, actor, ev = e["t"], e["actor"], e["event"]
        run = self.run
        run.events += 1
        if ev in TIMED and t > run.end:
            self.function(actor, ev, run.end, t)
        run.end = t
        if actor not in self.seen:
            self.seen.add(actor)
            run.actors.append(actor)
        if ev == "lock":
            self.requests.setdefault((actor, e["lock"]), []).append((t, e.get("site", "?")))
            self.site_open(actor, e.get("site", "?"), t)
        elif ev == "trylock":
            self.trylocks[(actor, e["lock"])] = (e["seq"], t, e.get("site", "?"))
        elif ev == "unlock":
            self.unlock(t, actor, e)
        elif ev == "rmqueue" or ev == "isolate_free_page":
            if ev == "rmqueue" or e.get("ret", 0) >= 0:
                self.bump(t, FREE, -(1 << e.get("order", 0)))
        elif ev == "mm_page_free":
            self.bump(t, FREE, 1 << e.get("order", 0))
            self.anon.discard(e.get("pfn"))
        elif ev == "mm_page_alloc":
            self.pfn_alloc[e.get("pfn")] = (e.get("order", 0), e.get("purpose", ""))
        elif ev == "mapcount":
            self.mapcount(t, e)
            if e.get("how") == "new_anon_pmd" and actor in self.fault_open \
                    and self.pfn_alloc.get(e.get("pfn"), (0, ""))[1] != "hugetlb":
                self.fault_open[actor][1] = True
                self.bump(t, "thp_fault_alloc", 1)  # map_anon_folio_pmd counts it
        elif ev == "mm_collapse_huge_page":
            # collapse_huge_page allocates first; the tracepoint ends every attempt
            if e.get("status") != "alloc_huge_page_failed":
                self.bump(t, "thp_collapse_alloc", 1)
        elif ev == "mm_split_huge_page":
            # thp_split_page* count PMD-sized folios only (an mTHP's split has its own);
            # a folio the trace did not see allocated, or one a split made, has no
            # known order and is not counted
            pfn = e.get("pfn")
            if self.pfn_alloc.get(pfn, (0, ""))[0] == 9:
                self.bump(t, "thp_split_page" if e.get("ret", 0) == 0
                          else "thp_split_page_failed", 1)
            if e.get("ret", 0) == 0:
                self.pfn_alloc.pop(pfn, None)
        elif ev == "set_ptes" and e.get("nr") == HPAGE_PMD_NR:
            self.bump(t, "thp_split_pmd", 1)  # __split_huge_pmd_locked's table fill
        elif ev == "pmdp_get_and_clear" and not self.sites.get(actor, {}).keys().isdisjoint(
                _SPLIT_PMD_SITES):
            self.bump(t, "thp_split_pmd", 1)  # a file PMD's split only clears it
        elif ev in PAIRS:
            self.pairs.setdefault((actor, ev), []).append((t, e))
        elif ev in _ENDS:
            stack = self.pairs.get((actor, _ENDS[ev]))
            if stack:
                t0, b = stack.pop()
                args = {k: v for k, v in b.items() if k not in ("seq", "t", "actor", "event")}
                args.update((k, v) for k, v in e.items()
                            if k not in ("seq", "t", "actor", "event"))
                self.function(actor, PAIRS[_ENDS[ev]][1], t0, t, **args)
        if self.all_points or ev not in NOISY:
            run.marks.append((t, actor, ev, {k: v for k, v in e.items()
                                                 if k not in ("t", "actor", "event")}))

    def finish(self) -> Run:
        run, end = self.run, self.run.end
        # what is still held or waited for when the trace stops ends with it
        for actor, sites in self.sites.items():
            for site, (start, _) in sorted(sites.items()):
                self.function(actor, site, start, end, open_at_end=True)
        for (actor, ev), stack in sorted(self.pairs.items()):
            for t0, _ in stack:
                self.function(actor, PAIRS[ev][1], t0, end, open_at_end=True)
        self.merge_functions()
        into = self.merge_holds()
        for w in run.waits:
            t0 = w.slice.start
            for owner in w.owners:
                for h in self.holds.get(w.lock, ()):
                    if h.actor == owner and h.start <= t0 <= h.end:
                        w.holds.append(into.get(id(h), h))
                        break
        return run

    def merge_holds(self) -> dict[int, Slice]:
        """Holds of one class by one actor that overlap without nesting (the 512 folio
        locks __collapse_huge_page_isolate takes hand over hand, released after the
        copy) become one slice, ``hold N CLASS``, with the locks in its args: one lane,
        not one per lock. Returns what each merged hold became (for the flows)."""
        run = self.run
        holds = sorted((s for s in run.slices if s.track and s.name.startswith("hold ")),
                       key=lambda s: (s.actor, s.track, s.start, -s.end))
        out: list[Slice] = []
        into: dict[int, Slice] = {}
        group: list[Slice] = []

        def nests() -> bool:
            stack: list[int] = []
            for g in group:  # sorted by start, longest first
                while stack and stack[-1] <= g.start:
                    stack.pop()
                if stack and g.end > stack[-1]:
                    return False
                stack.append(g.end)
            return True

        def close() -> None:
            if nests():
                out.extend(group)
            else:
                first = group[0]
                u = Slice(first.actor, first.track, f"hold {len(group)} {first.track}",
                          first.start, max(g.end for g in group),
                          {"locks": [g.args.get("lock") for g in group],
                           "sites": sorted({str(g.args.get("site")) for g in group})})
                out.append(u)
                for g in group:
                    into[id(g)] = u
            group.clear()

        group_end = 0
        for h in holds:
            if group and (h.actor, h.track) == (group[0].actor, group[0].track) \
                    and h.start < group_end:
                group.append(h)
                group_end = max(group_end, h.end)
            else:
                if group:
                    close()
                group.append(h)
                group_end = h.end
        if group:
            close()
        run.slices = [s for s in run.slices if not (s.track and s.name.startswith("hold "))]
        run.slices += out
        return into

    def merge_functions(self) -> None:
        """Overlapping slices of one function in one actor are one call seen through
        several locks (folio locks taken hand over hand by trylock in
        __collapse_huge_page_isolate, say): keep their union."""
        run = self.run
        fn = sorted((s for s in run.slices if not s.track),
                    key=lambda s: (s.actor, s.name, s.start, -s.end))
        merged: list[Slice] = []
        for s in fn:
            last = merged[-1] if merged else None
            if last and last.actor == s.actor and last.name == s.name and s.start < last.end:
                last.end = max(last.end, s.end)
            else:
                merged.append(s)
        run.slices = merged + [s for s in run.slices if s.track]


def build(events: Iterable[dict], *, all_points: bool = False,
          final_free: int | None = None) -> Run:
    """The Run of a trace's events. ``final_free``: the run's ``zone.nr_free`` at its
    end (the report's), which anchors the free-pages series (else it starts at 0 and
    shows the change)."""
    b = _Builder(all_points)
    e: dict = {}
    try:
        for e in events:
            b.feed(e)
    except KeyError as err:
        raise BadEvent(f"event seq {e.get('seq', '?')} ({e.get('event', '?')}): "
                       f"no field {err}") from None
    except (TypeError, ValueError):
        raise BadEvent(f"event seq {e.get('seq', '?')} ({e.get('event', '?')}): "
                       "a field of the wrong type") from None
    run = b.finish()
    if final_free is not None:
        base = final_free - b.values[FREE]
        run.counters[FREE] = [(t, v + base) for t, v in run.counters[FREE]]
        run.free_anchored = True
    return run
