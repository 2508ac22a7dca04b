"""The invariant checker's checks (kmm/checks_cross.py) and where it may run: each check is
shown to catch the breach it exists for (a state built by hand, or a safeguard removed),
and to stay silent on the correct kernel.
"""

from __future__ import annotations

from kmm import (
    atomic, checks_cross, fork, memory, memory_wp, memory_zap, rcupdate, rmap, swap, testing,
)
from kmm.mm_types import PG_anon_exclusive
from kmm.machine import Machine, MachineConfig
from kmm.pgtable import pmd_index, pte_index, pte_pfn, table_pfn
from kmm.runtime.trace import Trace
from kmm.tools import explore as ex
from kmm.workload import Kernel

MiB = 1 << 20
# the checks of kmm/checks_cross.py, each (m, k) -> errors
MINE = (checks_cross.vma_errors, checks_cross.anon_exclusive_errors, checks_cross.rcu_errors,
        checks_cross.cross_process_errors)


def _machine(cpus=2):
    m = Machine(MachineConfig(memory=64 * MiB, cpus=cpus, seed=1), mode="free", trace=Trace())
    return m, Kernel(m)


def _pte_folio(m, mm, addr):
    t = table_pfn(m.physmem.tables[memory.pmd_lookup(m, mm, addr)][pmd_index(addr)])
    return m.physmem.folio(pte_pfn(m.physmem.tables[t][pte_index(addr)]))


# ------------------------------------------------------------- where it runs
def test_checker_never_runs_inside_a_half_finished_free():
    """__folio_put drops the last reference, then takes the folio off the LRU under the
    lru lock: in between (a point, the lock acquire) the folio has refcount 0 and is
    still on the LRU, as in the kernel. The checker at every quiescent point used to
    run there ("LRU holds a non-live folio"); the freeing actor is inside an update."""
    m, k = _machine()
    chk = ex.Checker(m, k, "point")

    async def driver():
        p = await k.process("main")
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, 4096)
        folio = _pte_folio(m, p.task.mm, a)
        await atomic.folio_ref_add(m, folio, 1)  # a reference that outlives the mapping
        await p.munmap(a, 2 * MiB)
        m.sched.on_point = chk.at_point
        await swap.folio_put(m, folio)  # the last one: the free runs here
        assert m.zone.is_free(folio.pfn) and not m.freeing

    m.run(driver)


def test_checker_counts_the_reference_a_putback_is_about_to_drop():
    """folio_putback_lru puts the folio back on its LRU list (folio_add_lru), then drops
    the isolation reference (folio_put): in between the folio is on the LRU, no longer
    isolated, and still holds that reference, as in the kernel. The checker at the
    folio_put's point used to read "refcount 2 != 1 mappings" (move_page of a page a
    racing COW fault had just left: the new folio's putback, preempted before its put)."""
    m, k = _machine()
    chk = ex.Checker(m, k, "point")
    seen = []

    def at_point():
        pins = getattr(m, "putback_pins", None)
        if pins and testing.quiescent(m):
            seen.append(dict(pins))
        chk.at_point()

    async def driver():
        p = await k.process("main")
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, 4096)
        folio = _pte_folio(m, p.task.mm, a)
        assert await swap.folio_isolate_lru(m, folio)
        m.sched.on_point = at_point
        await swap.folio_putback_lru(m, folio)
        m.sched.on_point = None
        box["pfn"] = folio.pfn
        assert folio.refcount == 1 and not m.putback_pins

    box = {}
    m.run(driver)
    assert seen == [{box["pfn"]: 1}]  # checked once in the window, its reference counted
    assert testing.invariant_errors(m, k) == []


def test_checker_counts_the_mappings_of_an_exiting_mm():
    """do_exit marks the task dead, then mmput -> exit_mmap zaps its mappings: until the
    zap, every page it maps still counts that mapping (folio_try_dup_anon_rmap_ptes at
    fork added it; zap_present_ptes removes it), as an exiting mm is an mm like any
    other until exit_mmap. The checker used to skip a dead task's tables, so at a
    quiescent point in that window (before __khugepaged_exit or exit_mmap takes a lock)
    every shared page read "mapcount 2 != 1 PTE mappings" (race_fork_reuse, pct seed
    706: the second child exits while the parent faults)."""
    m, k = _machine()
    chk = ex.Checker(m, k, "point")
    seen = []

    def at_point():
        t = m.tasks.get("child")
        if t is not None and not t.alive and t.mm.pgd >= 0 and testing.quiescent(m):
            seen.append(t.mm.rss_anon)  # a check inside the window, the tables still full
        chk.at_point()

    async def driver():
        p = await k.process("main")
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, 16 * 1024, value=1)
        c = await p.fork("child")
        m.sched.on_point = at_point
        await c.exit()
        m.sched.on_point = None

    m.run(driver)
    assert seen and seen[0] == 4  # checked with the child's four PTEs still mapped
    assert testing.invariant_errors(m, k) == []


# ------------------------------------------------------------------ checks
def _errors_after(body, monkeypatch=None, patches=()):
    """Run ``await body(m, k)`` on a fresh machine with ``patches`` (module, name,
    replacement) applied, no checker during the run; return every check's errors at
    the end, by check name, and the old checks' (the scan before CHECKS)."""
    m, k = _machine()
    for mod, name, fn in patches:
        monkeypatch.setattr(mod, name, fn)
    out = {}

    async def driver():
        await body(m, k)
        for check in MINE:
            out[check.__name__] = check(m, k)
        old = [e for e in testing.invariant_errors(m, k)
               if not any(e in v for v in out.values())]
        out["others"] = old

    m.run(driver)
    return out


async def _unmap_one_page(m, k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "nohugepage")
    await p.touch(a, 64 * 1024, value=3)
    assert await p.munmap(a + 8192, 4096) == 0


def test_vma_check_finds_a_mapping_munmap_left_behind(monkeypatch):
    """A zap that stops one page short (a removed safeguard: the range end) leaves a
    PTE where no VMA is: refcounts, mapcounts and the written bytes still agree (the
    bytes were forgotten with the munmap), so only the VMA check sees it."""
    real = memory_zap.unmap_page_range

    async def short_zap(m, tlbg, vma, start, end):
        await real(m, tlbg, vma, start, end - 4096)

    clean = _errors_after(_unmap_one_page)
    assert clean == {c.__name__: [] for c in MINE} | {"others": []}
    bad = _errors_after(_unmap_one_page, monkeypatch,
                        [(memory_zap, "unmap_page_range", short_zap)])
    assert len(bad["vma_errors"]) == 1
    assert "lies in no VMA" in bad["vma_errors"][0]
    assert bad["others"] == [] and bad["anon_exclusive_errors"] == []


async def _fork_after_write(m, k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    await p.madvise(a, 2 * MiB, "nohugepage")
    await p.touch(a, 16 * 1024, value=1)
    c = await p.fork("child")
    return p, c, a


def test_anon_exclusive_check_finds_a_page_fork_left_exclusive(monkeypatch):
    """fork must clear PG_anon_exclusive of every page it shares
    (folio_try_dup_anon_rmap_ptes); without that, both processes map pages marked
    exclusive. Nothing is written after the fork, so no byte differs yet: only the
    ownership check sees it (the next write would reuse the page in place)."""
    real_dup = rmap.folio_try_dup_anon_rmap_ptes

    async def dup_keeps_exclusive(m, folio, pfn, nr):
        was = folio.flags & PG_anon_exclusive
        await real_dup(m, folio, pfn, nr)
        if was:
            atomic.folio_set_flags_locked(folio, PG_anon_exclusive)

    async def body(m, k):
        await _fork_after_write(m, k)

    assert _errors_after(body)["anon_exclusive_errors"] == []
    bad = _errors_after(body, monkeypatch,
                        [(rmap, "folio_try_dup_anon_rmap_ptes", dup_keeps_exclusive)])
    errs = bad["anon_exclusive_errors"]
    assert len(errs) == 4  # the four pages written before the fork
    assert all("PG_anon_exclusive but mapped by 2 mms (child, main)" in e for e in errs)
    assert bad["others"] == [] and bad["cross_process_errors"] == []


def test_cross_process_check_finds_a_write_that_shows_in_the_other_process(monkeypatch):
    """A COW fault that reuses a shared page (wp_can_reuse_anon_folio always yes)
    writes into the page both processes map. The child writes a byte the parent never
    wrote: the parent's own bytes are intact, so the lost-bytes check is silent; the
    parent reading a byte only the child wrote is the cross-process check's."""
    async def always_reuse(m, folio, vma):
        return True

    async def body(m, k):
        p, c, a = await _fork_after_write(m, k)
        await c.store(a + 100, b"\x07")

    clean = _errors_after(body)
    assert clean["cross_process_errors"] == [] and clean["others"] == []
    bad = _errors_after(body, monkeypatch, [(memory_wp, "wp_can_reuse_anon_folio", always_reuse)])
    errs = bad["cross_process_errors"]
    assert len(errs) == 1
    assert "main: byte at" in errs[0] and "reads 7, but main never wrote it" in errs[0]
    assert "(it was written by child)" in errs[0]
    assert bad["others"] == []


def test_a_byte_written_while_a_fork_runs_is_unknown_to_the_child(monkeypatch):
    """The parent's other CPU writes while the fork is under way: the child may see
    the write or not (its page copied before or after it), so neither is a violation.
    Here the write lands after the copy (the parent's COW fault gives it a new page;
    the child keeps the old byte) but before the fork's shadow copy: without the
    unknown set the child's shadow claimed the new byte (a false "was written")."""
    real = fork.copy_process
    box = {}

    async def copy_then_a_racing_write(m, parent, name):
        t = await real(m, parent, name)
        await box["p"].on(1).store(box["a"] + 4096 + 5, b"\x09")
        return t

    async def body(m, k):
        p = box["p"] = await k.process("main")
        a = box["a"] = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, 16 * 1024, value=1)
        await p.store(a + 4096 + 5, b"\x01")
        c = await p.fork("child")
        box["unknown"] = sorted(k.unknown["child"])
        box["child_reads"] = (await c.load(a + 4096 + 5))[0]
        box["verify"] = await c.verify()
        await c.store(a + 4096 + 5, b"\x04")  # known again
        box["after"] = k.unknown.get("child")

    monkeypatch.setattr(fork, "copy_process", copy_then_a_racing_write)
    errs = _errors_after(body)
    a = box["a"]
    assert box["unknown"] == [a + 4096 + 5] and box["child_reads"] == 1
    assert box["verify"] == [] and box["after"] == set()
    assert errs == {c.__name__: [] for c in MINE} | {"others": []}


def test_rcu_check_finds_a_callback_past_its_grace_period():
    m, k = _machine()

    async def driver():
        async def cb():
            pass
        rcupdate.rcu_read_lock(m)
        await rcupdate.call_rcu(m, cb)
        assert checks_cross.rcu_errors(m, k) == []  # the reader is still inside
        m.rcu.nesting.clear()  # the reader left without rcu_read_unlock's report
        assert checks_cross.rcu_errors(m, k) == [
            "RCU callback test_rcu_check_finds_a_callback_past_its_grace_period."
            "<locals>.driver.<locals>.cb pending after its grace period"]
        m.rcu.pending.clear()

    m.run(driver)
