"""Draw the README's pictures into docs/img/ (run from the repository root):

    python scripts/readme_pictures.py

1. ``refill-memory.png``: ``kmm plot`` of workloads/khugepaged_dontneed_refill.py, Rss,
   AnonHugePages and free memory over emulated time;
2. ``pressure-faults.png`` and ``pressure-locks.png``: ``kmm plot`` of
   workloads/memory_pressure.py under the random scheduler (seed 3), fault latencies and
   lock waits/holds;
3. ``race-timeline.png``: the timeline ``kmm replay --timeline`` writes for the injected
   huge_fault_no_pmd_none_recheck race, drawn here from the trace-event file itself
   (tracks, nested slices, flows, counters). It is a preview of the file drawn with
   matplotlib, not a screenshot of Perfetto's UI (not reachable from this machine).

Every picture is deterministic: the runs are seeded and the PNGs carry no date.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
W = ROOT / "workloads"


def kmm(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmm", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True)


def run_and_plot(tmp: pathlib.Path, program: str, name: str, *extra: str) -> list[str]:
    trace, report = tmp / f"{name}.jsonl", tmp / f"{name}.json"
    r = kmm("run", str(W / program), "--json", "--trace", str(trace), *extra)
    if r.returncode:
        sys.exit(f"kmm run {program}: {r.stderr}")
    report.write_text(r.stdout)
    r = kmm("plot", str(trace), "--report", str(report), "-o", str(tmp / name))
    if r.returncode:
        sys.exit(f"kmm plot: {r.stderr}")
    return r.stdout.split()


def draw_timeline(path: pathlib.Path, out: pathlib.Path, title: str) -> None:
    """A trace-event file drawn as Perfetto lays it out: a row per thread (grouped by
    process), slices stacked by nesting depth, flows as arrows, counters below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evs = json.loads(path.read_text())["traceEvents"]
    proc = {e["pid"]: e["args"]["name"] for e in evs if e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
              if e.get("name") == "thread_name"}
    xs = [e for e in evs if e["ph"] == "X"]
    rows = sorted({(e["pid"], e["tid"]) for e in xs})
    depth: dict[int, int] = {}
    for row in rows:
        stack: list[float] = []
        for i, e in sorted(((i, e) for i, e in enumerate(xs) if (e["pid"], e["tid"]) == row),
                           key=lambda p: (p[1]["ts"], -p[1]["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            depth[i] = len(stack)
            stack.append(end)
    nd = max(depth.values(), default=0) + 1
    y = {row: n for n, row in enumerate(rows)}
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 8})
    fig, (ax, cx) = plt.subplots(2, 1, figsize=(13, 8), sharex=True,
                                 gridspec_kw={"height_ratios": [5, 1]})
    colours = {}
    palette = plt.get_cmap("tab20").colors
    h = 0.8 / nd
    for i, e in enumerate(xs):
        c = colours.setdefault(e["name"].split(" ")[0] if e["cat"] != "function"
                               else e["name"], palette[len(colours) % len(palette)])
        top = y[(e["pid"], e["tid"])] - 0.4 + depth[i] * h
        ax.broken_barh([(e["ts"], max(e["dur"], 0.05))], (top, h * 0.95), color=c)
        if e["dur"] > 6:
            ax.text(e["ts"] + 0.5, top + h / 2, e["name"], va="center", fontsize=6,
                    clip_on=True)
    for e in evs:  # tracepoints: a tick under their thread's slices
        if e["ph"] == "i":
            ax.plot([e["ts"]], [y[(e["pid"], e["tid"])] + 0.42], marker="|",
                    color="black", markersize=6)
    flows = {}
    for e in evs:
        if e["ph"] in "sf":
            flows.setdefault(e["id"], {})[e["ph"]] = e
    for f in flows.values():
        s, t = f["s"], f["f"]
        ax.annotate("", xy=(t["ts"], y[(t["pid"], t["tid"])]),
                    xytext=(s["ts"], y[(s["pid"], s["tid"])]),
                    arrowprops={"arrowstyle": "->", "color": "crimson"})
    ax.set_yticks(range(len(rows)), [f"{proc[p]} / {thread[(p, t)]}" for p, t in rows])
    ax.invert_yaxis()
    ax.set_title(title)
    counters: dict[str, list] = {}  # "NAME KEY", as Perfetto names counter tracks
    for e in evs:
        if e["ph"] == "C":
            for key, v in e["args"].items():
                counters.setdefault(f"{e['name']} {key}", []).append((e["ts"], v))
    end = max(e["ts"] + e["dur"] for e in xs)
    for name in ("AnonHugePages kB", "vmstat thp_fault_alloc"):
        pts = counters.get(name, [(0, 0)])
        scale = 1 / 1024 if name.endswith("kB") else 1
        cx.step([t for t, _ in pts] + [end], [v * scale for _, v in pts] + [pts[-1][1] * scale],
                where="post", label=name.replace(" kB", " (MiB)").replace("vmstat ", ""))
    cx.legend(loc="upper left")
    cx.set_xlabel("emulated time (us)")
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        made = run_and_plot(tmp, "khugepaged_dontneed_refill.py", "refill")
        (IMG / "refill-memory.png").write_bytes(pathlib.Path(made[0]).read_bytes())
        made = run_and_plot(tmp, "memory_pressure.py", "pressure", "--mode", "random",
                            "--seed", "3")
        for p in made[1:]:
            (IMG / pathlib.Path(p).name).write_bytes(pathlib.Path(p).read_bytes())
        fail = tmp / "race.jsonl"
        kmm("explore", str(W / "race_fault_fault.py"), "--quiet", "--schedules", "20",
            "--inject", "huge_fault_no_pmd_none_recheck", "--out", str(fail), cwd=tmp)
        r = kmm("replay", str(fail), "--last", "0", "--timeline", str(tmp / "race.json"),
                cwd=tmp)
        if "reproduced" not in r.stdout:
            sys.exit(f"kmm replay: {r.stdout}{r.stderr}")
        draw_timeline(tmp / "race.json", IMG / "race-timeline.png",
                      "kmm replay --timeline of race_fault_fault.py with "
                      "huge_fault_no_pmd_none_recheck injected (drawn from the file, "
                      "not Perfetto)")
    for p in sorted(IMG.glob("*.png")):
        print(p.relative_to(ROOT))


if __name__ == "__main__":
    main()
