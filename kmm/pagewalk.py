"""Read-only page-table walks for smaps, rmap and the invariant checker: mm/pagewalk.c.

These read the tables directly, with no preemption points: callers are reports taken
between steps, or kernel paths already holding what keeps the tables alive.
"""

from __future__ import annotations

from typing import Iterator

from kmm.pgtable import (
    PAGE_SIZE, PMD_SIZE, PUD_SIZE, PGDIR_SIZE, pgd_index, pmd_index, pmd_present,
    pmd_trans_huge, pte_index, pud_index, table_pfn,
)


def walk_leaves(m, mm, start: int, end: int) -> Iterator[tuple[int, str, int]]:
    """(address, "pmd" | "pte", entry) for every non-empty leaf entry in [start, end):
    huge PMDs (present or not, migration entries included) and non-empty PTEs."""
    tables = m.physmem.tables
    pgd = tables[mm.pgd]
    addr = start
    while addr < end:
        e = pgd[pgd_index(addr)]
        if not e:
            addr = (addr + PGDIR_SIZE) & ~(PGDIR_SIZE - 1)
            continue
        e = tables[table_pfn(e)][pud_index(addr)]
        if not e:
            addr = (addr + PUD_SIZE) & ~(PUD_SIZE - 1)
            continue
        pmd_t = tables[table_pfn(e)]
        nxt = (addr + PMD_SIZE) & ~(PMD_SIZE - 1)
        pmd = pmd_t[pmd_index(addr)]
        if pmd:
            if pmd_trans_huge(pmd) or not pmd_present(pmd):
                yield addr & ~(PMD_SIZE - 1), "pmd", pmd
            else:
                pte_t = tables[table_pfn(pmd)]
                a = addr
                stop = min(nxt, end)
                while a < stop:
                    pte = pte_t[pte_index(a)]
                    if pte:
                        yield a, "pte", pte
                    a += PAGE_SIZE
        addr = nxt


def page_tables(m, mm) -> Iterator[tuple[str, int, int]]:
    """(level, table pfn, parent table pfn) of every table reachable from mm's PGD."""
    tables = m.physmem.tables
    yield "pgd", mm.pgd, -1
    for e in tables[mm.pgd]:
        if not e:
            continue
        pud = table_pfn(e)
        yield "pud", pud, mm.pgd
        for e2 in tables[pud]:
            if not e2:
                continue
            pmd = table_pfn(e2)
            yield "pmd", pmd, pud
            for e3 in tables[pmd]:
                if e3 and pmd_present(e3) and not pmd_trans_huge(e3):
                    yield "pte", table_pfn(e3), pmd
