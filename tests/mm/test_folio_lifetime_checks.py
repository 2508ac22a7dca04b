"""A folio freed under its lock, locked after it was freed, a collapse that refills a
PMD it no longer owns: the checks that see them, each shown to catch the breach it
exists for and to stay silent on the correct kernel.

The race programs that reach these states through the program API (a removed
safeguard) are workloads/race_wp_lock_zap.py and workloads/race_collapse_dontneed.py;
``kmm mutate`` kills huge_wp_no_folio_get, huge_wp_no_pmd_same_after_sleep and
collapse_no_pmd_still_valid with them.
"""

from __future__ import annotations

import pathlib

import pytest

from kmm import khugepaged, khugepaged_collapse, memory
from kmm.machine import Machine, MachineConfig
from kmm.mmdebug import KernelBug
from kmm.pgtable import pmd_index, pte_index, pte_pfn, table_pfn
from kmm.runtime.trace import Trace
from kmm.tools import explore as ex
from kmm.workload import Kernel

MiB = 1 << 20
WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"


def _machine():
    m = Machine(MachineConfig(memory=64 * MiB, cpus=2, seed=1), mode="free", trace=Trace())
    return m, Kernel(m)


def _pte_folio(m, mm, addr):
    t = table_pfn(m.physmem.tables[memory.pmd_lookup(m, mm, addr)][pmd_index(addr)])
    return m.physmem.folio(pte_pfn(m.physmem.tables[t][pte_index(addr)]))


async def _one_page(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    assert await p.madvise(a, 2 * MiB, "nohugepage") == 0
    await p.touch(a, 4096, value=7)
    return p, a


def test_freeing_a_locked_folio_is_a_kernel_bug():
    """free_pages_prepare -> free_page_is_bad: PG_locked is one of the
    PAGE_FLAGS_CHECK_AT_FREE, so a page freed while its lock is held is bad_page().
    Here the page's lock is held (set without lockdep, __folio_set_locked: munmap
    takes the mmap lock, which ranks above the folio lock) when munmap drops its last
    mapping, with no other reference: the free reports it. Unlocked, it is silent."""
    m, k = _machine()

    async def driver(lock_it):
        p, a = await _one_page(k)
        lk = m.folio_lock_of(_pte_folio(m, p.task.mm, a))
        if lock_it:
            lk.set_locked_by(m.sched.current)
        assert await p.munmap(a, 2 * MiB) == 0

    m.run(lambda: driver(False))
    m, k = _machine()
    with pytest.raises(KernelBug, match="freeing a locked page"):
        m.run(lambda: driver(True))


def test_folio_lock_of_a_freed_folio_is_a_kernel_bug():
    """folio_lock / folio_trylock want the caller to hold a reference: a folio whose
    last reference went away meanwhile is a page of the buddy allocator (or of the next
    folio there), so locking it is a use after free. Taken while the folio is still
    mapped, the lock is fine."""
    m, k = _machine()

    async def driver(after_free, use_trylock):
        p, a = await _one_page(k)
        folio = _pte_folio(m, p.task.mm, a)
        if after_free:
            assert await p.munmap(a, 2 * MiB) == 0
        lk = m.folio_lock_of(folio)
        if use_trylock:
            assert await lk.trylock("test")
        else:
            await lk.lock("test")
        await lk.unlock()

    for use_trylock in (False, True):
        m, k = _machine()
        m.run(lambda: driver(False, use_trylock))
        m, k = _machine()
        with pytest.raises(KernelBug, match="folio_lock of a freed folio"):
            m.run(lambda: driver(True, use_trylock))


def test_collapse_without_check_pmd_still_valid_refills_a_none_pmd(monkeypatch):
    """collapse_huge_page's check_pmd_still_valid under the mmap write lock: the PMD
    found before the lock was dropped may be none by then (MADV_DONTNEED's pt_reclaim
    freed the table). Without the check, pte_offset_map_lock on the saved none _pmd
    fails (SCAN_PMD_NULL) and the failure path's pmd_populate installs the page
    pmd_pgtable(_pmd) names, pfn 0: a PMD pointing at no page table, which the mapping
    check reports (it used to crash the checker). With the check, the schedule is
    clean."""
    cfg = ex.Config(program=str(WORKLOADS / "race_collapse_dontneed.py"), mode="random",
                    seed=1, depth=3)
    assert ex.run_schedule(cfg, "random", 1, {}).kind is None
    monkeypatch.setattr(khugepaged_collapse, "check_pmd_still_valid",
                        lambda m, mm, address, pmd_tbl: khugepaged.ScanResult.SCAN_SUCCEED)
    out = ex.run_schedule(cfg, "random", 1, {})
    assert out.kind == "invariant", out.message
    assert "pte table 0x0 is not a page-table page" in out.message
