"""Multi-size anonymous THP (issue 11): the per-size knobs and their semantics, the
fault path's order choice, the report's mthp section, the large-folio invariants, the
race programs and the injected bug ``mthp_no_pte_range_recheck``.

Host-observable behaviour (orders chosen, stats, folio sizes) is pinned by the
workloads/mthp_*.toml recordings in tests/test_conformance.py; these tests pin the
kernel's rules that the host cannot show one at a time."""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm import atomic, huge_memory_mthp as mthp, swap, sysfs
from kmm.mm_types import VM_HUGEPAGE, VM_NOHUGEPAGE
from kmm.testing import InvariantError, check_between_ops, check_invariants, run_machine
from kmm.tools import cli
from kmm.tools import explore as ex
from kmm.tools.runner import run_program

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
KiB = 1 << 10
O64K = 1 << 4
PMD = 1 << 9


# ------------------------------------------------------------------ knobs
def test_size_folders_are_the_hosts():
    """6.18 on x86-64: anon sizes 16 kB .. 2048 kB have enabled; 8 kB only shmem."""
    enabled = sorted(int(n.split("-")[1].split("kB")[0]) for n in sysfs.KNOBS
                     if n.startswith("hugepages-") and n.endswith("/enabled"))
    assert enabled == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert "hugepages-8kB/shmem_enabled" in sysfs.KNOBS
    assert "hugepages-8kB/enabled" not in sysfs.KNOBS
    assert sysfs.KNOBS["hugepages-2048kB/enabled"].default == "inherit"
    assert sysfs.KNOBS["hugepages-64kB/enabled"].default == "never"


def test_knob_validation_and_words():
    s = sysfs.Sysfs()
    s.write("hugepages-64kB/enabled", "always\n")  # sysfs_streq: one newline ignored
    assert s["hugepages-64kB/enabled"] == "always"
    assert sysfs.KNOBS["hugepages-64kB/enabled"].words == ("always", "inherit", "madvise",
                                                           "never")
    with pytest.raises(sysfs.KnobError):
        s.write("hugepages-64kB/enabled", "within_size")  # a shmem word only
    s.write("hugepages-64kB/shmem_enabled", "within_size")
    assert (s.anon_orders_always, s.anon_orders_inherit) == (O64K, PMD)


class _Vma:
    def __init__(self, flags=0, start=0, end=4 << 20, anon_vma=object()):
        self.flags, self.start, self.end, self.anon_vma = flags, start, end, anon_vma
        self.vm_file = None  # anonymous


class _M:
    def __init__(self, **knobs):
        self.sysfs = sysfs.Sysfs()
        for n, v in knobs.items():
            self.sysfs.write(n.replace("_", "-", 1) if n.startswith("hugepages") else n, v)


@pytest.mark.parametrize("size_knob,global_,madvised,allowed", [
    ("always", "never", False, True),
    ("madvise", "never", False, False),
    ("madvise", "never", True, True),
    ("inherit", "always", False, True),
    ("inherit", "madvise", False, False),
    ("inherit", "madvise", True, True),
    ("inherit", "never", True, False),
    ("never", "always", True, False),
])
def test_thp_vma_allowable_orders_per_size_semantics(size_knob, global_, madvised, allowed):
    """huge_mm.h thp_vma_allowable_orders: always; madvise iff VM_HUGEPAGE; inherit iff
    the global knob is always, or madvise with VM_HUGEPAGE."""
    m = _M(enabled=global_)
    m.sysfs.write("hugepages-64kB/enabled", size_knob)
    vma = _Vma(VM_HUGEPAGE if madvised else 0)
    got = mthp.thp_vma_allowable_orders(m, vma, "pagefault", (1 << 9) - 1)
    assert bool(got & O64K) == allowed


def test_pmd_size_knob_overrides_the_global_one():
    from kmm import huge_memory
    m = _M(enabled="always")
    m.sysfs.write("hugepages-2048kB/enabled", "never")
    assert not huge_memory.thp_vma_allowable_order(m, _Vma(VM_HUGEPAGE), "pagefault")
    m = _M(enabled="never")
    m.sysfs.write("hugepages-2048kB/enabled", "madvise")
    assert huge_memory.thp_vma_allowable_order(m, _Vma(VM_HUGEPAGE), "pagefault")
    assert not huge_memory.thp_vma_allowable_order(m, _Vma(0), "pagefault")


def test_nohugepage_and_forced_collapse():
    m = _M()
    m.sysfs.write("hugepages-64kB/enabled", "always")
    assert mthp.thp_vma_allowable_orders(m, _Vma(VM_NOHUGEPAGE), "pagefault", O64K) == 0
    # MADV_COLLAPSE ignores the knobs, not VM_NOHUGEPAGE
    assert mthp.thp_vma_allowable_orders(_M(enabled="never"), _Vma(), "forced_collapse",
                                         PMD) == PMD


def test_suitable_orders_keep_blocks_inside_the_vma():
    vma = _Vma(start=0, end=40 * KiB)
    orders = (1 << 2) | (1 << 4)
    assert mthp.thp_vma_suitable_orders(vma, 4 * KiB, orders) == 1 << 2   # no 64 KiB block
    assert mthp.thp_vma_suitable_orders(vma, 36 * KiB, orders) == 0       # [32K, 48K) sticks out


@pytest.mark.parametrize("text,fragment", [
    ('[thp.hugepages-48kB]\nenabled = "always"\n',
     "[thp.hugepages-48kB] enabled: unknown size folder hugepages-48kB"),
    ('[thp.hugepages-64kB]\nenabled = "sometimes"\n',
     "[thp.hugepages-64kB] enabled: must be one of always, inherit, madvise, never"),
    ('[thp.hugepages-8kB]\nenabled = "always"\n',
     "[thp.hugepages-8kB] enabled: unknown knob (allowed: shmem_enabled)"),
])
def test_bad_size_folder_or_value_exits_2_naming_file_and_key(tmp_path, capsys, text, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert cli.main(["run", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(f) in err and fragment in err


# ------------------------------------------------------------------ fault
def _fault(knobs: dict, size: int, touch: list[int], madvise=True):
    out = {}

    async def drive(m, k):
        for n, v in knobs.items():
            k.set_knob(n, v)
        p = await k.process("main")
        a = await p.mmap(size)
        if madvise:
            await p.madvise(a, size, "hugepage")
        for off in touch:
            await p.store(a + off, b"\x07")
        check_invariants(m, k)
        out["stats"] = mthp.mthp_report({}, mthp.mthp_stats(m))
        out["folios"] = mthp.region_folio_kb(m, p.task.mm, a, a + size)

    run_machine(drive, memory=64 << 20)
    return out


def test_highest_enabled_order_whose_block_is_none_is_taken():
    got = _fault({"hugepages-16kB/enabled": "madvise", "hugepages-64kB/enabled": "madvise"},
                 256 * KiB, [20 * KiB, 0, 4 * KiB])
    # first fault: 64 KiB at [0, 64K); the two others hit it (no fault)
    assert got["stats"] == {"hugepages-64kB": {"anon_fault_alloc": 1, "nr_anon": 1}}
    assert got["folios"] == {"64kB": 64}


def test_allocation_failure_falls_back_order_by_order():
    """alloc_anon_folio counts anon_fault_fallback for each order it could not get."""
    out = {}

    async def drive(m, k):

        k.set_knob("hugepages-16kB/enabled", "madvise")
        k.set_knob("hugepages-64kB/enabled", "madvise")
        p = await k.process("main")
        a = await p.mmap(256 * KiB)
        await p.madvise(a, 256 * KiB, "hugepage")
        from kmm import page_alloc
        real = page_alloc.vma_alloc_folio

        async def fail_64k(m_, gfp, order, vma, addr):
            return -1 if order == 4 else await real(m_, gfp, order, vma, addr)
        page_alloc.vma_alloc_folio = fail_64k
        try:
            await p.store(a, b"\x01")
        finally:
            page_alloc.vma_alloc_folio = real
        check_invariants(m, k)
        out["stats"] = mthp.mthp_report({}, mthp.mthp_stats(m))

    run_machine(drive, memory=64 << 20)
    assert out["stats"] == {"hugepages-64kB": {"anon_fault_fallback": 1},
                            "hugepages-16kB": {"anon_fault_alloc": 1, "nr_anon": 1}}


# ------------------------------------------------------------ invariants
def test_checker_catches_a_wrong_nr_pages_mapped_and_a_stale_gauge():
    async def drive(m, k):
        k.set_knob("hugepages-64kB/enabled", "madvise")
        p = await k.process("main")
        a = await p.mmap(64 * KiB)
        await p.madvise(a, 64 * KiB, "hugepage")
        await p.store(a, b"\x01")

        folio = next(f for f in m.physmem.pages.values() if f.order == 4)
        atomic.init_page(folio, nr_pages_mapped=15)  # corrupt it through the door
        with pytest.raises(InvariantError, match="nr_pages_mapped 15 != 16"):
            check_invariants(m)
        atomic.init_page(folio, nr_pages_mapped=16)
        m.vmstat.mthp[4]["nr_anon"] += 1
        with pytest.raises(InvariantError, match="nr_anon 2 != 1"):
            check_invariants(m)
        m.vmstat.mthp[4]["nr_anon"] -= 1
        check_invariants(m)

    run_machine(drive, memory=64 << 20)


# ----------------------------------------------------------------- races
@pytest.mark.parametrize("program", ["race_mthp_fault.py", "race_mthp_cow_split.py",
                                     "race_mthp_reclaim.py"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_race_programs_run_clean(program, seed):
    rep = run_program(str(WORKLOADS / program), mode="random", seed=seed, cpus=2,
                      check=check_between_ops)
    assert rep["result"]["lost_bytes"] == 0


def test_dropped_pte_range_recheck_is_found_and_replayed(tmp_path):
    """kmm.bugs mthp_no_pte_range_recheck: pct exploration finds the overwritten 4 KiB
    PTE (its page still counted as mapped, its byte lost); the failure file replays it."""
    cfg = ex.Config(program=str(WORKLOADS / "race_mthp_fault.py"), mode="pct", seed=1,
                    depth=ex.DEFAULT_DEPTH["pct"], inject=["mthp_no_pte_range_recheck"])
    summ = ex.explore(cfg, 400)
    assert summ.first is not None
    assert "mapcount 1 but not mapped" in summ.first_violation["message"]
    out = tmp_path / "f.jsonl"
    assert cli.main(["explore", cfg.program, "--mode", "pct", "--schedules", "400",
                     "--inject", "mthp_no_pte_range_recheck", "--quiet",
                     "--out", str(out)]) == 1
    ok, _, again, _ = ex.replay(str(out))
    head = json.loads(out.read_text().splitlines()[0])
    assert ok and again.digest == head["minimized"]["digest"]
    # the same schedules without the bug are clean
    clean = ex.explore(ex.Config(program=cfg.program, mode="pct", seed=1,
                                 depth=ex.DEFAULT_DEPTH["pct"]), summ.first + 1)
    assert clean.first is None


def test_tradeoff_workload_table():
    """workloads/mthp_tradeoff.py: the larger the folio, the fewer the faults and the
    more the bloat; on x86-64 only the PMD mapping extends TLB reach (an mTHP is cached
    as 4 KiB entries), so after a warm-up pass only 2 MiB has no dTLB misses."""
    rep = run_program(str(WORKLOADS / "mthp_tradeoff.py"), seed=1, mode="free")
    rows = rep["result"]["rows"]
    faults = [rows[s]["faults"] for s in ("4kB", "16kB", "64kB", "2048kB")]
    rss = [rows[s]["rss_kb"] for s in ("4kB", "16kB", "64kB", "2048kB")]
    assert faults == sorted(faults, reverse=True) and len(set(faults)) == 4
    assert rss == sorted(rss) and rows["4kB"]["bloat"] == 1.0
    assert rows["2048kB"]["tlb_misses"] == 0
    assert rows["4kB"]["tlb_misses"] == rows["16kB"]["tlb_misses"] == rows["64kB"]["tlb_misses"] > 0
    assert rows["64kB"]["faults"] == 1000  # one fault per object: each sits in one block
    assert len(rep["result"]["table"]) == 5


def test_split_of_an_mthp_counts_split_or_split_failed_for_its_size_only():
    """__folio_split: mTHP split / split_failed for the folio's order, never
    thp_split_page(_failed) (those are PMD-order only); a successful split drops
    nr_anon of the size, the pages stay mapped as order-0 folios."""
    from kmm import huge_memory_split

    async def drive(m, k):
        k.set_knob("hugepages-64kB/enabled", "madvise")
        p = await k.process("main")
        a = await p.mmap(64 * KiB)
        await p.madvise(a, 64 * KiB, "hugepage")
        await p.store(a + 8 * KiB, b"\x05")
        folio = next(f for f in m.physmem.pages.values() if f.order == 4)
        lk = m.folio_lock_of(folio)
        await atomic.folio_ref_add(m, folio, 1)   # a pin
        await lk.lock("test")
        await atomic.folio_ref_add(m, folio, 1)   # the caller's reference
        assert await huge_memory_split.split_folio_to_list(m, folio) == -huge_memory_split.EAGAIN
        await swap.folio_put(m, folio)          # the pin goes
        assert await huge_memory_split.split_folio_to_list(m, folio) == 0
        await lk.unlock()
        await swap.folio_put(m, folio)
        # split_deferred: the unmap into migration entries goes PTE by PTE, so the folio
        # is seen partially mapped on the way (the host counts it too: the recordings
        # of mthp_pageout_partial, mthp_cold_partial, mthp_free_partial)
        assert mthp.mthp_report({}, mthp.mthp_stats(m)) == {
            "hugepages-64kB": {"anon_fault_alloc": 1, "split": 1, "split_failed": 1,
                               "split_deferred": 1}}
        assert m.vmstat.events["thp_split_page"] == m.vmstat.events["thp_split_page_failed"] == 0
        assert mthp.region_folio_kb(m, p.task.mm, a, a + 64 * KiB) == {}
        assert await p.load(a + 8 * KiB) == b"\x05"

    run_machine(drive, memory=64 << 20)


def test_compaction_moves_mthps_whole():
    """isolate_migratepages_block isolates an mTHP below the target order
    (skip_isolation_on_order) and migrate_pages moves it whole to a free block of its
    order: a THP fault on a machine fragmented by scattered 64 KiB folios compacts
    (pgmigrate_success counts pages), and every folio is still 64 KiB afterwards. The
    unmap into migration entries sees each source partially mapped (split_deferred),
    and the destination is requeued as the source was (migrate_folio_move)."""
    from kmm.machine import Machine, MachineConfig
    from kmm.workload import Kernel
    MiB = 1 << 20
    m = Machine(MachineConfig(memory=16 * MiB, cpus=1, seed=1), mode="free")
    for n, v in {"defrag": "always", "hugepages-64kB/enabled": "madvise",
                 "hugepages-2048kB/enabled": "never"}.items():
        m.sysfs.write(n, v)
    k = Kernel(m)
    out = {}

    async def driver():
        p = await k.process("p")
        a = await p.mmap(15 * MiB)
        await p.madvise(a, 15 * MiB, "hugepage")
        for off in range(0, 15 * MiB, 64 * KiB):
            await p.store(a + off + 4096, bytes([1 + (off >> 16) % 250]))
        for i in range(15 * MiB // (64 * KiB)):
            if i % 8:
                await p.madvise(a + i * 64 * KiB, 64 * KiB, "dontneed")
        assert m.zone.buddyinfo()[9:] == [0, 0]  # no free 2 MiB block left
        m.sysfs.write("hugepages-2048kB/enabled", "madvise")
        q = await k.process("q")
        b = await q.mmap(2 * MiB)
        await q.madvise(b, 2 * MiB, "hugepage")
        await q.store(b, b"\x09")
        check_invariants(m, k)
        out["ev"] = {n: m.vmstat.events[n] for n in (
            "thp_fault_alloc", "compact_stall", "compact_success", "pgmigrate_success")}
        out["folios"] = mthp.region_folio_kb(m, p.task.mm, a, a + 15 * MiB)
        out["stats"] = mthp.mthp_report({}, mthp.mthp_stats(m))["hugepages-64kB"]
        out["lost"] = await p.verify() + await q.verify()

    m.run(driver)
    ev = out["ev"]
    assert ev["thp_fault_alloc"] == ev["compact_stall"] == ev["compact_success"] == 1
    assert ev["pgmigrate_success"] > 0 and ev["pgmigrate_success"] % 16 == 0
    moved = ev["pgmigrate_success"] // 16
    assert out["folios"] == {"64kB": 30 * 64}
    assert out["stats"]["nr_anon"] == 30
    assert out["stats"]["split_deferred"] == 2 * moved  # source at unmap, destination
    assert out["stats"]["nr_anon_partially_mapped"] == moved
    assert out["lost"] == []


def test_a_folio_flagged_partially_mapped_is_not_queued_again_by_an_unmap():
    """__folio_remove_rmap calls deferred_split_folio only for a folio not yet flagged
    partially mapped (!folio_test_partially_mapped): one the deferred-split shrinker
    holds in its batch (off the queue, flagged, a reference taken) stays off the queue
    when more of it is unmapped meanwhile; the shrinker requeues it itself if it cannot
    split it."""
    async def drive(m, k):
        k.set_knob("hugepages-64kB/enabled", "madvise")
        p = await k.process("main")
        r = await p.mmap(128 * KiB)
        await p.madvise(r, 128 * KiB, "hugepage")
        a = (r + 64 * KiB - 1) & ~(64 * KiB - 1)
        await p.touch(a, 64 * KiB, value=5)
        assert await p.munmap(a + 32 * KiB, 32 * KiB) == 0
        (pfn,) = m.deferred_split_queue
        folio = m.physmem.page(pfn)
        # deferred_split_scan's first loop: folio_try_get, off the queue
        await m.split_queue_lock.lock("test")
        atomic.folio_ref_add_locked(folio)
        m.split_scan_pins[pfn] = 1
        atomic.ds_queue_del_locked(m, folio)
        await m.split_queue_lock.unlock()
        assert await p.munmap(a + 16 * KiB, 16 * KiB) == 0
        assert not folio.on_deferred_list and list(m.deferred_split_queue) == []
        assert k.mthp_stats("64kB")["split_deferred"] == 1
        # the shrinker could not lock it: back on the queue, then its reference goes
        await m.split_queue_lock.lock("test")
        atomic.ds_queue_add_locked(m, folio)
        await m.split_queue_lock.unlock()
        del m.split_scan_pins[pfn]
        await swap.folio_put(m, folio)
    run_machine(drive, memory=64 << 20)
