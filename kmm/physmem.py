"""Emulated physical memory: struct pages and frame contents, both sparse.

Emulator-only (no kernel twin). Nothing is created for a frame until it is used, so a
1 TiB machine starts as fast and as small as a 1 GiB one: ``pages`` holds the struct
pages that were ever touched, ``data`` the frames that hold a non-zero byte (an absent
frame reads as zeros, so clearing a page is forgetting it), ``tables`` the entries of
page-table frames.
"""

from __future__ import annotations

from kmm.mm_types import Page
from kmm.pgtable import PAGE_SIZE, PTRS_PER_TABLE

_ZERO = bytes(PAGE_SIZE)


class PhysMem:
    __slots__ = ("nr_pages", "pages", "data", "tables", "page_cls", "table_cls")

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        # strict mode (kmm.atomic.make_strict) swaps in guarded classes
        self.page_cls = Page
        self.table_cls = list
        self.pages: dict[int, Page] = {}
        self.data: dict[int, bytearray] = {}
        self.tables: dict[int, list[int]] = {}

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
            frame = self.data[pfn] = bytearray(PAGE_SIZE)
        frame[offset:offset + len(data)] = data

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
