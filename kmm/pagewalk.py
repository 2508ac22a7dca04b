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


def _slots(base: int, span: int, index, start: int, last: int) -> range:
    """The slots of the table covering [base, base + span) that overlap [start, last]."""
    return range(index(start) if base <= start else 0,
                 (index(last) if last < base + span else 511) + 1)


def walk_leaves(m, mm, start: int, end: int) -> Iterator[tuple[int, str, int]]:
    """(address, "pmd" | "pte", entry) for every non-empty leaf entry in [start, end):
    huge PMDs (present or not, migration entries included) and non-empty PTEs.

    Empty entries are skipped a table at a time (the invariant checker walks the whole
    address space after every operation), not stepped over one PMD at a time."""
    if start >= end:
        return
    tables = m.physmem.tables
    last = end - 1
    pgd = tables[mm.pgd]
    for i in range(pgd_index(start), pgd_index(last) + 1):
        e = pgd[i]
        if not e:
            continue
        base_g = i * PGDIR_SIZE
        pud_t = tables[table_pfn(e)]
        for j in _slots(base_g, PGDIR_SIZE, pud_index, start, last):
            e = pud_t[j]
            if not e:
                continue
            base_u = base_g + j * PUD_SIZE
            pmd_t = tables[table_pfn(e)]
            for k in _slots(base_u, PUD_SIZE, pmd_index, start, last):
                pmd = pmd_t[k]
                if not pmd:
                    continue
                base_m = base_u + k * PMD_SIZE
                if pmd_trans_huge(pmd) or not pmd_present(pmd):
                    yield base_m, "pmd", pmd
                    continue
                pte_t = tables.get(table_pfn(pmd))
                if pte_t is None:  # a PMD pointing at no table (a bug the checker names)
                    continue
                for n in _slots(base_m, PMD_SIZE, pte_index, start, last):
                    pte = pte_t[n]
                    if pte:
                        yield base_m + n * PAGE_SIZE, "pte", pte


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
