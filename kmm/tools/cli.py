"""The ``kmm`` command: run, oracle."""

from __future__ import annotations

import argparse
import json
import sys

from kmm.tools.scenario import ScenarioError, parse_size


def summary(report: dict, title: str) -> str:
    """The human-readable report: steps, counters that moved, regions, locks."""
    out = [title]
    steps = report.get("steps") or []
    if steps:
        out.append("\nsteps")
        for i, s in enumerate(steps, 1):
            extra = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("op", "ok"))
            out.append(f"  {i:3} {s['op']:<10} {'ok' if s['ok'] else 'FAILED'} {extra}".rstrip())
    moved = {k: v for k, v in report["vmstat"].items() if v}
    out.append("\n/proc/vmstat (thp_*, change over the run)")
    out.extend(f"  {k:<28} {v}" for k, v in moved.items())
    if not moved:
        out.append("  (no thp_* counter moved)")
    out.extend(_mthp_table(report.get("mthp") or {}))
    other = {k: v for k, v in (report.get("vm_events") or {}).items() if v}
    if other:
        out.append("\nother vm events (swap, reclaim, compaction, faults)")
        out.extend(f"  {k:<28} {v}" for k, v in other.items())
    swap = any("swap_kb" in r for r in report["regions"].values())
    shpmd = any("shmem_pmd_mapped_kb" in r for r in report["regions"].values())
    out.append("\nregions                           Rss      AnonHugePages"
               + ("      Swap" if swap else "") + ("  ShmemPmdMapped" if shpmd else ""))
    for name, r in report["regions"].items():
        out.append(f"  {name:<28} {r['rss_kb']:>8} kB {r['anon_huge_kb']:>8} kB"
                   + (f" {r.get('swap_kb', 0):>8} kB" if swap else "")
                   + (f" {r.get('shmem_pmd_mapped_kb', 0):>8} kB" if shpmd else ""))
        if r.get("mthp_kb"):
            out.append(f"  {'':<28} mTHP-mapped: " + ", ".join(
                f"{size} {kb} kB" for size, kb in r["mthp_kb"].items()))
        if "numa_maps" in r:  # numa_maps: N<node>=pages, and THPs per node
            nm = r["numa_maps"]
            out.append(f"  {'':<28} numa_maps: " + " ".join(
                f"N{n}={v}" for n, v in nm["pages"].items()) + "".join(
                f" thp_N{n}={v}" for n, v in nm.get("huge", {}).items()))
    if not report["regions"]:
        out.append("  (no live process has a region)")
    if report.get("meminfo"):
        out.append("\nmeminfo (change over the run)")
        out.extend(f"  {k:<28} {v}" for k, v in report["meminfo"].items())
    htlb = {n: (r.get("private_hugetlb_kb", 0), r.get("shared_hugetlb_kb", 0))
            for n, r in report["regions"].items()
            if r.get("private_hugetlb_kb") or r.get("shared_hugetlb_kb")}
    if htlb:
        out.append("\nhugetlb regions                   Private_Hugetlb  Shared_Hugetlb")
        out.extend(f"  {n:<28} {p:>12} kB {sh:>12} kB" for n, (p, sh) in htlb.items())
    if report.get("hugetlb_events"):
        out.append("\nhugetlb events (change over the run): " + ", ".join(
            f"{k} {v:+d}" for k, v in report["hugetlb_events"].items()))
    locks = [r for r in report.get("locks", []) if r["acquisitions"]]
    if locks:
        out.append("\nlock_stat (emulated us)     acquisitions  contentions  "
                   "waittime-total  holdtime-total")
        for r in locks:
            out.append(f"  {r['class name']:<26} {r['acquisitions']:>12} {r['contentions']:>12}"
                       f" {r['waittime-total']:>15} {r['holdtime-total']:>15}")
    zone = report.get("zone")
    if zone:
        out.append(f"\nbuddyinfo (Normal, orders 0..10): {' '.join(map(str, zone['buddyinfo']))}"
                   f"   free {zone['nr_free']} pages, watermarks "
                   + " ".join(f"{k} {v}" for k, v in zone["watermarks"].items()))
    numa = report.get("numa")
    if numa:  # machines of several nodes
        out.append("numa (/proc/vmstat): " + ", ".join(f"{k} {v}" for k, v in
                                                       numa["vmstat"].items()))
        for nid, n in numa["nodes"].items():
            out.append(f"  node {nid}: cpus {n['cpus']}, free {n['nr_free']} of "
                       f"{n['present_pages']} pages, buddyinfo "
                       f"{' '.join(map(str, n['buddyinfo']))}")
    if "lru" in report:
        lru = report["lru"]
        out.append("LRU pages: " + ", ".join(f"{k} {v}" for k, v in lru.items())
                   + f"; deferred split queue {report.get('deferred_split_queue', 0)} folios")
    kh = report.get("khugepaged")
    if kh:
        out.append(f"\nkhugepaged: full_scans {kh['full_scans']}, pages_collapsed "
                   f"{kh['pages_collapsed']}; PMD scans ended with")
        for who, results in kh["scan_results"].items():
            out.append(f"  {who:<11} " + ", ".join(f"{r} {n}" for r, n in results.items()))
    result = report.get("result")
    if isinstance(result, dict) and isinstance(result.get("table"), list):
        out.append("\nprogram result:")  # a program's own table, one line per row
        out.extend(f"  {line}" for line in result["table"])
    elif result is not None:
        out.append(f"\nprogram result: {result}")
    run = report.get("run")
    if run:
        out.append(f"\nrun: seed {run['seed']}, {run['mode']} scheduler, {run['events']} events, "
                   f"{run['emulated_ns'] / 1e6:.3f} ms emulated, trace sha256 "
                   f"{run['trace_sha256'][:16]}")
    return "\n".join(out)


def _mthp_table(mthp: dict) -> list[str]:
    """The report's ``mthp`` as a table: one row per size, one column per stat file
    that moved for some size."""
    if not mthp:
        return []
    cols: list[str] = []
    for stats in mthp.values():
        cols += [n for n in stats if n not in cols]
    width = {c: max(len(c), 6) for c in cols}
    out = ["\nmTHP (hugepages-<size>kB/stats/, change over the run)",
           "  " + f"{'size':<10}" + " ".join(f"{c:>{width[c]}}" for c in cols)]
    order = sorted(mthp, key=lambda f: int(f[len("hugepages-"):-2]))
    for folder in order:
        stats = mthp[folder]
        out.append("  " + f"{folder[len('hugepages-'):]:<10}"
                   + " ".join(f"{stats.get(c, 0):>{width[c]}}" for c in cols))
    return out


def cmd_run(args) -> int:
    from kmm.machine import KernelBug
    from kmm.tools import runner
    from kmm.tools.scenario import load_scenario
    from kmm import daemon
    from kmm.runtime import remote
    if args.cpus is not None and args.cpus < 1:
        print("kmm: --cpus must be at least 1", file=sys.stderr)
        return 2
    if args.daemon:  # module:Class from the current directory, as `python -m` finds it
        import os
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        plugins = [spec if spec.startswith("exec:") else daemon.load_daemon_spec(spec)
                   for spec in args.daemon or ()]
    except daemon.DaemonLoadError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    try:
        spawn = (remote.parse_spawn(args.spawn, daemon_names(plugins))
                 if args.spawn is not None else frozenset())
    except remote.SpawnError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    if args.child_timeout is not None and not args.child_timeout > 0:
        print("kmm: --child-timeout must be a positive number of seconds", file=sys.stderr)
        return 2
    spawned = dict(spawn=spawn, child_timeout=args.child_timeout,
                   child_startup=args.child_timeout,
                   warn=lambda text: print(f"kmm: {text}", file=sys.stderr))
    from kmm.tools.timeline import Recorder
    rec = Recorder(args.trace, args.timeline)
    trace = rec.sink
    rep = None
    try:
        if args.file.endswith(".py"):
            rep = runner.run_program(args.file, cpus=args.cpus, seed=args.seed or 1,
                                     mode=args.mode, trace_file=trace, daemons=plugins,
                                     **spawned)
            title = f"{args.file}: program on {len(rep['run']['tlb_misses'])} CPUs"
        else:
            sc = load_scenario(args.file)
            rep = runner.run_scenario(sc, seed=args.seed, mode=args.mode, trace_file=trace,
                                      cpus=args.cpus, daemons=plugins, **spawned)
            title = f"{args.file}: {sc.description}"
    except KernelBug as e:
        print(f"kmm: kernel BUG: {e}", file=sys.stderr)
        rec.finish_partial(args.file)
        return 3
    except remote.ChildDied as e:  # an oops: the report, and the trace so far is kept
        kept = f" (trace kept in {args.trace})" if args.trace else ""
        print(f"kmm: {e}{kept}", file=sys.stderr)
        rec.finish_partial(args.file)
        return 3
    except remote.SpawnError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    finally:
        if rep is None:  # bad input or an interruption: no timeline, no temporary file
            rec.discard()
    line = rec.finish(args.file, rep["zone"]["nr_free"])
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(summary(rep, title))
    if line:
        print(line, file=sys.stderr if args.json else sys.stdout)
    return 0


def daemon_names(plugins) -> list[str]:
    """What --spawn may name: the installed daemons and the plug-ins given."""
    from importlib.metadata import entry_points
    from kmm.daemon import ENTRY_POINT_GROUP
    names = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return names + [p.name for p in plugins if not isinstance(p, str)]


def cmd_oracle(args) -> int:
    from kmm.tools import oracle
    from kmm.tools.scenario import load_scenario
    if args.file.endswith(".py"):
        print(f"kmm oracle: {args.file}: a program cannot run on the host kernel; the "
              "oracle runs scenarios (.toml)", file=sys.stderr)
        return 2
    sc = load_scenario(args.file)
    try:
        rep = oracle.run_oracle(sc, waiting=lambda text: print(f"kmm oracle: {text}",
                                                               file=sys.stderr))
    except oracle.OracleError as e:
        print(f"kmm oracle: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(summary(rep, f"{args.file} on the host kernel: {sc.description}"))
    return 0


def cmd_daemons(args) -> int:
    """kmm daemons: the installed daemons (entry-point group kmm.daemons) and knobs."""
    from kmm import daemon
    rows = daemon.describe_daemons()
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    for r in rows:
        print(f"{r['name']:<12} {r['class']:<40} from {r['distribution']}")
        if "error" in r:
            print(f"  cannot load: {r['error']}")
        for k, v in r["knobs"].items():
            print(f"  {k} = {v}")
    return 0


def cmd_bench(args) -> int:
    from kmm.tools import bench
    if min(args.pages, args.thps, args.repeat) < 1:
        print("kmm bench: --pages, --thps and --repeat must be at least 1", file=sys.stderr)
        return 2
    if args.spawn:  # CPU actors in-process vs spawned (bench.spawn_bench)
        rep = bench.spawn_bench(args.program, repeat=args.repeat)
        print(json.dumps(rep, indent=1) if args.json else bench.format_spawn(rep))
        return 0
    rep = bench.run_bench(pages=args.pages, thps=args.thps, repeat=args.repeat,
                          schedules=max(args.schedules, 0))
    print(json.dumps(rep, indent=1) if args.json else bench.format_table(rep))
    return 0


def cmd_explore(args) -> int:
    """kmm explore: many schedules of a program, checked; a failure file on violation."""
    return _explore_cli(args)


def cmd_replay(args) -> int:
    """kmm replay: re-run a failure file's minimized interleaving exactly."""
    return _replay_cli(args)


def _explore_cli(args) -> int:
    import os
    from kmm.tools import explore as ex
    if not os.path.exists(args.program):
        print(f"kmm explore: {args.program}: no such file", file=sys.stderr)
        return 2
    if not args.program.endswith(".py") or not os.path.isfile(args.program):
        print(f"kmm explore: {args.program}: not a program file (.py with async def "
              "main(k))", file=sys.stderr)
        return 2
    if (args.schedules < 1 or args.jobs < 1 or (args.depth is not None and args.depth < 1)
            or (args.cpus is not None and args.cpus < 1)):
        print("kmm explore: --schedules, --jobs, --depth and --cpus must be at least 1",
              file=sys.stderr)
        return 2
    if args.start < 0:
        print("kmm explore: --start must be at least 0", file=sys.stderr)
        return 2
    try:
        from kmm.bugs import BUGS as known
    except ImportError:  # the injected-bug switches may not exist in this build
        known = None
    for name in args.inject or ():
        if known is not None and name not in known:
            print(f"kmm explore: --inject {name}: unknown bug (known: "
                  f"{', '.join(sorted(known))})", file=sys.stderr)
            return 2
    try:
        ex.focus_matcher(args.focus or [])
    except ValueError as e:
        print(f"kmm explore: --focus: {e}", file=sys.stderr)
        return 2
    cfg = ex.Config(program=args.program, mode=args.mode, seed=args.seed,
                    depth=args.depth or ex.DEFAULT_DEPTH[args.mode], cpus=args.cpus,
                    inject=list(args.inject or ()), check=args.check,
                    max_points=args.max_points or 0, focus=list(args.focus or ()))
    ex.runner.load_program(args.program)  # a broken program is one error line, early
    from kmm.tools import executors
    try:
        executor = executors.make(ray=args.ray) if args.ray is not None else None
        if args.ray not in (None, "auto"):
            executors.check_address(args.ray)
        prog = ex.Progress(args.schedules, enabled=not args.quiet)
        summ = ex.explore(cfg, args.schedules, jobs=args.jobs, all_=args.all,
                          determinism=args.check_determinism, progress=prog,
                          keep_going=args.keep_going, executor=executor,
                          start=args.start)
    except executors.ExecutorError as e:
        print(f"kmm explore: {e}", file=sys.stderr)
        return 2
    if args.ray is not None:
        args.jobs = summ.workers  # the summary line names the Ray CPUs that ran them
    if args.keep_going:
        return _keep_going_report(args, cfg, summ)
    print(_explored_line(args, summ))
    if summ.first is None:
        print("no violation")
        return 0
    print("violations: " + ", ".join(f"{k} {v}" for k, v in sorted(summ.violations.items())))
    v = summ.first_violation
    print(f"first failing schedule: {summ.first} (seed {args.seed + summ.first}), "
          f"{v['kind']} at event {v['seq']}")
    print("  " + v["message"].replace("\n", "\n  "))
    mode, seed, params = ex.schedule_params(cfg, summ.first)
    fail = ex.run_schedule(cfg, mode, seed, params, aim=True)
    # a name of its own unless --out names one (then it is replaced, whole or not at all)
    out = args.out or ex.failure_path(args.program, seed)
    if v["kind"] == "nondeterminism":
        ex.write_failure(out, cfg, summ.first, ex.Outcome(
            kind=v["kind"], message=v["message"], decisions=fail.decisions), None, None,
            replace=bool(args.out))
    else:
        sched, mini = ex.minimize(cfg, seed, fail, budget=args.minimize_budget)
        ex.write_failure(out, cfg, summ.first, fail, sched, mini, replace=bool(args.out))
        print(f"minimized: {fail.preemptions} preemptions -> {mini.preemptions} "
              f"({len(sched)} forced choices), {mini.kind} at event {mini.seq}")
    print(f"failure file: {out}   (kmm replay {out})")
    return 1


def _explored_line(args, summ) -> str:
    """What kmm explore ran: the program, the schedules, their seeds and the rate."""
    rate = summ.schedules / max(summ.seconds, 1e-9)
    lo = args.seed + args.start
    where = f"schedules {args.start}.., " if args.start else ""
    return (f"{args.program}: {summ.schedules} schedules ({args.mode}, {where}seeds {lo}.."
            f"{lo + summ.schedules - 1}), {rate:.1f} schedules/s on {args.jobs} "
            f"job{'s' if args.jobs > 1 else ''}")


def _keep_going_report(args, cfg, summ) -> int:
    """kmm explore --keep-going: every distinct (kind, site), its first schedule, one
    failure file each."""
    from kmm.tools import explore as ex
    print(f"{_explored_line(args, summ)}, bound {summ.max_points} points")
    if not summ.distinct:
        print("no violation")
        return 0
    print(f"{len(summ.distinct)} distinct violation{'s' if len(summ.distinct) > 1 else ''}"
          f" in {sum(d['count'] for d in summ.distinct)} schedules:")
    for k, d in enumerate(summ.distinct):
        path = (ex.keep_going_path(args.out, k) if args.out
                else ex.failure_path(args.program, ex.schedule_params(cfg, d["first"])[1]))
        print(f"[{k + 1}] {d['kind']} at {d['site']}: first schedule {d['first']} (seed "
              f"{args.seed + d['first']}), {d['count']} schedule"
              f"{'s' if d['count'] > 1 else ''}")
        msg = d["message"].splitlines()
        print("\n".join("    " + ln for ln in msg[:6]))
        ex.record_failure(cfg, d["first"], path, budget=args.minimize_budget,
                          violation=d, replace=bool(args.out))
        print(f"    failure file: {path}")
    return 1


def _replay_cli(args) -> int:
    from kmm.tools import explore as ex
    from kmm.tools.timeline import Recorder
    rec = Recorder(args.trace, args.timeline)
    done = False
    try:
        ok, head, out, why = ex.replay(args.file, trace_sink=rec.sink, last=args.last)
        done = True
    except ex.ExploreError as e:
        print(f"kmm replay: {e}", file=sys.stderr)
        return 2
    finally:
        if not done:  # bad input or an interruption: no timeline, no temporary file
            rec.discard()
    line = rec.finish(args.file)
    mini = head["minimized"] or {}
    print(f"{head['program']}: schedule {head['schedule']} of {head['mode']} seed "
          f"{head['base_seed']}, {mini.get('count', '?')} preemptions, inject "
          f"{', '.join(head.get('inject') or ()) or 'none'}")
    print(f"last {min(args.last, len(out.events))} events:")
    print(f"{'seq':>8} {'time':>14}  {'actor':<14} {'event':<26} touched")
    for ev in out.events[-args.last:] if args.last else ():
        print(ex.format_event(ev))
    if out.kind:
        print(f"violation: {out.kind} at event {out.seq}")
        msg = out.message.splitlines()
        print("\n".join("  " + ln for ln in msg[:12])
              + (f"\n  ... ({len(msg) - 12} more lines)" if len(msg) > 12 else ""))
    else:
        print("no violation this time")
    print(f"trace sha256 {out.digest[:16]}: {why}")
    if line:
        print(line)
    # as explore: 1 when the replayed run has a violation (reproduced or not), 0 if clean
    return 1 if out.kind else 0


def cmd_locks(args) -> int:
    """kmm locks: lock_stat, the lock-order graph and the waits of a run, from its trace."""
    from kmm.tools import locks
    try:
        st = locks.study_file(args.file)
    except locks.TraceError as e:
        print(f"kmm locks: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st.to_json(), indent=1) if args.json
          else locks.format_study(st, args.file))
    return 0


def cmd_bugs(args) -> int:
    """kmm bugs: the injectable bugs (kmm.bugs), each with the safeguard it removes."""
    import textwrap
    from kmm import bugs
    for name in bugs.BUGS:
        print(textwrap.fill(bugs.describe(name), width=96, subsequent_indent="    "))
        print()
    return 0


def cmd_mutate(args) -> int:
    """kmm mutate: the kill table of the source-level mutants (kmm.tools.mutate)."""
    from kmm.tools import mutate
    return mutate.cli(args)


def cmd_compare(args) -> int:
    from kmm.tools import compare
    return compare.main(args)


def cmd_sweep(args) -> int:
    """kmm sweep: a scenario or program over a grid of knobs and seeds (kmm.tools.sweep)."""
    from kmm.tools import sweep_cli
    return sweep_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command and its options (``kmm CMD --help``)."""
    p = argparse.ArgumentParser(
        prog="kmm", description="Emulate Linux 6.18 THP.",
        epilog="exit codes: 0 ok, 1 violation found or check failed, 2 bad input, 3 an "
               "actor died, 130 interrupted, 143 terminated")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario (.toml) or a program (.py)")
    r.add_argument("file")
    r.add_argument("--json", action="store_true", help="print the JSON report")
    r.add_argument("--seed", type=int, help="scheduler seed (default: the scenario's)")
    r.add_argument("--trace", help="write the event trace (JSON lines) here")
    r.add_argument("--timeline", metavar="FILE", help="write a timeline Perfetto's UI "
                   "opens (trace-event JSON, docs/timeline.md) here")
    r.add_argument("--mode", default="free", choices=("free", "random"),
                   help="scheduler: free (run each actor until it blocks) or random")
    r.add_argument("--cpus", type=int, help="emulated CPUs")
    r.add_argument("--daemon", action="append", metavar="MODULE:CLASS",
                   help="also run this plug-in daemon (repeatable); exec:COMMAND runs a "
                        "daemon speaking docs/wire.md on its stdin/stdout")
    r.add_argument("--spawn", metavar="LIST",
                   help="run these actors in child processes: comma-separated cpus, "
                        "daemons, or daemon names (khugepaged, kswapd, kcompactd, ...)")
    r.add_argument("--child-timeout", type=float, metavar="SECONDS",
                   help="a spawned actor silent this long (wall time) is reported as "
                        f"hung (default {60:g}); given, it also bounds a child's start "
                        "(the wait for its hello)")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("daemons", help="list the installed daemons and their knobs")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_daemons)
    o = sub.add_parser("oracle", help="run a scenario on the host kernel")
    o.add_argument("file")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_oracle)
    e = sub.add_parser("explore", help="run a program under many schedules, checked; "
                       "write a failure file on the first violation")
    e.add_argument("program", help="a program (.py with async def main(k))")
    e.add_argument("--schedules", type=int, default=1000, help="schedules to run (1000)")
    e.add_argument("--mode", default="random", choices=("random", "pct", "preempt"),
                   help="random (seeded), pct (with --depth) or preempt (bounded)")
    e.add_argument("--depth", type=int, help="pct bug depth (3) / preempt bound (2)")
    e.add_argument("--jobs", type=int, default=1, help="worker processes (1)")
    e.add_argument("--ray", metavar="auto|ADDRESS",
                   help="spread the schedules over a Ray cluster's CPUs as tasks (auto: "
                        "RAY_ADDRESS or a local cluster, else a fresh local Ray); needs "
                        "pip install 'kmm[ray]'")
    e.add_argument("--seed", type=int, default=1, help="schedule i uses seed SEED+i")
    e.add_argument("--start", type=int, default=0, metavar="I",
                   help="run schedules I .. I+SCHEDULES-1 of the exploration (0): ranges "
                        "of one campaign, run apart, run the same schedules as one run")
    e.add_argument("--inject", action="append", metavar="BUG",
                   help="turn on an injected bug (repeatable)")
    e.add_argument("--all", action="store_true", help="run every schedule and count")
    e.add_argument("--out", help="failure file, replaced if it exists (default: a new "
                   "FAILURE-<program>-<seed>.jsonl in the current directory)")
    e.add_argument("--check-determinism", action="store_true",
                   help="run every seed twice; a trace difference is a violation")
    e.add_argument("--check", default="op", choices=("point", "op", "end"),
                   help="when the full invariant checker runs (op)")
    e.add_argument("--cpus", type=int, help="emulated CPUs")
    e.add_argument("--minimize-budget", type=int, default=300,
                   help="most runs the minimizer may make (300)")
    e.add_argument("--quiet", action="store_true", help="no progress line")
    e.add_argument("--max-points", type=int, metavar="N",
                   help="bound of one schedule: a run past N points is a livelock "
                        "(default 50x the first run's points)")
    e.add_argument("--focus", action="append", metavar="EVENT|SITE",
                   help="aim the schedules: choices only at matching points (an event, "
                        "a lock site, lock:NAME, fn:NAME); repeatable")
    e.add_argument("--keep-going", action="store_true",
                   help="explore past violations; report each distinct (kind, site) "
                        "with its first schedule and one failure file each")
    e.set_defaults(fn=cmd_explore)
    rp = sub.add_parser("replay", help="re-run a failure file's interleaving exactly")
    rp.add_argument("file", help="a failure file written by kmm explore")
    rp.add_argument("--trace", help="write the replayed run's trace (JSON lines) here")
    rp.add_argument("--last", type=int, default=30, help="events to print (30)")
    rp.add_argument("--timeline", metavar="FILE", help="write the replayed run as a "
                    "timeline Perfetto's UI opens (docs/timeline.md) here")
    rp.set_defaults(fn=cmd_replay)
    from kmm.tools import plot, timeline
    timeline.add_parser(sub)
    plot.add_parser(sub)
    lk = sub.add_parser("locks", help="lock_stat, lock-order graph and waits of a traced run")
    lk.add_argument("file", help="a trace written by kmm run --trace (JSON lines)")
    lk.add_argument("--json", action="store_true", help="print the study as JSON")
    lk.set_defaults(fn=cmd_locks)
    bg = sub.add_parser("bugs", help="the injectable bugs for explore --inject, with the "
                        "kernel safeguard each removes")
    bg.set_defaults(fn=cmd_bugs)
    mu = sub.add_parser("mutate", help="remove THP safeguards from a copy of the source "
                        "(kmm.tools.mutate_catalogue); explore and test each mutant")
    mu.add_argument("names", nargs="*", help="mutants to run (kmm mutate --list)")
    mu.add_argument("--list", action="store_true", help="the catalogue, checked to apply")
    mu.add_argument("--all", action="store_true", help="every mutant of the catalogue")
    mu.add_argument("--budget", type=int, default=200,
                    help="schedules per program and mode (200)")
    mu.add_argument("--jobs", type=int, default=1, help="mutants at once (1)")
    mu.add_argument("--mode", action="append",
                    choices=("random", "pct", "pct-focus", "preempt"),
                    help="explore modes (random, pct, and pct-focus: pct aimed at the "
                         "mutated function)")
    mu.add_argument("--wide", action="store_true",
                    help="after the mutant's own programs, every race program")
    mu.add_argument("--no-tests", action="store_true", help="explore only")
    mu.add_argument("--timeout", type=float, default=300.0,
                    help="seconds one exploration may take before it counts as a hang")
    mu.add_argument("--json", metavar="FILE", help="write the kills as JSON")
    mu.add_argument("--quiet", action="store_true", help="no line per mutant on stderr")
    mu.set_defaults(fn=cmd_mutate)
    b = sub.add_parser("bench", help="measure the budgets of docs/budgets.md (emulated vs "
                       "host fault cost, start-up, spawned actors)")
    b.add_argument("--pages", type=int, default=10000, help="4 KiB faults (default 10000)")
    b.add_argument("--thps", type=int, default=256, help="2 MiB THP faults (default 256)")
    b.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    b.add_argument("--schedules", type=int, default=200,
                   help="explore schedules per race program for the schedules/s budget "
                   "(default 200; 0 skips it)")
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.add_argument("--spawn", action="store_true",
                   help="a program's throughput with CPUs in-process vs spawned, as a ratio")
    b.add_argument("--program", help="with --spawn: the program (default "
                   "workloads/redis_snapshot.py)")
    b.set_defaults(fn=cmd_bench)
    cp = sub.add_parser("compare", help="one access pattern under THP (never, madvise, "
                        "always, mTHP) and hugetlb, side by side")
    cp.add_argument("workload", help="a preset (buffer_pool, sequential) or a scenario "
                    "file whose mmap/touch/check/munmap steps are the pattern")
    cp.add_argument("--json", action="store_true", help="print the figures as JSON")
    cp.add_argument("--memory", type=lambda v: parse_size(v, file="--memory", step=None,
                                                          key="memory"),
                    default=512 << 20, help="emulated RAM (512MiB)")
    cp.set_defaults(fn=cmd_compare)
    sw = sub.add_parser("sweep", help="a scenario or program over a grid of knobs, machine "
                        "sizes, daemons and seeds; one table, CSV, JSON lines and plots")
    sw.add_argument("file", help="a scenario (.toml) or a program (.py)")
    sw.add_argument("--set", action="append", metavar="NAME=V1,V2,...",
                    help="a swept knob (thp.enabled, khugepaged.max_ptes_none, "
                         "thp.hugepages-64kB.enabled, ...) or machine size (machine.memory, "
                         "machine.cpus, machine.swap) and its values; repeatable")
    sw.add_argument("--seeds", default="1", help="seeds of each grid point: 1..20, 1,5,9 (1)")
    sw.add_argument("--daemon", metavar="NAME[,NAME...]",
                    help="swept plug-in daemon: an installed name (hawkeye) or module:Class; "
                         "none for no plug-in")
    sw.add_argument("--mode", default="free", choices=("free", "random"),
                    help="scheduler, as kmm run (free)")
    sw.add_argument("--jobs", type=int, default=1, help="local worker processes (1)")
    sw.add_argument("--ray", metavar="auto|ADDRESS",
                    help="run on a Ray cluster as tasks (auto: RAY_ADDRESS or a local "
                         "cluster, else a fresh local Ray); needs pip install 'kmm[ray]'")
    sw.add_argument("--out", metavar="DIR", help="write sweep.csv, sweep.jsonl and the plots here")
    sw.add_argument("--plot", nargs="+", action="extend", metavar="FIGURE",
                    help="figures to plot against the swept knob: rss, AnonHugePages, a "
                         "vmstat counter (thp_fault_alloc), a report path "
                         "(khugepaged.pages_collapsed)")
    sw.add_argument("--x", metavar="NAME", help="the plots' x axis (default: the first "
                    "--set with several values)")
    sw.add_argument("--runs", action="store_true",
                    help="the terminal table with one row per run (default: per grid point)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    sw.set_defaults(fn=cmd_sweep)
    for sp in (r, e, rp, o, b, mu, cp, sw):
        sp.add_argument("--traceback", action="store_true",
                        help="on an error, print the full Python stack (kmm's frames too)")
    return p


EXIT_CODES = {0: "ok", 1: "violation found or check failed (a program's own error too)",
              2: "bad input (scenario, program, option, failure file)",
              3: "an actor died (kernel BUG, a daemon or spawned actor failed)",
              130: "interrupted (SIGINT)", 143: "terminated (SIGTERM)"}


def main(argv: list[str] | None = None) -> int:
    """The ``kmm`` command. Exit codes: EXIT_CODES (also in the README)."""
    from kmm.tools import interrupt
    p = build_parser()
    args = p.parse_args(argv)
    command = argv is None  # the `kmm` process itself (not a call from a test)
    if command:
        interrupt.become_subreaper()
    saved = interrupt.install()
    try:
        with _watched(args):  # run, replay: a progress bar on a terminal (long runs)
            rc = _dispatch(args)
        if not interrupt.caught():
            sys.stdout.flush()
    except BrokenPipeError:  # `kmm run ... | head`: the reader has gone; so do we
        if command:
            _quiet_stdout()
        rc = 0
    except BaseException:  # noqa: BLE001 - an interruption leaves as one line, below
        if not interrupt.caught():
            raise
        rc = 0
    finally:
        _reap()
        if command:
            interrupt.reap_children()
        interrupt.restore(saved)
    if interrupt.caught():
        if command:
            _quiet_stdout()
        print(("\n" if sys.stderr.isatty() else "") + f"kmm: {interrupt.message()}",
              file=sys.stderr)
        return interrupt.exit_code()
    return rc


def _watched(args):
    """kmm.tools.progress.watch for ``kmm run`` and ``kmm replay`` (the replay's total:
    the events its failure file recorded); nothing for the other commands."""
    import contextlib
    from kmm.tools import progress
    if args.cmd == "run":
        return progress.watch(f"run {args.file}")
    if args.cmd == "replay":
        return progress.watch(f"replay {args.file}", _recorded_events(args.file))
    return contextlib.nullcontext()


def _recorded_events(path: str) -> int | None:
    """The event count a failure file recorded for its minimized run, if it says."""
    from kmm.tools import explore as ex
    try:
        head, _ = ex.read_failure(path)
        return int((head.get("minimized") or {}).get("events") or 0) or None
    except Exception:  # noqa: BLE001 - a bad file is replay's to report, in one line
        return None


def _quiet_stdout() -> None:
    """No error at exit for output nobody reads (a closed pipe, an interruption)."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _reap() -> None:
    """However the command ends, no spawned actor's process outlives it."""
    mod = sys.modules.get("kmm.runtime.remote")
    if mod is not None:
        mod.reap_all()


def _dispatch(args) -> int:
    """Run the sub-command; bad input and user-code errors are one line (plus the
    user's own frames), exit codes as EXIT_CODES."""
    from kmm.tools import errors
    try:
        return args.fn(args)
    except ScenarioError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    except errors.UserCodeError as e:
        if getattr(args, "traceback", False):
            import traceback
            traceback.print_exception(e.error, file=sys.stderr)
        print(f"kmm: {e}", file=sys.stderr)
        if not getattr(args, "traceback", False):
            frames = e.frames()
            if frames:  # the user's own stack, when the line names only its top
                print(frames, file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"kmm: {e.filename}: no such file", file=sys.stderr)
        return 2
