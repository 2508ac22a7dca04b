"""``kmm compare WORKLOAD``: one access pattern under THP and under hugetlb, side by side.

The pattern is a scenario's mmap / touch / check / munmap steps (a scenario file, or a
built-in preset), replayed once per *configuration*:

- ``thp_never``   THP disabled (enabled=never): 4 KiB pages only;
- ``thp_madvise`` enabled=madvise and MADV_HUGEPAGE on every region (the common
                  advice for applications that want THP);
- ``thp_always``  enabled=always;
- ``mthp``        multi-size THP, 64 KiB folios (hugepages-64kB/enabled=always,
                  PMD-size off): only where this tree has per-size knobs (else the
                  column is left out, and the table says so);
- ``hugetlb``     every region MAP_HUGETLB from a pool sized to the working set.

For each it measures page faults, TLB misses (page walks), Rss plus hugetlb memory and
the bloat over the bytes actually touched, emulated time in the pattern's faults and
accesses and in one khugepaged pass, and then memory pressure: reclaim of everything
reclaimable with swap on (memory.force_empty at swappiness 60) shows what each kind of
memory does (swapped out whole, split, or kept); and a hugetlb pool half the working
set shows hugetlb's failure modes (mmap ENOMEM with reservations, SIGBUS with
MAP_NORESERVE). Presets: ``buffer_pool`` (a database buffer pool following the usual
vendor advice: THP disabled vs hugetlb vs THP madvise) and ``sequential``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kmm import hugetlb, sysfs
from kmm.tools.scenario import PMD_SIZE, REGION_BASE, Scenario, Step, load_scenario, round_up

MiB = 1 << 20
CONFIGS = ("thp_never", "thp_madvise", "thp_always", "mthp", "hugetlb")
PATTERN_OPS = ("mmap", "touch", "check", "munmap")


def _step(i: int, op: str, **kw) -> Step:
    return Step(index=i, op=op, **kw)


def _preset_steps(name: str) -> tuple[str, list[Step], tuple[str, ...]]:
    if name == "buffer_pool":
        size = 64 * MiB
        steps = [
            _step(1, "mmap", region="pool", size=size, addr=REGION_BASE),
            # warm-up: the database loads its working set, 40 MiB of the pool
            _step(2, "touch", region="pool", length=40 * MiB, value=1),
            # queries: scattered reads over the loaded part (one per 36 / 52 KiB)
            _step(3, "check", region="pool", length=40 * MiB, value=1, stride=36 << 10),
            _step(4, "check", region="pool", offset=20 << 10, length=40 * MiB, value=1,
                  stride=52 << 10),
            # updates: one page in every other 2 MiB block of the whole pool, the
            # unloaded part too (where huge pages bloat)
            _step(5, "touch", region="pool", value=1, stride=4 * MiB),
        ]
        return ("a 64 MiB database buffer pool: warm-up, scattered reads, updates "
                "(vendor advice: THP disabled, or hugetlb; some use THP madvise)",
                steps, ("thp_never", "hugetlb", "thp_madvise"))
    if name == "sequential":
        size = 16 * MiB
        steps = [_step(1, "mmap", region="a", size=size, addr=REGION_BASE),
                 _step(2, "touch", region="a"), _step(3, "check", region="a")]
        return "16 MiB written then read sequentially", steps, CONFIGS
    raise KeyError(name)


PRESETS = ("buffer_pool", "sequential")


def load_pattern(workload: str) -> tuple[str, list[Step], tuple[str, ...]]:
    """A preset name, or a scenario file whose mmap/touch/check/munmap steps of the
    main process are the pattern (other steps and madvise are the configurations')."""
    if workload in PRESETS:
        return _preset_steps(workload)
    sc = load_scenario(workload)
    steps = [s for s in sc.steps if s.op in PATTERN_OPS and s.proc == "main"]
    return sc.description, steps, CONFIGS


MTHP_KNOB = "hugepages-64kB/enabled"  # the mTHP column: 64 KiB anonymous THPs


def mthp_available() -> bool:
    """Per-size (mTHP) anon knobs in this tree's sysfs model."""
    return MTHP_KNOB in sysfs.KNOBS


def configure(steps: list[Step], config: str, pool: int | None = None,
              noreserve: bool = False) -> tuple[dict, dict | None, list[Step]]:
    """(THP knobs, [hugetlb] pool, steps) of one configuration."""
    regions = {s.region: s.size for s in steps if s.op == "mmap"}
    need = sum(round_up(size, PMD_SIZE) // PMD_SIZE for size in regions.values())
    knobs: dict[str, Any] = {"enabled": "madvise"}
    out: list[Step] = []
    hpool = None
    for s in steps:
        if config == "hugetlb" and s.op == "mmap":
            s = dataclasses.replace(s, backing="hugetlb", noreserve=noreserve)
        out.append(s)
        if config == "thp_madvise" and s.op == "mmap":
            out.append(Step(index=0, op="madvise", region=s.region, advice="hugepage"))
    if config == "thp_never":
        knobs["enabled"] = "never"
    elif config == "thp_always":
        knobs["enabled"] = "always"
    elif config == "mthp":  # 64 KiB folios at every fault, no PMD-size THP
        knobs["enabled"] = "never"
        knobs[MTHP_KNOB] = "always"
    elif config == "hugetlb":
        knobs["enabled"] = "never"
        hpool = {"nr_hugepages": need if pool is None else pool}
    out = [dataclasses.replace(s, index=i) for i, s in enumerate(out, 1)]
    return knobs, hpool, out


def touched_bytes(steps: list[Step]) -> int:
    """Distinct 4 KiB pages the pattern touches (its useful memory), in bytes."""
    from kmm.tools.scenario import step_range
    sizes = {s.region: s.size for s in steps if s.op == "mmap"}
    pages: set[tuple[str, int]] = set()
    for s in steps:
        if s.op in ("touch", "check"):
            lo, hi = step_range(s, sizes[s.region])
            pages.update((s.region, a >> 12) for a in range(lo, hi, s.stride))
    return len(pages) * 4096


def run_config(steps: list[Step], config: str, *, memory: int, pool: int | None = None,
               noreserve: bool = False, pressure: bool = True,
               fragmented: bool = False) -> dict[str, Any]:
    """Run the pattern under one configuration on a fresh machine with swap; return
    the measured figures. ``fragmented``: before anything (the hugetlb pool too), one
    unmovable page is pinned in every 2 MiB block, so no 2 MiB page can be had."""
    from kmm import vmscan_node
    from kmm.machine import MachineConfig
    from kmm.tools import runner
    from kmm.workload import Kernel
    knobs, hpool, csteps = configure(steps, config, pool, noreserve)
    size = sum(s.size for s in steps if s.op == "mmap")
    cfg = MachineConfig(memory=memory, swap=round_up(2 * size, MiB), cpus=1, seed=1)
    sc = Scenario(path=f"<compare {config}>", description="", machine=cfg, knobs=knobs,
                  steps=tuple(csteps), hugetlb=hpool)
    m = runner.build_machine(cfg, seed=1, mode="free", knobs=knobs)
    k = Kernel(m)
    fig: dict[str, Any] = {"results": []}

    def region_kb() -> tuple[int, int, int]:
        rss = anon_huge = htlb = 0
        for name, r in runner.report(m, k, [])["regions"].items():
            rss += r["rss_kb"]
            anon_huge += r["anon_huge_kb"]
            htlb += r.get("private_hugetlb_kb", 0) + r.get("shared_hugetlb_kb", 0)
        return rss, anon_huge, htlb

    async def driver() -> None:
        await runner.start_daemons(k)
        if fragmented:
            await fragment(k)
        await k.process("main")
        thp_on = knobs["enabled"] != "never"
        if thp_on:
            await runner.khugepaged_setup(k)
        await runner.hugetlb_setup(m, hpool)
        ev0 = dict(m.vmstat.events)
        tlb0 = sum(m.tlb_stats)
        t_access = 0
        for step in csteps:
            t0 = m.sched.now
            res = await runner.run_step(k, step, sc)
            if step.op in ("touch", "check"):
                t_access += m.sched.now - t0
            fig["results"].append(res)
        fig["page_faults"] = m.vmstat.events["pgfault"] - ev0["pgfault"]
        fig["tlb_misses"] = sum(m.tlb_stats) - tlb0
        fig["fault_access_ms"] = t_access / 1e6
        t0 = m.sched.now
        if thp_on:
            await runner.khugepaged_step(m, 1)
        fig["khugepaged_ms"] = (m.sched.now - t0) / 1e6 if thp_on else 0.0
        fig["thp_fault_alloc"] = m.vmstat.events["thp_fault_alloc"] - ev0["thp_fault_alloc"]
        fig["thp_fault_fallback"] = (m.vmstat.events["thp_fault_fallback"]
                                     - ev0["thp_fault_fallback"])
        fig["collapsed"] = (m.vmstat.events["thp_collapse_alloc"]
                            - ev0["thp_collapse_alloc"])
        fig["rss_kb"], fig["anon_huge_kb"], fig["hugetlb_kb"] = region_kb()
        fig["meminfo"] = hugetlb.hugetlb_report_meminfo(m)
        if pressure:
            ev1 = dict(m.vmstat.events)
            await vmscan_node.mem_cgroup_force_empty(m, swappiness=60)
            rss, _, htlb = region_kb()
            fig["pressure"] = {
                "rss_kb_after": rss, "hugetlb_kb_after": htlb,
                "swapped_kb": (m.vmstat.events["pswpout"] - ev1["pswpout"]) * 4,
                "thp_swpout": m.vmstat.events["thp_swpout"] - ev1["thp_swpout"],
                "thp_split_page": (m.vmstat.events["thp_split_page"]
                                   - ev1["thp_split_page"]),
            }

    runner.run_machine(m, driver)
    fig["resident_kb"] = fig["rss_kb"] + fig["hugetlb_kb"]
    fig["bloat_kb"] = fig["resident_kb"] - touched_bytes(steps) // 1024
    return fig


async def fragment(k) -> None:
    """Pin one unmovable page in every 2 MiB block (compaction cannot move it)."""
    pinned = []
    while True:
        pfn = await k.alloc_kernel_pages(0, reserves=True)
        if pfn < 0:
            break
        pinned.append(pfn)
    for pfn in pinned:
        if pfn % 512 != 511:
            await k.free_kernel_pages(pfn)


def _fragmented(steps: list[Step], configs) -> dict[str, str]:
    """Each configuration on a machine with no free 2 MiB block left: THP falls back to
    4 KiB pages, a hugetlb pool cannot be allocated at run time."""
    size = sum(s.size for s in steps if s.op == "mmap")
    memory = round_up(size + size // 2, PMD_SIZE) + 16 * MiB
    out = {}
    for c in configs:
        if c == "thp_never":
            continue
        fig = run_config(steps, c, memory=memory, pressure=False, fragmented=True)
        bad = [r for r in fig["results"] if not r["ok"]]
        if bad:
            what = f"{bad[0]['op']}: {bad[0].get('errno') or bad[0].get('signal')}"
        else:
            what = "ran"
        mi = fig["meminfo"]
        out[c] = (f"{what}; {fig['thp_fault_alloc']} THPs, {fig['thp_fault_fallback']} "
                  f"fallbacks to 4 KiB, hugetlb pool {mi['HugePages_Total']} pages")
    return out


def _failure(steps: list[Step], memory: int) -> dict[str, str]:
    """hugetlb with a pool of half the working set: with reservations (mmap ENOMEM)
    and with MAP_NORESERVE (SIGBUS at the first fault the pool cannot serve)."""
    need = sum(round_up(s.size, PMD_SIZE) // PMD_SIZE for s in steps if s.op == "mmap")
    out = {}
    for noreserve in (False, True):
        fig = run_config(steps, "hugetlb", memory=memory, pool=need // 2,
                         noreserve=noreserve, pressure=False)
        bad = [r for r in fig["results"] if not r["ok"]]
        what = (f"{bad[0]['op']}: {bad[0].get('errno') or bad[0].get('signal')}" if bad
                else "no failure")
        out["noreserve" if noreserve else "reserved"] = what
    return out


def compare(workload: str, *, memory: int = 512 * MiB,
            fragmented: bool = True) -> dict[str, Any]:
    """The comparison as a dict: description, configurations run (and skipped), and
    per configuration the figures of run_config; plus hugetlb's failure modes with a
    short pool and (``fragmented``) every configuration on a fragmented machine."""
    desc, steps, configs = load_pattern(workload)
    skipped = {}
    run = []
    for c in configs:
        if c == "mthp" and not mthp_available():
            skipped[c] = "no mTHP (per-size knobs) in this tree"
            continue
        run.append(c)
    table = {c: run_config(steps, c, memory=memory) for c in run}
    out: dict[str, Any] = {"workload": workload, "description": desc,
                           "touched_kb": touched_bytes(steps) // 1024,
                           "configs": table, "skipped": skipped}
    if "hugetlb" in table:
        out["hugetlb_pool_short"] = _failure(steps, memory)
    if fragmented:
        out["fragmented"] = _fragmented(steps, run)
    return out


ROWS = (
    ("page faults", lambda f: f["page_faults"]),
    ("TLB misses (page walks)", lambda f: f["tlb_misses"]),
    ("THP faulted / fallback", lambda f: f"{f['thp_fault_alloc']} / {f['thp_fault_fallback']}"),
    ("Rss kB", lambda f: f["rss_kb"]),
    ("  of which AnonHugePages kB", lambda f: f["anon_huge_kb"]),
    ("hugetlb kB", lambda f: f["hugetlb_kb"]),
    ("hugetlb pool held kB", lambda f: f["meminfo"]["HugePages_Total"] * 2048),
    ("bloat kB (resident - touched)", lambda f: f["bloat_kb"]),
    ("faults+accesses (emulated ms)", lambda f: f"{f['fault_access_ms']:.3f}"),
    ("khugepaged pass ms (2ms polls)", lambda f: f"{f['khugepaged_ms']:.3f}"),
    ("  collapsed by khugepaged", lambda f: f["collapsed"]),
    ("pressure: swapped out kB", lambda f: f["pressure"]["swapped_kb"]),
    ("pressure: THPs swapped whole", lambda f: f["pressure"]["thp_swpout"]),
    ("pressure: THPs split", lambda f: f["pressure"]["thp_split_page"]),
    ("pressure: still resident kB",
     lambda f: f["pressure"]["rss_kb_after"] + f["pressure"]["hugetlb_kb_after"]),
)


def format_table(res: dict[str, Any]) -> str:
    configs = list(res["configs"])
    w = 31
    cw = max(12, *(len(c) + 2 for c in configs))
    lines = [f"{res['workload']}: {res['description']}",
             f"touched {res['touched_kb']} kB", "",
             f"{'':<{w}}" + "".join(f"{c:>{cw}}" for c in configs)]
    for label, get in ROWS:
        lines.append(f"{label:<{w}}" + "".join(f"{str(get(res['configs'][c])):>{cw}}"
                                               for c in configs))
    short = res.get("hugetlb_pool_short")
    if short:
        lines += ["", "hugetlb with a pool of half the working set: "
                  f"reserved mapping -> {short['reserved']}; "
                  f"MAP_NORESERVE -> {short['noreserve']}",
                  ]
    if res.get("fragmented"):
        lines += ["", "on a fragmented machine (one pinned page in every 2 MiB block):"]
        lines += [f"  {c:<12} {what}" for c, what in res["fragmented"].items()]
    for c, why in res["skipped"].items():
        lines.append(f"{c}: skipped ({why})")
    return "\n".join(lines)


def main(args) -> int:
    res = compare(args.workload, memory=args.memory)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_table(res))
    return 0


__all__ = ["compare", "format_table", "run_config", "PRESETS", "CONFIGS"]
