"""The ``kmm`` command: run, oracle."""

from __future__ import annotations

import argparse
import json
import sys

from kmm.tools.scenario import ScenarioError


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
    other = {k: v for k, v in (report.get("vm_events") or {}).items() if v}
    if other:
        out.append("\nother vm events (swap, reclaim, compaction, faults)")
        out.extend(f"  {k:<28} {v}" for k, v in other.items())
    swap = any("swap_kb" in r for r in report["regions"].values())
    out.append("\nregions                           Rss      AnonHugePages"
               + ("      Swap" if swap else ""))
    for name, r in report["regions"].items():
        out.append(f"  {name:<28} {r['rss_kb']:>8} kB {r['anon_huge_kb']:>8} kB"
                   + (f" {r.get('swap_kb', 0):>8} kB" if swap else ""))
    if not report["regions"]:
        out.append("  (no live process has a region)")
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
    if report.get("result") is not None:
        out.append(f"\nprogram result: {report['result']}")
    run = report.get("run")
    if run:
        out.append(f"\nrun: seed {run['seed']}, {run['mode']} scheduler, {run['events']} events, "
                   f"{run['emulated_ns'] / 1e6:.3f} ms emulated, trace sha256 "
                   f"{run['trace_sha256'][:16]}")
    return "\n".join(out)


def cmd_run(args) -> int:
    from kmm.machine import KernelBug
    from kmm.tools import runner
    from kmm.tools.scenario import load_scenario
    from kmm import daemon
    try:
        plugins = [daemon.load_daemon_spec(spec) for spec in args.daemon or ()]
    except daemon.DaemonLoadError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    trace = open(args.trace, "w") if args.trace else None
    try:
        if args.file.endswith(".py"):
            rep = runner.run_program(args.file, cpus=args.cpus, seed=args.seed or 1,
                                     mode=args.mode, trace_file=trace, daemons=plugins)
            title = f"{args.file}: program on {len(rep['run']['tlb_misses'])} CPUs"
        else:
            sc = load_scenario(args.file)
            rep = runner.run_scenario(sc, seed=args.seed, mode=args.mode, trace_file=trace,
                                      cpus=args.cpus, daemons=plugins)
            title = f"{args.file}: {sc.description}"
    except KernelBug as e:
        print(f"kmm: kernel BUG: {e}", file=sys.stderr)
        return 3
    finally:
        if trace:
            trace.close()
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(summary(rep, title))
    return 0


def cmd_oracle(args) -> int:
    from kmm.tools import oracle
    from kmm.tools.scenario import load_scenario
    sc = load_scenario(args.file)
    try:
        rep = oracle.run_oracle(sc)
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
    rep = bench.run_bench(pages=args.pages, thps=args.thps, repeat=args.repeat)
    print(json.dumps(rep, indent=1) if args.json else bench.format_table(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kmm", description="Emulate Linux 6.18 THP.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario (.toml) or a program (.py)")
    r.add_argument("file")
    r.add_argument("--json", action="store_true", help="print the JSON report")
    r.add_argument("--seed", type=int, help="scheduler seed (default: the scenario's)")
    r.add_argument("--trace", help="write the event trace (JSON lines) here")
    r.add_argument("--mode", default="free", choices=("free", "random"),
                   help="scheduler: free (run each actor until it blocks) or random")
    r.add_argument("--cpus", type=int, help="emulated CPUs")
    r.add_argument("--daemon", action="append", metavar="MODULE:CLASS",
                   help="also run this plug-in daemon (repeatable)")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("daemons", help="list the installed daemons and their knobs")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_daemons)
    o = sub.add_parser("oracle", help="run a scenario on the host kernel")
    o.add_argument("file")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_oracle)
    b = sub.add_parser("bench", help="measure the design.md section 6 budgets")
    b.add_argument("--pages", type=int, default=10000, help="4 KiB faults (default 10000)")
    b.add_argument("--thps", type=int, default=256, help="2 MiB THP faults (default 256)")
    b.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ScenarioError as e:
        print(f"kmm: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"kmm: {e.filename}: no such file", file=sys.stderr)
        return 2
