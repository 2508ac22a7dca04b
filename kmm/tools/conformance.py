"""Compare two reports (docs/report-format.md): the oracle's and the emulator's.

``compare(expected, actual)`` lists every difference as a readable line. Everything must
be equal, except the counters of ``kmm.vmstat.PER_PASS_EVENTS``, which grow with every
khugepaged pass and so compare only as zero / non-zero.

A scenario with swap extends the report with ``events`` (pswpin / pswpout over the run)
and each region with ``swap_kb``; ``events`` is compared whenever either report has it,
and ``swap_kb`` like every other region field.
"""

from __future__ import annotations

import json

from kmm.vmstat import PER_PASS_EVENTS

_MISSING = object()


def _show(v: object) -> str:
    if v is _MISSING:
        return "nothing"
    return json.dumps(v, sort_keys=False)


def _zero(v: object) -> str:
    return "0" if v == 0 else "non-zero"


def _vmstat(expected: dict, actual: dict) -> list[str]:
    out = []
    for name in list(expected) + [n for n in actual if n not in expected]:
        e, a = expected.get(name, _MISSING), actual.get(name, _MISSING)
        if e is _MISSING or a is _MISSING:
            out.append(f"vmstat.{name}: expected {_show(e)}, got {_show(a)}")
        elif name in PER_PASS_EVENTS and isinstance(e, int) and isinstance(a, int):
            if (e == 0) != (a == 0):
                out.append(f"vmstat.{name}: expected {_zero(e)} ({e}), got {a}")
        elif e != a:
            out.append(f"vmstat.{name}: expected {_show(e)}, got {_show(a)}")
    return out


def _regions(expected: dict, actual: dict) -> list[str]:
    out = []
    for key in list(expected) + [k for k in actual if k not in expected]:
        e, a = expected.get(key, _MISSING), actual.get(key, _MISSING)
        if e is _MISSING:
            out.append(f"regions.{key}: unexpected region {_show(a)}")
        elif a is _MISSING:
            out.append(f"regions.{key}: missing (expected {_show(e)})")
        elif isinstance(e, dict) and isinstance(a, dict):
            for f in list(e) + [f for f in a if f not in e]:
                ef, af = e.get(f, _MISSING), a.get(f, _MISSING)
                if ef != af:
                    out.append(f"regions.{key}.{f}: expected {_show(ef)}, got {_show(af)}")
        elif e != a:
            out.append(f"regions.{key}: expected {_show(e)}, got {_show(a)}")
    return out


def _steps(expected: list, actual: list) -> list[str]:
    out = []
    if len(expected) != len(actual):
        out.append(f"steps: expected {len(expected)} results, got {len(actual)}")
    for i in range(max(len(expected), len(actual))):
        e = expected[i] if i < len(expected) else _MISSING
        a = actual[i] if i < len(actual) else _MISSING
        op = e.get("op") if isinstance(e, dict) else a.get("op") if isinstance(a, dict) else "?"
        where = f"steps[{i}] (step {i + 1}, {op})"
        if e is _MISSING or a is _MISSING or not (isinstance(e, dict) and isinstance(a, dict)):
            if e != a:
                out.append(f"{where}: expected {_show(e)}, got {_show(a)}")
            continue
        for f in list(e) + [f for f in a if f not in e]:
            ef, af = e.get(f, _MISSING), a.get(f, _MISSING)
            if ef != af:
                out.append(f"{where}.{f}: expected {_show(ef)}, got {_show(af)}")
    return out


def _events(expected: dict, actual: dict) -> list[str]:
    out = []
    for name in list(expected) + [n for n in actual if n not in expected]:
        e, a = expected.get(name, _MISSING), actual.get(name, _MISSING)
        if e != a:
            out.append(f"events.{name}: expected {_show(e)}, got {_show(a)}")
    return out


def _mthp(expected: dict | None, actual: dict) -> list[str]:
    """The ``mthp`` extension. A recording made before it existed has no
    ``mthp`` key; sizes below PMD size were "never" on the host then, so only those must
    not have moved in the emulator (PMD-size stats are not compared against it)."""
    out = []
    if expected is None:
        pmd = "hugepages-2048kB"
        for folder, stats in actual.items():
            if folder != pmd:
                out.append(f"mthp.{folder}: expected nothing, got {_show(stats)}")
        return out
    for folder in list(expected) + [f for f in actual if f not in expected]:
        e, a = expected.get(folder, {}), actual.get(folder, {})
        for n in list(e) + [n for n in a if n not in e]:
            if e.get(n, 0) != a.get(n, 0):
                out.append(f"mthp.{folder}.{n}: expected {e.get(n, 0)}, got {a.get(n, 0)}")
    return out


CONTRACT = ("vmstat", "regions", "steps")
# compared when either report has them
EXTENSIONS = ("events", "meminfo", "hugetlb_events", "migrate_events")


def compare(expected: dict, actual: dict) -> list[str]:
    """Differences between two reports, one readable line each; [] when they agree."""
    out: list[str] = []
    # the contract of docs/report-format.md and the compared extensions; other top-level
    # keys (the emulator's "locks", "zone" and "run") extend a report and are not compared
    # migrate_events only where the recording has it: recordings made before it existed
    # have none, though the emulator's compaction may migrate in them
    extensions = [x for x in EXTENSIONS
                  if x in expected or (x in actual and x != "migrate_events")]
    for section in (*CONTRACT, *extensions):
        e, a = expected.get(section, _MISSING), actual.get(section, _MISSING)
        if e is _MISSING or a is _MISSING:
            out.append(f"{section}: expected {_show(e)}, got {_show(a)}")
        elif section == "vmstat" and isinstance(e, dict) and isinstance(a, dict):
            out += _vmstat(e, a)
        elif section == "regions" and isinstance(e, dict) and isinstance(a, dict):
            out += _regions(e, a)
        elif section == "steps" and isinstance(e, list) and isinstance(a, list):
            out += _steps(e, a)
        elif section in EXTENSIONS and isinstance(e, dict) \
                and isinstance(a, dict):
            out += _events(e, a)
        elif e != a:
            out.append(f"{section}: expected {_show(e)}, got {_show(a)}")
    if "mthp" in expected or "mthp" in actual:
        out += _mthp(expected.get("mthp"), actual.get("mthp", {}))
    return out
