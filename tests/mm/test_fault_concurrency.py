"""Concurrent faults on two CPUs under the random scheduler, 30 seeds each, with the
invariant checker after every operation that does not end inside another CPU's
(QuietCheck, run_program's check hook), so always after the racing part.

The kernel makes these races safe by re-checking under the lock after every point where
it was dropped (kernel-thp.md section 4): __do_huge_pmd_anonymous_page's pmd_none
recheck under the PMD lock, pmd_install's, do_anonymous_page's pte_none recheck under
the PTE lock; the loser frees what it allocated and refaults onto the winner's mapping.
fork write-protects the parent's entries and flushes its TLBs before releasing the
mmap_lock (dup_mmap), so a write racing with fork lands either before the fork (both
see it) or after (COW: only the parent sees it).
"""

from __future__ import annotations

import io
import json

from kmm.testing import check_invariants
from kmm.tools.runner import run_program

SEEDS = range(30)

THP_RACE = '''
from kmm.task_mmu import smaps_range

MiB = 1 << 20


async def main(k):
    m = k.machine
    boot = m.zone.nr_free
    p = await k.process("main")
    a = await p.mmap(4 * MiB)
    await p.madvise(a, 4 * MiB, "hugepage")
    # both CPUs write the first byte of every other page of the same PMD, CPU 1 a
    # page ahead: each may be first to fault the PMD
    res = await k.parallel(
        lambda cpu: p.on(cpu).touch(a, 2 * MiB, value=0xA0, stride=8192),
        lambda cpu: p.on(cpu).touch(a + 4096, 2 * MiB - 4096, value=0xB1, stride=8192),
        lambda cpu: p.on(cpu).touch(a + 8192, 2 * MiB - 8192, value=0xC2, stride=8192),
    )
    out = {
        "results": [repr(r) for r in res],
        "lost": await p.verify(),
        "smaps": smaps_range(m, p.task.mm, a, a + 4 * MiB),
        "nr_ptes": p.task.mm.nr_ptes,
        "deferred": len(m.deferred_split_queue),
    }
    await p.exit()
    out["leaked"] = boot - m.zone.nr_free
    out["huge_zero"] = m.huge_zero_pfn
    return out
'''

PTE_RACE = '''
MiB = 1 << 20


async def main(k):
    m = k.machine
    boot = m.zone.nr_free
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "nohugepage")
    # both CPUs write the same bytes of the same 4 KiB pages: every PTE is raced for
    res = await k.parallel(
        lambda cpu: p.on(cpu).touch(a, 256 * 1024, value=0xA0),
        lambda cpu: p.on(cpu).touch(a, 256 * 1024, value=0xB1),
    )
    out = {
        "results": [repr(r) for r in res],
        "lost": await p.verify(),
        "nr_ptes": p.task.mm.nr_ptes,
        "rss": p.task.mm.rss_anon,
    }
    await p.exit()
    out["leaked"] = boot - m.zone.nr_free
    return out
'''

FORK_RACE = '''
from kmm.testing import read_mapped_byte

MiB = 1 << 20
STEP = 256 * 1024
SIZE = 3 * MiB


async def main(k):
    m = k.machine
    boot = m.zone.nr_free
    p = await k.process("main")
    a = await p.mmap(SIZE)
    await p.madvise(a, 2 * MiB, "hugepage")   # one THP, then 1 MiB of 4 KiB pages
    await p.touch(a, SIZE, value=1, stride=STEP)
    addrs = list(range(a, a + SIZE, STEP))

    async def writer(cpu):
        # top down, while dup_mmap copies bottom up: the two meet somewhere
        q = p.on(cpu)
        for x in reversed(addrs):
            await q.touch(x, 1, value=2)
        return "wrote"

    res = await k.parallel(lambda cpu: p.on(cpu).fork("child"), writer)
    c = k.proc("child")
    seen = [read_mapped_byte(m, c.task.mm, x) for x in addrs]
    out = {"results": [type(r).__name__ for r in res], "child_saw": sorted(set(seen)),
           "lost_parent": await p.verify(), "lost_child": await c.verify()}
    # from here on the two address spaces are separate: each sees only its own writes
    await c.touch(a, SIZE, value=3, stride=STEP)
    out["parent_after_child_write"] = await p.touch(a, SIZE, write=False, value=2,
                                                    stride=STEP)
    await p.touch(a, SIZE, value=4, stride=STEP)
    out["child_after_parent_write"] = await c.touch(a, SIZE, write=False, value=3,
                                                    stride=STEP)
    await c.exit()
    await p.exit()
    out["leaked"] = boot - m.zone.nr_free
    return out
'''


TLB_RACE = '''
MiB = 1 << 20


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "hugepage")
    await p.touch(a, 2 * MiB, value=1, stride=MiB)

    async def writer(cpu):
        q = p.on(cpu)
        await q.touch(a, 1, value=2)  # CPU 1 caches the writable 2 MiB translation
        for i in range(40):           # then stores through it while the fork runs
            await q.store(a + 8, bytes([3 + i]))

    await k.parallel(lambda cpu: p.on(cpu).fork("child"), writer)
    c = k.proc("child")
    return {"child": await c.verify(), "parent": await p.verify(),
            "child_byte": (await c.load(a + 8))[0]}
'''


class QuietCheck:
    """check_invariants after every operation that ends while no other actor is inside
    one. The invariants describe a machine between operations: an operation ending on
    one CPU while the other CPU is in the middle of dup_mmap (both mmap_locks held, the
    child's tables half copied) would see mapcounts whose mappings are not yet visible.
    Every kernel path that changes mappings holds a lock throughout (a fault holds
    mmap_lock for read), so "no other actor holds a lock" is "no operation in flight"."""

    def __init__(self) -> None:
        self.ran = self.deferred = 0

    def __call__(self, m, k) -> None:
        cur = m.sched.current
        if any(a.held for a in m.sched.actors if a is not cur):
            self.deferred += 1
            return
        self.ran += 1
        check_invariants(m, k)


def run(tmp_path, text, seed):
    prog = tmp_path / "prog.py"
    if not prog.exists():
        prog.write_text(text)
    sink = io.StringIO()
    check = QuietCheck()
    rep = run_program(str(prog), cpus=2, seed=seed, mode="random", trace_file=sink,
                      check=check)
    assert check.ran >= 5  # the checks after the parallel part always run
    events = [json.loads(line) for line in sink.getvalue().splitlines()]
    return rep, events


def allocs(events, order, purpose):
    return sum(1 for e in events if e["event"] == "mm_page_alloc" and e["order"] == order
               and e["purpose"] == purpose)


def test_two_cpus_write_fault_one_pmd(tmp_path):
    """Three writers (two CPUs) race for one PMD of a MADV_HUGEPAGE range: exactly one
    THP is installed (thp_fault_alloc 1, AnonHugePages 2048 kB), a loser that had
    allocated its own THP frees it after failing the pmd_none recheck under the PMD lock
    (order-9 allocations exceed thp_fault_alloc in some seeds), no byte is lost, and
    after exit the zone has every page back."""
    raced = 0
    for seed in SEEDS:
        rep, events = run(tmp_path, THP_RACE, seed)
        r = rep["result"]
        assert r["results"] == ["0", "0", "0"], seed
        assert rep["vmstat"]["thp_fault_alloc"] == 1, seed
        assert rep["vmstat"]["thp_fault_fallback"] == 0 and rep["vmstat"]["thp_split_pmd"] == 0
        assert r["lost"] == [], seed
        assert r["smaps"] == (2048, 2048), seed
        assert r["nr_ptes"] == 1, seed  # the one deposited table: the losers freed theirs
        assert r["leaked"] == 0 and r["huge_zero"] == -1, seed
        thps = allocs(events, 9, "thp")
        assert 1 <= thps <= 3
        raced += thps > 1
        frees9 = sum(1 for e in events if e["event"] == "mm_page_free" and e["order"] == 9)
        assert frees9 == thps, seed  # the losers' THPs, then the winner's at exit
    assert raced > 0  # the recheck path ran in some seeds


def test_two_cpus_fault_the_same_4k_pages(tmp_path):
    """MADV_NOHUGEPAGE: both CPUs write the same 64 pages. One PTE table is installed
    (pmd_install under the PMD lock; a losing table is freed), one page per PTE
    (do_anonymous_page's pte_none recheck: the loser frees its page), the last write to
    each byte is what reads back, and nothing leaks."""
    raced_table = raced_page = 0
    for seed in SEEDS:
        rep, events = run(tmp_path, PTE_RACE, seed)
        r = rep["result"]
        assert r["results"] == ["0", "0"], seed
        assert r["lost"] == [], seed
        assert r["nr_ptes"] == 1 and r["rss"] == 64, seed
        assert rep["vmstat"]["thp_fault_alloc"] == 0
        assert r["leaked"] == 0, seed
        # pgd, pud, pmd and one PTE table are needed; more were allocated when a
        # racing fault won the pmd_install (or __pud/__pmd_alloc) race
        raced_table += allocs(events, 0, "pgtable") > 4
        raced_page += allocs(events, 0, "anon") > 64
    assert raced_table > 0 and raced_page > 0


def test_fork_racing_a_write_keeps_parent_and_child_apart(tmp_path):
    """A fork on CPU 0 while CPU 1 writes the region: the child sees each byte as before
    or after that write, exactly as its copy of the parent's history says (no write
    leaks into the child after the fork); after the fork each side's writes stay its
    own (COW of THP and 4 KiB pages), and both exits give every page back."""
    mixed = 0
    for seed in SEEDS:
        rep, _ = run(tmp_path, FORK_RACE, seed)
        r = rep["result"]
        assert r["results"] == ["Proc", "str"], seed
        assert r["lost_parent"] == [] and r["lost_child"] == [], seed
        assert set(r["child_saw"]) <= {1, 2}
        mixed += r["child_saw"] == [1, 2]
        assert r["parent_after_child_write"] == 0, seed
        assert r["child_after_parent_write"] == 0, seed
        assert r["leaked"] == 0, seed
    assert mixed > 0  # the fork landed in the middle of the writes in some seeds


def test_stores_through_a_stale_tlb_entry_do_not_leak_into_the_child(tmp_path):
    """copy_huge_pmd write-protects the parent's PMD, and dup_mmap flushes the parent's
    TLBs (flush_tlb_mm) before it drops the mmap_lock. A store on the other CPU through
    its cached writable 2 MiB translation lands before that flush (the child inherits
    it) or faults after it (COW: the child never sees it): a store is one instruction
    and the shootdown IPI is taken between instructions. The child's bytes therefore
    always equal its copy of the parent's history at fork."""
    cow = 0
    for seed in SEEDS:
        rep, _ = run(tmp_path, TLB_RACE, seed)
        r = rep["result"]
        assert r["child"] == [] and r["parent"] == [], seed
        assert 2 <= r["child_byte"] <= 3 + 39
        # the fork overtook the stores: the parent's next one faulted and COWed
        cow += rep["vmstat"]["thp_split_pmd"] == 1
    assert 0 < cow < len(SEEDS)


DONTNEED_WHOLE_TABLE = """
async def main(k):
    p = await k.process("main")
    a = await p.mmap(4 << 20)
    a = (a + (2 << 20) - 1) & ~((2 << 20) - 1)
    await p.touch(a, 64 << 10)                   # 16 small pages in one PTE table
    return await p.madvise(a, 2 << 20, "dontneed")  # empties it: pt_reclaim frees it
"""


def test_pt_reclaim_checks_and_clears_under_the_pte_lock(tmp_path):
    """try_to_free_pte (mm/pt_reclaim.c, 6.18) takes the PMD lock, then the PTE table's
    own lock nested (spin_lock_nested), and only under both checks that the table is
    empty and clears the PMD: a fault refilling the table holds that PTE lock while it
    installs. The explorer found the window when only the PMD lock was taken
    (race_dontneed_fault.py, a fault's new PTE freed with its table)."""
    prog = tmp_path / "prog.py"
    prog.write_text(DONTNEED_WHOLE_TABLE)
    sink = io.StringIO()
    rep = run_program(str(prog), cpus=1, trace_file=sink, check=check_invariants)
    assert rep["result"] == 0
    events = [json.loads(line) for line in sink.getvalue().splitlines()]
    sites = [(e["event"], e.get("site")) for e in events if e["event"] in ("lock", "unlock")
             or e["event"] == "pmdp_get_and_clear"]
    i = sites.index(("lock", "try_get_and_clear_pmd"))
    assert sites[i + 1] == ("lock", "try_to_free_pte")
    assert sites[i + 2][0] == "pmdp_get_and_clear"  # the clear, with both locks held
    assert [s[0] for s in sites[i + 3:i + 5]] == ["unlock", "unlock"]

