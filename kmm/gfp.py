"""gfp masks: include/linux/gfp_types.h (the bits, the composite GFP_* masks) and
include/linux/gfp.h (gfp_compaction_allowed), with show_gfp_flags' rendering.

The bits are the kernel's, in its order, so masks print as in the kernel's reports
(GFP_HIGHUSER_MOVABLE is 0x100cca). Kernel names that begin with ``__`` are module
attributes here; code inside a class body must reach them with getattr (Python mangles
``__name`` there).
"""

from __future__ import annotations

__GFP_DMA = 1 << 0
__GFP_HIGHMEM = 1 << 1
__GFP_DMA32 = 1 << 2
__GFP_MOVABLE = 1 << 3
__GFP_RECLAIMABLE = 1 << 4
__GFP_HIGH = 1 << 5
__GFP_IO = 1 << 6
__GFP_FS = 1 << 7
__GFP_ZERO = 1 << 8
__GFP_DIRECT_RECLAIM = 1 << 10
__GFP_KSWAPD_RECLAIM = 1 << 11
__GFP_WRITE = 1 << 12
__GFP_NOWARN = 1 << 13
__GFP_RETRY_MAYFAIL = 1 << 14
__GFP_NOFAIL = 1 << 15
__GFP_NORETRY = 1 << 16
__GFP_MEMALLOC = 1 << 17
__GFP_COMP = 1 << 18
__GFP_NOMEMALLOC = 1 << 19
__GFP_HARDWALL = 1 << 20
__GFP_THISNODE = 1 << 21
__GFP_ACCOUNT = 1 << 22
__GFP_RECLAIM = __GFP_DIRECT_RECLAIM | __GFP_KSWAPD_RECLAIM

# include/linux/mmzone.h: above this order an allocation is "costly" (reclaim and
# compaction treat it differently)
PAGE_ALLOC_COSTLY_ORDER = 3

GFP_ATOMIC = __GFP_HIGH | __GFP_KSWAPD_RECLAIM
GFP_KERNEL = __GFP_RECLAIM | __GFP_IO | __GFP_FS
GFP_KERNEL_ACCOUNT = GFP_KERNEL | __GFP_ACCOUNT
GFP_NOWAIT = __GFP_KSWAPD_RECLAIM | __GFP_NOWARN
GFP_NOIO = __GFP_RECLAIM
GFP_NOFS = __GFP_RECLAIM | __GFP_IO
GFP_USER = __GFP_RECLAIM | __GFP_IO | __GFP_FS | __GFP_HARDWALL
GFP_HIGHUSER = GFP_USER | __GFP_HIGHMEM
GFP_HIGHUSER_MOVABLE = GFP_HIGHUSER | __GFP_MOVABLE
GFP_PGTABLE_KERNEL = GFP_KERNEL | __GFP_ZERO
GFP_PGTABLE_USER = GFP_PGTABLE_KERNEL | __GFP_ACCOUNT
# the THP masks: LIGHT never reclaims; vma_thp_gfp_mask adds what the defrag mode allows
GFP_TRANSHUGE_LIGHT = ((GFP_HIGHUSER_MOVABLE | __GFP_COMP | __GFP_NOMEMALLOC | __GFP_NOWARN)
                       & ~__GFP_RECLAIM)
GFP_TRANSHUGE = GFP_TRANSHUGE_LIGHT | __GFP_DIRECT_RECLAIM

# The kernel's names of composite masks, as alloc_pages accepts them and as
# show_gfp_flags prints them (the composites first, longest match wins).
GFP = {
    "GFP_TRANSHUGE": GFP_TRANSHUGE,
    "GFP_TRANSHUGE_LIGHT": GFP_TRANSHUGE_LIGHT,
    "GFP_HIGHUSER_MOVABLE": GFP_HIGHUSER_MOVABLE,
    "GFP_HIGHUSER": GFP_HIGHUSER,
    "GFP_USER": GFP_USER,
    "GFP_PGTABLE_USER": GFP_PGTABLE_USER,
    "GFP_PGTABLE_KERNEL": GFP_PGTABLE_KERNEL,
    "GFP_KERNEL_ACCOUNT": GFP_KERNEL_ACCOUNT,
    "GFP_KERNEL": GFP_KERNEL,
    "GFP_NOFS": GFP_NOFS,
    "GFP_ATOMIC": GFP_ATOMIC,
    "GFP_NOIO": GFP_NOIO,
    "GFP_NOWAIT": GFP_NOWAIT,
}
_GFP_BITS = {v: k for k, v in globals().items()
             if k.startswith("__GFP_") and k != "__GFP_RECLAIM"}
_GFP_TEXT: dict[int, str] = {}


def format_gfp(gfp: int) -> str:
    """show_gfp_flags: the mask as the kernel's tracepoints print it."""
    text = _GFP_TEXT.get(gfp)
    if text is None:
        rest, parts = gfp, []
        for name, mask in GFP.items():
            if rest & mask == mask:
                parts.append(name)
                rest &= ~mask
        for bit, name in sorted(_GFP_BITS.items()):
            if rest & bit:
                parts.append(name)
        text = _GFP_TEXT[gfp] = "|".join(parts) or "0"
    return text


def gfp_mask(gfp) -> int:
    """A gfp argument as a mask: an int, or a composite name from ``GFP``."""
    return GFP[gfp] if isinstance(gfp, str) else gfp


def gfp_compaction_allowed(gfp: int) -> bool:
    """gfp_compaction_allowed: GFP_NOIO contexts may not migrate (it may need I/O)."""
    return bool(gfp & __GFP_IO)
