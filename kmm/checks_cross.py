"""Checks across structures and processes, for kmm.checks (which registers them):
every mapping inside a VMA, anon-exclusive ownership, RCU grace periods, and the
cross-process view of the bytes the workload wrote.

Emulator-only (the kernel's twins: VM_BUG_ONs on the rmap and COW paths, and the
COW selftests). Each check is ``fn(m, k) -> list of error strings``; a breach found
nowhere else by the mapping check: a mapping with no VMA to reach it by, a page two
processes share although marked exclusive (the next write reuses it in place), a byte
one process wrote showing in another after a fork.
"""

from __future__ import annotations

from collections import Counter

from kmm import checks_data, checks_hugetlb, pagewalk, rcupdate, swapfile
from kmm.mm_types import PG_anon_exclusive, PG_swapcache
from kmm.pgtable import (
    HPAGE_PMD_NR, PMD_SIZE, SWP_MIGRATION_READ_EXCLUSIVE, TASK_SIZE, _PAGE_SWP_EXCLUSIVE,
    is_migration_entry, is_pmd_migration_entry, is_writable_migration_entry,
    migration_entry_pfn, pmd_pfn, pmd_present, pte_pfn, pte_present, pte_special,
    swp_entry, swp_offset, swp_type,
)


def _mapped_tasks(m):
    """Every mm with page tables, an exiting one too (Machine.tasks_with_tables)."""
    return m.tasks_with_tables()


def vma_errors(m, k=None) -> list[str]:
    """Every mapping lies inside a VMA of its mm: a present PTE, a swap or migration
    entry in a VMA; a huge PMD (or PMD migration entry) with its whole 2 MiB in one.
    A mapping left behind by munmap, mremap or a VMA split is reachable by no fault,
    zap or rmap walk that goes by VMAs, so its page leaks or is read by the wrong
    process later."""
    errs = []
    for task in _mapped_tasks(m):
        mm = task.mm
        for addr, level, e in pagewalk.walk_leaves(m, mm, 0, TASK_SIZE):
            vma = mm.vma_lookup(addr)
            if vma is None:
                errs.append(f"{task.name}: {level.upper()} {e:#x} at {addr:#x} lies in no VMA")
            elif level == "pmd" and vma.end < addr + PMD_SIZE:
                errs.append(f"{task.name}: huge PMD {e:#x} at {addr:#x} runs past the end "
                            f"of its VMA [{vma.start:#x}, {vma.end:#x})")
    return errs


def _exclusive_migration(e: int) -> bool:
    return is_writable_migration_entry(e) or swp_type(e) == SWP_MIGRATION_READ_EXCLUSIVE


def anon_exclusive_errors(m, k=None) -> list[str]:
    """Anon-exclusive ownership (mm/rmap.c, PageAnonExclusive): a page marked
    PG_anon_exclusive is mapped by one mm, by one mapping (a PTE of the page or a PMD
    of its folio, or a migration entry standing for either), so a write there may
    reuse it in place without COW; an exclusive migration entry likewise stands for
    the page's only mapping; an exclusive swap PTE is its slot's only PTE, and a
    page swapped in as exclusive leaves no other PTE on its slot. After fork shares a
    page, neither process may hold it exclusively, or one's write shows in the
    other."""
    errs: list[str] = []
    pm = m.physmem
    pte_mms: dict[int, set] = {}
    pte_n: Counter = Counter()
    pmd_mms: dict[int, set] = {}
    pmd_n: Counter = Counter()
    claims = []  # exclusive migration entries: (task, addr, pfn, is_pmd)
    slots: dict[int, list] = {}  # swap entry -> [(task, exclusive bit)]
    for task in _mapped_tasks(m):
        name = task.name
        for addr, level, e in pagewalk.walk_leaves(m, task.mm, 0, TASK_SIZE):
            if level == "pmd":
                if pmd_present(e):
                    pfn = pmd_pfn(e)
                    if m.is_huge_zero_pfn(pfn):
                        continue
                elif is_pmd_migration_entry(e):
                    pfn = migration_entry_pfn(e)
                    if _exclusive_migration(e):
                        claims.append((name, addr, pfn, True))
                else:
                    continue
                pmd_mms.setdefault(pfn, set()).add(name)
                pmd_n[pfn] += 1
                continue
            if pte_present(e):
                if pte_special(e):
                    continue
                pfn = pte_pfn(e)
            elif is_migration_entry(e):
                pfn = migration_entry_pfn(e)
                if _exclusive_migration(e):
                    claims.append((name, addr, pfn, False))
            elif swapfile.is_swap_entry(m, e):
                slots.setdefault(swapfile.pte_to_swp_entry(e), []).append(
                    (name, bool(e & _PAGE_SWP_EXCLUSIVE)))
                continue
            else:
                continue
            pte_mms.setdefault(pfn, set()).add(name)
            pte_n[pfn] += 1

    def owners(pfn: int) -> tuple[set, int]:
        head = pm.pages[pfn].head if pfn in pm.pages else pfn
        return (pte_mms.get(pfn, set()) | pmd_mms.get(head, set()),
                pte_n[pfn] + pmd_n[head])

    def claim(what: str, pfn: int) -> None:
        mms, n = owners(pfn)
        if len(mms) > 1:
            errs.append(f"pfn {pfn:#x}: {what} but mapped by {len(mms)} mms "
                        f"({', '.join(sorted(mms))})")
        elif n > 1:
            errs.append(f"pfn {pfn:#x}: {what} but mapped {n} times")

    for pfn, page in pm.pages.items():
        if page.flags & PG_anon_exclusive:
            claim("PG_anon_exclusive", pfn)
            folio = pm.folio(pfn)
            if folio.flags & PG_swapcache and slots:
                slot = swp_entry(swp_type(folio.swap), swp_offset(folio.swap) + pfn - folio.pfn)
                if slots.get(slot):
                    errs.append(f"pfn {pfn:#x}: PG_anon_exclusive in the swap cache but "
                                f"{len(slots[slot])} swap PTEs still name its slot")
    for name, addr, pfn, is_pmd in claims:
        for p in range(pfn, pfn + (HPAGE_PMD_NR if is_pmd else 1)):
            claim(f"exclusive migration entry of {name} at {addr:#x}", p)
    for slot, ptes in slots.items():
        if len(ptes) > 1 and any(ex for _, ex in ptes):
            errs.append(f"swap entry {slot:#x}: an exclusive swap PTE but {len(ptes)} PTEs "
                        f"({', '.join(sorted(n for n, _ in ptes))})")
    return errs


def rcu_errors(m, k=None) -> list[str]:
    """No RCU callback outlives its grace period (kmm.rcupdate)."""
    return rcupdate.rcu_errors(m)


def cross_process_errors(m, k) -> list[str]:
    """The cross-process view: what each process reads is what it wrote itself (its
    shadow, forked with it) or zero. A byte another process wrote, in its own memory
    or after a fork in memory they shared, never shows through: a COW that wrote into
    a shared page, or a page still shared after one side broke COW, shows here as a
    byte the process never wrote."""
    if k is None:
        return []
    errs: list[str] = []
    writer: dict[int, str] = {}
    for name in sorted(k.shadow):
        for table in (k.shadow[name], k.lazy.get(name, {})):
            for addr in table:
                writer.setdefault(addr, name)
    for name, shadow in sorted(k.shadow.items()):
        task = m.tasks.get(name)
        if task is None or not task.alive:
            continue
        lazy = k.lazy.get(name, {})
        unknown = k.unknown.get(name, ())
        # shared hugetlb mappings show other processes' bytes by design
        skip = checks_hugetlb.unchecked_ranges(task)
        for addr, other in writer.items():
            if addr in shadow or addr in lazy or addr in unknown:
                continue
            if skip and any(lo <= addr < hi for lo, hi in skip):
                continue
            got = checks_data.read_mapped_byte(m, task.mm, addr)
            if got not in (None, 0):
                errs.append(f"{name}: byte at {addr:#x} reads {got}, but {name} never "
                            f"wrote it (it was written by {other})")
    return errs
