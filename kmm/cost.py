"""Emulated costs, in nanoseconds, of the operations the scheduler's clock advances by.

Emulator-only (no kernel twin). One table so every mechanism module reads its costs
from here and none imports the machine assembly for them. The figures are orders of
magnitude from a modern x86 core, not measurements of one.
"""

COST_ENTRY = 1            # a page-table entry read or write (cached line)
COST_ACCESS = 1           # a user load or store through the TLB
COST_LOCK = 20            # an uncontended atomic on a cache line (lock, unlock)
COST_CLEAR_PAGE = 250     # clear_page, 4 KiB
COST_COPY_PAGE = 500      # copy_page, 4 KiB
COST_CLEAR_HUGE = 100_000  # clearing 2 MiB at ~20 GB/s
COST_RMQUEUE = 100        # rmqueue / __free_one_page under zone->lock
COST_WMARK_CHECK = 20     # a failed get_page_from_freelist (watermark check only)
COST_SCAN_PFN = 10        # per pfn a compaction scanner examines
COST_LOCAL_FLUSH = 100    # a local TLB flush
COST_IPI = 2000           # a TLB shootdown IPI round trip
COST_SWAP_WRITE = 2500    # per 4 KiB page: zram compresses and stores it
COST_SWAP_READ = 1000     # per 4 KiB page: zram decompresses it
