#!/usr/bin/env python3
"""The table of a race campaign (scripts/race_campaign.sh): one row per program, one
column per mode, each cell the schedules run of N, clean or its violations, and the
rate on one job; whole cells and CHUNK ranges alike, from explore's logs in OUT.

    scripts/race_campaign_table.py [OUT] [N]      (defaults: campaign/, 10000)
"""

from __future__ import annotations

import pathlib
import re
import sys

MODES = ("random", "pct", "preempt")
# explore's first line: "<program>: S schedules (<mode>, [schedules I.., ]seeds A..B),
# R schedules/s on 1 job, ..."
HEAD = re.compile(r": (\d+) schedules \((\w+), (?:schedules \d+\.\., )?seeds (\d+)\.\.(\d+)\)"
                  r", ([\d.]+) schedules/s")
VIOLATIONS = re.compile(r"^(\d+) distinct violations? in (\d+) schedules", re.M)


def cells(out: pathlib.Path, n: int) -> dict[tuple[str, str], dict]:
    """(program, mode) -> schedules run, seconds, violating schedules, distinct kinds."""
    got: dict[tuple[str, str], dict] = {}
    for log in sorted(out.glob("*.log")):
        parts = log.name[:-len(".log")].split(".")
        if len(parts) not in (3, 4) or parts[2] != str(n):
            continue
        program, mode = parts[:2]
        if len(parts) == 4 and (out / f"{program}.{mode}.{n}.done").exists():
            continue  # the cell also ran whole: that run counts
        text = log.read_text()
        head = HEAD.search(text)
        done = log.with_suffix(".done")
        if head is None or not done.exists():
            continue  # a run that did not finish (or is running) counts for nothing
        c = got.setdefault((program, mode), {"schedules": 0, "seconds": 0.0,
                                             "bad": 0, "distinct": 0})
        s, rate = int(head[1]), float(head[5])
        c["schedules"] += s
        c["seconds"] += s / rate if rate else 0.0
        v = VIOLATIONS.search(text)
        if v:
            c["distinct"] += int(v[1])
            c["bad"] += int(v[2])
    return got


def table(out: pathlib.Path, n: int) -> str:
    got = cells(out, n)
    programs = sorted({p for p, _ in got} | {
        p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "workloads")
        .glob("race_*.py")})
    rows = ["| program | " + " | ".join(MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    for p in programs:
        row = []
        for m in MODES:
            c = got.get((p, m))
            if c is None:
                row.append("not run")
                continue
            what = (f"{c['bad']} violating ({c['distinct']} distinct)" if c["bad"]
                    else "clean")
            ran = "" if c["schedules"] >= n else f", {c['schedules']:,} of {n:,}"
            rate = c["schedules"] / c["seconds"] if c["seconds"] else 0.0
            row.append(f"{what}{ran}, {rate:.1f}/s")
        rows.append(f"| {p} | " + " | ".join(row) + " |")
    full = sum(1 for c in got.values() if c["schedules"] >= n)
    clean = sum(1 for c in got.values() if c["schedules"] >= n and not c["bad"])
    rows.append(f"\n{full} of {len(programs) * len(MODES)} cells ran {n:,} schedules, "
                f"{clean} of them clean.")
    return "\n".join(rows)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(table(pathlib.Path(args[0] if args else "campaign"),
                int(args[1]) if len(args) > 1 else 10000))
