"""NUMA memory policy: mm/mempolicy.c (first part: the policy an allocation follows).

Filled in below: the default (local) policy.
"""

from __future__ import annotations

from kmm import mmzone, page_alloc
from kmm.gfp import __GFP_DIRECT_RECLAIM, __GFP_NORETRY, __GFP_THISNODE
from kmm.pgtable import HPAGE_PMD_ORDER


async def vma_alloc_folio(m, gfp: int, order: int, vma, addr: int) -> int:
    """vma_alloc_folio -> alloc_pages_mpol with the default local policy: a PMD-order
    folio is first tried on the local node only with __GFP_NORETRY ("don't reclaim
    unnecessarily, just compact"), and only a mask that allows direct reclaim tries
    again the ordinary way. Returns the pfn, or -1."""
    nid = mmzone.numa_node_id(m)
    if order == HPAGE_PMD_ORDER:
        pfn = await page_alloc.alloc_pages(m, order, gfp | __GFP_THISNODE | __GFP_NORETRY,
                                           "thp", nid)
        if pfn >= 0 or not gfp & __GFP_DIRECT_RECLAIM:
            return pfn
    return await page_alloc.alloc_pages(m, order, gfp, "thp" if order else "anon", nid)
