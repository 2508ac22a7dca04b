"""The kernel's lock-held assertions (kmm/mmdebug.py) at the sites 6.18 has them: each
function, called without the lock its caller must hold, raises KernelBug (as
VM_BUG_ON_FOLIO / lockdep_assert_held / mmap_assert_*locked report with
CONFIG_DEBUG_VM and CONFIG_LOCKDEP), naming the function and the lock; with the lock
held the same call goes through.
"""

from __future__ import annotations

import pytest

from kmm import huge_memory, huge_memory_split, khugepaged, memory, memory_zap, migrate, mmap
from kmm import pgtable_generic as pgg
from kmm.machine import KernelBug
from kmm.pgtable import HPAGE_PMD_MASK, pmd_index, pmd_pfn
from kmm.testing import run_machine

from tests.mm.test_huge_memory import MiB, pmd_at, thp_region


def _raises(body, fragment: str) -> None:
    """Run ``await body(m, k, p, a)`` after faulting one THP; expect KernelBug."""
    async def fn(m, k):
        p, a = await thp_region(k)
        await body(m, k, p, a)

    with pytest.raises(KernelBug, match=fragment):
        run_machine(fn)


# ------------------------------------------------------------- PMD lock
def test_deposit_and_withdraw_assert_the_pmd_lock():
    """pgtable_trans_huge_deposit/withdraw: assert_spin_locked(pmd_lockptr(mm, pmd))."""
    async def withdraw(m, k, p, a):
        await pgg.pgtable_trans_huge_withdraw(m, p.task.mm, pmd_at(m, p.task.mm, a)[0])

    _raises(withdraw, r"pgtable_trans_huge_withdraw: lockdep_assert_held\(ptl_pmd")

    async def deposit(m, k, p, a):
        mm = p.task.mm
        t = await m.pte_alloc_one(mm, "pte")
        await pgg.pgtable_trans_huge_deposit(m, mm, pmd_at(m, mm, a)[0], t)

    _raises(deposit, r"pgtable_trans_huge_deposit: lockdep_assert_held\(ptl_pmd")


def test_split_huge_pmd_locked_asserts_the_pmd_lock():
    """__split_huge_pmd_locked: Context: pmd lock held throughout."""
    async def split(m, k, p, a):
        vma = p.task.mm.vma_lookup(a)
        t = pmd_at(m, p.task.mm, a)[0]
        await huge_memory.__split_huge_pmd_locked(m, vma, t, pmd_index(a),
                                                  a & HPAGE_PMD_MASK, freeze=False)

    _raises(split, r"__split_huge_pmd_locked: lockdep_assert_held\(ptl_pmd")


def test_set_pmd_at_users_assert_the_pmd_lock():
    """map_anon_folio_pmd_nopf (the huge fault's and the collapse's set_pmd_at) and
    set_huge_zero_folio install a PMD: only under the PMD lock."""
    async def install(m, k, p, a):
        vma = p.task.mm.vma_lookup(a)
        t, pmd = pmd_at(m, p.task.mm, a)
        await huge_memory.map_anon_folio_pmd_nopf(m, pmd_pfn(pmd), t, pmd_index(a), vma, a)

    _raises(install, r"map_anon_folio_pmd_nopf: lockdep_assert_held\(ptl_pmd")

    async def zero(m, k, p, a):
        vma = p.task.mm.vma_lookup(a)
        t = pmd_at(m, p.task.mm, a)[0]
        await huge_memory.set_huge_zero_folio(m, -1, p.task.mm, vma, a, t, pmd_index(a), 0)

    _raises(zero, r"set_huge_zero_folio: lockdep_assert_held\(ptl_pmd")


# ----------------------------------------------------------- folio lock
def test_folio_split_asserts_the_folio_lock():
    """__folio_split: VM_BUG_ON_FOLIO(!folio_test_locked(folio), folio)."""
    async def split(m, k, p, a):
        folio = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
        await huge_memory_split.split_folio_to_list(m, folio, None)

    _raises(split, r"VM_BUG_ON_FOLIO\(__folio_split: !folio_test_locked")


def test_move_to_new_folio_asserts_both_folio_locks():
    """move_to_new_folio: VM_BUG_ON_FOLIO(!folio_test_locked(src)) and (dst)."""
    async def move(m, k, p, a):
        folio = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
        migrate.move_to_new_folio(m, m.physmem.page(1), folio)

    _raises(move, r"move_to_new_folio: !folio_test_locked\(src\)")

    async def move_dst(m, k, p, a):
        folio = m.physmem.page(pmd_pfn(pmd_at(m, p.task.mm, a)[1]))
        await m.folio_lock_of(folio).lock("test")
        migrate.move_to_new_folio(m, m.physmem.page(1), folio)

    _raises(move_dst, r"move_to_new_folio: !folio_test_locked\(dst\)")


# ------------------------------------------------------------ mmap lock
def test_fault_and_zap_assert_the_mmap_lock():
    """handle_mm_fault (the VMA came from find_vma under mmap_lock) and
    unmap_page_range (Context: mmap_lock held) without it."""
    async def fault(m, k, p, a):
        await memory.handle_mm_fault(m, p.task.mm.vma_lookup(a), a, True)

    _raises(fault, r"handle_mm_fault: mmap_assert_locked\(mmap_lock:main\)")

    async def zap(m, k, p, a):
        tlbg = memory_zap.MmuGather(p.task.mm)
        await memory_zap.unmap_page_range(m, tlbg, p.task.mm.vma_lookup(a), a, a + 2 * MiB)

    _raises(zap, r"unmap_page_range: mmap_assert_locked")


def test_khugepaged_lookups_assert_the_mmap_lock():
    async def revalidate(m, k, p, a):
        khugepaged.hugepage_vma_revalidate(m, p.task.mm, a, True,
                                           khugepaged.CollapseControl(is_khugepaged=True))

    _raises(revalidate, r"hugepage_vma_revalidate: mmap_assert_locked")

    async def collapse(m, k, p, a):
        await khugepaged.madvise_collapse(m, p.task.mm.vma_lookup(a), a, a + 2 * MiB)

    _raises(collapse, r"madvise_collapse: mmap_assert_locked")


def test_vma_changes_assert_the_mmap_write_lock():
    """vma_start_write (__split_vma, vm_flags_reset): mmap_assert_write_locked; the
    read lock is not enough."""
    async def split(m, k, p, a):
        mm = p.task.mm
        await mm.mmap_lock.down_read("test")
        await mmap.split_vma(m, mm.vma_lookup(a), a + 4096)

    _raises(split, r"__split_vma \(vma_start_write\): mmap_assert_write_locked")

    async def flags(m, k, p, a):
        vma = p.task.mm.vma_lookup(a)
        await mmap.vma_modify_flags(m, vma, vma.start, vma.end, vma.flags)

    _raises(flags, r"vma_modify_flags \(vma_start_write\): mmap_assert_write_locked")


def test_with_the_locks_held_the_same_calls_go_through():
    async def fn(m, k):
        p, a = await thp_region(k)
        mm = p.task.mm
        t = pmd_at(m, mm, a)[0]
        ptl = m.table_lock(t)
        await ptl.lock("test")
        table = await pgg.pgtable_trans_huge_withdraw(m, mm, t)
        await pgg.pgtable_trans_huge_deposit(m, mm, t, table)
        await ptl.unlock()
        await mm.mmap_lock.down_write("test")
        assert await memory.handle_mm_fault(m, mm.vma_lookup(a), a, True) == 0
        vma = mm.vma_lookup(a)
        await mmap.vma_modify_flags(m, vma, vma.start, vma.end, vma.flags)
        await mm.mmap_lock.up_write()

    run_machine(fn)


def test_a_bug_raised_with_the_mmap_lock_dropped_is_reported_not_the_cleanup_error(monkeypatch):
    """madvise_collapse drops the mmap lock around a shmem block's scan; a kernel bug
    raised there passes through do_madvise_collapse's ``finally``, whose up_read of the
    lock it no longer holds fails too. The run reports the bug (the cause), not the
    clean-up's ValueError with a traceback."""
    from kmm import khugepaged_file

    async def scan_bug(*args):
        raise KernelBug("hpage_collapse_scan_file: planted")

    async def fn(m, k):
        p = await k.process("main")
        a = await p.mmap(2 * MiB, backing="shmem")
        await p.touch(a, 4096)
        monkeypatch.setattr(khugepaged_file, "hpage_collapse_scan_file", scan_bug)
        await p.madvise(a, 2 * MiB, "collapse")

    with pytest.raises(KernelBug, match="planted"):
        run_machine(fn)
