"""Write-protect faults (copy-on-write): mm/memory.c's do_wp_page side.

``do_wp_page`` either reuses an anonymous folio only this process can reach
(``wp_can_reuse_anon_folio``, ``wp_page_reuse``) or copies it (``wp_page_copy``),
re-reading the PTE under its lock after the copy and backing out if it changed. The
fault entry that dispatches here (``handle_pte_fault``) stays in kmm/memory.py.
"""

from __future__ import annotations

from kmm import atomic, memory, page_alloc, rmap, swap, tlb
from kmm.cost import COST_CLEAR_PAGE, COST_COPY_PAGE
from kmm.mm_types import PG_anon_exclusive, VM_SHARED, VmArea
from kmm.pgtable import pfn_pte, pte_mkdirty, pte_mkwrite, pte_mkyoung, pte_pfn, pte_special


# ---------------------------------------------------------------- COW
async def do_wp_page(m, vmf: memory.Vmf) -> int:
    """do_wp_page: a write to a present read-only PTE. Reuse the page if this mapping
    is its only user (PageAnonExclusive, or the folio's only reference), else copy.

    Context: PTE lock held on entry; released on return.
    """
    vma = vmf.vma
    orig = vmf.orig_pte
    pfn = pte_pfn(orig)
    if vma.flags & VM_SHARED:  # wp_page_shared: no COW in a shared mapping
        return await wp_page_reuse(m, vmf)
    if not pte_special(orig):
        page = m.physmem.page(pfn)
        folio = m.physmem.folio(pfn)
        if folio.anon_vma is not None and (rmap.page_anon_exclusive(page) or
                                           await wp_can_reuse_anon_folio(m, folio, vma)):
            atomic.folio_set_flags_locked(page, PG_anon_exclusive)
            return await wp_page_reuse(m, vmf)
        await atomic.folio_ref_add(m, folio, 1)  # held across the copy
    else:
        folio = None
    await vmf.ptl.unlock()
    return await wp_page_copy(m, vmf, folio)


async def wp_can_reuse_anon_folio(m, folio, vma: VmArea) -> bool:
    """wp_can_reuse_anon_folio: only this mapping references the folio.

    A large folio may be reused when every reference is a mapping in this mm
    (__wp_can_reuse_large_anon_folio); a small one when its refcount is 1.
    """
    if folio.order:
        if folio.large_mapcount != folio.refcount:
            return False
        return rmap.folio_mapping_mms(m, folio) <= {vma.mm.id}
    if folio.refcount > 1:
        return False
    lk = m.folio_lock_of(folio)
    if not await lk.trylock("wp_can_reuse_anon_folio"):
        return False
    ok = folio.refcount == 1
    if ok:
        atomic.folio_set_field_locked(folio, "anon_vma", vma.anon_vma)  # folio_move_anon_rmap
    await lk.unlock()
    return ok


async def wp_page_reuse(m, vmf: memory.Vmf) -> int:
    entry = pte_mkyoung(vmf.orig_pte)
    entry = pte_mkwrite(pte_mkdirty(entry))
    await atomic.entry_set(m, "pte", vmf.pte_tbl, vmf.pte_idx, entry)  # ptep_set_access_flags
    await vmf.ptl.unlock()
    return 0


async def wp_page_copy(m, vmf: memory.Vmf, old_folio) -> int:
    """wp_page_copy: copy the page (or zero-fill, from the zero page), then swap the
    PTE under the lock if it is still the one we faulted on.

    Context: called without the PTE lock; old_folio carries an extra reference.
    """
    vma = vmf.vma
    mm = vma.mm
    old_pfn = pte_pfn(vmf.orig_pte)
    if not await rmap.anon_vma_prepare(m, vma):
        return memory.VM_FAULT_OOM
    new = await page_alloc.vma_alloc_folio(m, "GFP_HIGHUSER_MOVABLE", 0, vma, vmf.address)
    if new < 0:
        if old_folio is not None:
            await swap.folio_put(m, old_folio)
        return memory.VM_FAULT_OOM
    if old_folio is None:
        atomic.step_owned(m, "clear_page", COST_CLEAR_PAGE, new)
    else:
        await m.sched.point("copy_page", COST_COPY_PAGE, dst=new, src=old_pfn)
        m.physmem.copy(new, old_pfn)
    new_folio = m.physmem.page(new)
    res = await memory.pte_offset_map_lock(m, vmf.pmd_tbl, vmf.pmd_idx)
    if res is not None:
        tbl, ptl = res
        if await atomic.entry_read(m, "pte", tbl, vmf.pte_idx) == vmf.orig_pte:
            if old_folio is None:
                mm.rss_anon += 1
            elif old_folio.mapping is not None:  # a page-cache page's COW: file -> anon
                mm.rss_shmem -= 1
                mm.rss_anon += 1
            entry = pte_mkwrite(pte_mkdirty(pfn_pte(new, vma.page_prot)))
            # ptep_clear_flush: no CPU may keep writing through the old translation
            await atomic.entry_get_and_clear(m, "pte", tbl, vmf.pte_idx)
            await tlb.flush_tlb_page(m, mm, vmf.address)
            await rmap.folio_add_new_anon_rmap(m, new_folio, vma, vmf.address, pmd=False)
            await swap.folio_add_lru(m, new_folio)  # folio_add_lru_vma
            await atomic.entry_set(m, "pte", tbl, vmf.pte_idx, entry)
            if old_folio is not None:
                await rmap.folio_remove_rmap_ptes(m, old_folio, old_pfn, 1)
                await swap.folio_put(m, old_folio)  # the reference the old PTE held
            new_folio = None
        await ptl.unlock()
    if new_folio is not None:
        await swap.folio_put(m, new_folio)  # lost the race: the new page is not needed
    if old_folio is not None:
        await swap.folio_put(m, old_folio)
    return 0
