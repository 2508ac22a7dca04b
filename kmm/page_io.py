"""Swap I/O: mm/page_io.c (swap_writeout, swap_read_folio) on a synchronous device.

The device is zram-like (SWP_SYNCHRONOUS_IO): a write or read completes before the call
returns, in emulated time. Its contents are ``swap_info.store`` (slot -> the page's
bytes; an absent slot reads as zeros). A folio whose every byte is zero is not written
at all: its slots are marked in the zeromap, and reading them back just zero-fills
(so neither counts pswpout/pswpin), as 6.18 does. Left out: zswap, the swap plug
(batched bios), writeback completion in another context.
"""

from __future__ import annotations

from kmm import atomic, huge_memory_mthp
from kmm.mm_types import PG_uptodate, PG_writeback, Page
from kmm.pgtable import HPAGE_PMD_NR, swp_offset
from kmm.cost import COST_SWAP_WRITE, COST_SWAP_READ


AOP_WRITEPAGE_ACTIVATE = 0x80000


def count_swpout_vm_event(m, folio: Page) -> None:
    """count_swpout_vm_event: thp_swpout for a PMD-size folio, pswpout per page."""
    if folio.nr_pages >= HPAGE_PMD_NR:
        m.vmstat.count_vm_event("thp_swpout")
    huge_memory_mthp.count_mthp_stat(m, folio.order, "swpout")
    m.vmstat.count_vm_event("pswpout", folio.nr_pages)


def is_folio_zero_filled(m, folio: Page) -> bool:
    pm = m.physmem
    return all(pm.is_zero(p) for p in range(folio.pfn, folio.pfn + folio.nr_pages))


async def swap_writeout(m, folio: Page) -> int:
    """swap_writeout: write a swap-cache folio to its slots. A folio no page table
    references any more is just dropped from the swap cache; a zero-filled one only
    sets its zeromap bits. Returns 0 (written, or nothing to write).
    Context: folio locked on entry, unlocked on return (the write is synchronous, so
    writeback has ended too)."""
    from kmm import swapfile
    lk = m.folio_lock_of(folio)
    if await swapfile.folio_free_swap(m, folio):
        await lk.unlock()
        return 0
    si = m.swap_info
    off = swp_offset(folio.swap)
    nr = folio.nr_pages
    if is_folio_zero_filled(m, folio):  # swap_zeromap_folio_set
        for o in range(off, off + nr):
            si.zeromap.add(o)
            si.store.pop(o, None)
        await lk.unlock()
        return 0
    for o in range(off, off + nr):  # swap_zeromap_folio_clear
        si.zeromap.discard(o)
    await __swap_writepage(m, folio)
    return 0


async def __swap_writepage(m, folio: Page) -> None:
    """__swap_writepage -> swap_writepage_bdev_sync: writeback starts, the folio is
    unlocked, the synchronous bio completes and writeback ends."""
    si = m.swap_info
    off = swp_offset(folio.swap)
    atomic.folio_set_flags_locked(folio, PG_writeback)  # folio_start_writeback
    await m.folio_lock_of(folio).unlock()
    await m.sched.point("swap_writepage", COST_SWAP_WRITE * folio.nr_pages, pfn=folio.pfn,
                        slot=off, nr=folio.nr_pages)
    pm = m.physmem
    for i in range(folio.nr_pages):
        frame = pm.data.get(folio.pfn + i)
        if frame is None or not any(frame):
            si.store.pop(off + i, None)
        else:
            si.store[off + i] = bytes(frame)
    count_swpout_vm_event(m, folio)
    atomic.folio_clear_flags_locked(folio, PG_writeback)  # folio_end_writeback


async def swap_read_folio(m, folio: Page) -> None:
    """swap_read_folio: fill the folio from its slots (``folio.swap``): zero-fill for
    zeromap slots, else a synchronous read counted in pswpin. The folio becomes
    uptodate and is unlocked (folio_end_read). Context: folio locked on entry."""
    si = m.swap_info
    off = swp_offset(folio.swap)
    nr = folio.nr_pages
    pm = m.physmem
    if all(o in si.zeromap for o in range(off, off + nr)):  # swap_read_folio_zeromap
        pm.clear(folio.pfn, nr)
    else:
        await m.sched.point("swap_read_folio", COST_SWAP_READ * nr, pfn=folio.pfn,
                            slot=off, nr=nr)
        for i in range(nr):
            data = si.store.get(off + i)
            if data is None:
                pm.clear(folio.pfn + i)
            else:
                pm.data[folio.pfn + i] = bytearray(data)
        huge_memory_mthp.count_mthp_stat(m, folio.order, "swpin")
        m.vmstat.count_vm_event("pswpin", nr)
    atomic.folio_set_flags_locked(folio, PG_uptodate)
    await m.folio_lock_of(folio).unlock()
