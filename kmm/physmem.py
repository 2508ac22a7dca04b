"""Emulated physical memory: struct pages and frame contents, both sparse.

Emulator-only (no kernel twin). Nothing is created for a frame until it is used, so a
1 TiB machine starts as fast and as small as a 1 GiB one: ``pages`` holds the struct
pages that were ever touched, ``data`` the frames that hold a non-zero byte (an absent
frame reads as zeros, so clearing a page is forgetting it), ``tables`` the entries of
page-table frames.

Frames of a PMD-mapped THP (``huge_backing``, called by the store path when it writes
through a 2 MiB translation) are 4 KiB views into one 2 MiB chunk of a host mapping
advised MADV_HUGEPAGE, so the host backs the emulated THP with a THP of its own: the
first byte written to each 4 KiB frame costs the host a 4 KiB share of one THP fault,
not a 4 KiB fault of its own (which is what a fresh ``bytearray(4096)`` costs, and
what the host kernel does not pay for a store into a THP). Views behave as the
bytearrays do (index, slice, ``bytes()``, ``any()``); a chunk, once given to a 2 MiB
range of pfns, backs every frame later made there. When a machine goes away its
chunks go to a pool the next machine of this process takes from (a frame is zeroed
when it is made, so a chunk needs nothing else): the host memory is reused as the
host kernel reuses freed pages, not faulted in again.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref

from kmm.mm_types import Page
from kmm.pgtable import PAGE_SIZE, PTRS_PER_TABLE

_ZERO = bytes(PAGE_SIZE)
_CHUNK = 2 << 20       # one host THP
_ARENA_CHUNKS = 16     # chunks per host mapping (few mappings: vm.max_map_count)
_POOL: list[memoryview] = []  # chunks of machines gone, for the next ones
_POOL_MAX = 256        # at most this much host memory (512 MiB) kept for reuse


def _recycle(chunks: dict) -> None:
    """The chunks of a machine gone, to the pool (as many as it keeps)."""
    room = _POOL_MAX - len(_POOL)
    if room > 0:
        _POOL.extend(list(chunks.values())[:room])


class PhysMem:
    __slots__ = ("nr_pages", "pages", "data", "tables", "page_cls", "table_cls", "chunks",
                 "_arena", "_arena_next", "__weakref__")

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        # strict mode (kmm.atomic.make_strict) swaps in guarded classes
        self.page_cls = Page
        self.table_cls = list
        self.pages: dict[int, Page] = {}
        self.data: dict[int, bytearray] = {}
        self.tables: dict[int, list[int]] = {}
        self.chunks: dict[int, memoryview] = {}  # pfn >> 9 -> its 2 MiB host chunk
        self._arena: memoryview | None = None
        self._arena_next = _ARENA_CHUNKS

    def page(self, pfn: int) -> Page:
        """pfn_to_page."""
        p = self.pages.get(pfn)
        if p is None:
            if not 0 <= pfn < self.nr_pages:
                raise IndexError(f"pfn {pfn:#x} beyond the end of memory")
            # a tail of a large folio is created lazily too: find its head
            pages = self.pages
            head = pfn
            for order in range(1, 11):
                h = pfn & ~((1 << order) - 1)
                hp = pages.get(h)
                if hp is not None and hp.head == h and hp.order >= order:
                    head = h
                    break
            p = pages[pfn] = self.page_cls(pfn, head)
        return p

    def folio(self, pfn: int) -> Page:
        """page_folio(pfn_to_page(pfn)): the head page."""
        p = self.page(pfn)
        return p if p.head == pfn else self.page(p.head)

    # ---------------------------------------------------------- frame contents
    def read(self, pfn: int, offset: int, n: int) -> bytes:
        frame = self.data.get(pfn)
        if frame is None:
            return _ZERO[:n]
        return bytes(frame[offset:offset + n])

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        frame = self.data.get(pfn)
        if frame is None:
            if not any(data):
                return  # zeros into a zero frame: nothing to remember
            frame = self.new_frame(pfn)
        frame[offset:offset + len(data)] = data

    def new_frame(self, pfn: int):
        """A zeroed frame for pfn, kept in ``data``: a view into its 2 MiB range's host
        chunk if it has one, else a bytearray of its own."""
        chunk = self.chunks.get(pfn >> 9)
        if chunk is None:
            frame = self.data[pfn] = bytearray(PAGE_SIZE)
            return frame
        off = (pfn & 511) << 12
        frame = self.data[pfn] = chunk[off:off + PAGE_SIZE]
        frame[:] = _ZERO  # the chunk may hold a frame forgotten since
        return frame

    def huge_backing(self, pfn: int) -> None:
        """Give the 2 MiB range of pfns around pfn (a PMD-mapped THP's) a host chunk
        advised MADV_HUGEPAGE, carved from an arena of a few chunks."""
        key = pfn >> 9
        if key in self.chunks:
            return
        if not self.chunks:  # the first: its chunks go to the pool when self goes
            weakref.finalize(self, _recycle, self.chunks)
        if _POOL:
            self.chunks[key] = _POOL.pop()
            return
        if self._arena_next == _ARENA_CHUNKS:
            size = _ARENA_CHUNKS * _CHUNK
            mm = mmap.mmap(-1, size + _CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            skip = -base % _CHUNK  # 2 MiB aligned, so the host can map it with a PMD
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mm.madvise(mmap.MADV_HUGEPAGE, skip, size)
            self._arena = memoryview(mm)[skip:skip + size]
            self._arena_next = 0
        i = self._arena_next
        self._arena_next = i + 1
        self.chunks[key] = self._arena[i * _CHUNK:(i + 1) * _CHUNK]


    def clear(self, pfn: int, nr: int = 1) -> None:
        """clear_page / folio_zero_user: lazily, by forgetting the frames."""
        data = self.data
        if nr == 1:
            data.pop(pfn, None)
        elif len(data) < nr:  # fewer frames held than cleared: look only at those
            for p in [p for p in data if pfn <= p < pfn + nr]:
                del data[p]
        else:
            for p in range(pfn, pfn + nr):
                data.pop(p, None)

    def copy(self, dst: int, src: int) -> None:
        """copy_page."""
        frame = self.data.get(src)
        if frame is None:
            self.data.pop(dst, None)
        else:
            self.data[dst] = bytearray(frame)

    def is_zero(self, pfn: int) -> bool:
        frame = self.data.get(pfn)
        return frame is None or not any(frame)

    # ------------------------------------------------------- page-table frames
    def new_table(self, pfn: int) -> list[int]:
        cls = self.table_cls
        t = [0] * PTRS_PER_TABLE
        if cls is not list:
            t = cls(t)
        self.tables[pfn] = t
        return t

    def drop_table(self, pfn: int) -> None:
        del self.tables[pfn]
