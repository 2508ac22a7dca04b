"""struct page / folio, vm_area_struct, mm_struct and anon_vma records.

include/linux/mm_types.h. A folio is its head page: ``order`` and the large-folio
mapcounts live on the head, ``compound_head`` on every page. Mapcounts are stored as
plain counts (the kernel's fields are -1 based).
"""

from __future__ import annotations

from kmm.pgtable import HPAGE_PMD_NR, PAGE_SHIFT

# page flags (include/linux/page-flags.h), the ones the THP paths read or write
PG_head = 1 << 0
PG_lru = 1 << 1
PG_dirty = 1 << 2
PG_referenced = 1 << 3
PG_swapbacked = 1 << 4
PG_anon_exclusive = 1 << 5
PG_reserved = 1 << 6
PG_partially_mapped = 1 << 7
PG_uptodate = 1 << 8
PG_active = 1 << 9
PG_swapcache = 1 << 10
PG_writeback = 1 << 11
PG_isolated = 1 << 12   # off the LRU in a private list (folio_isolate_lru)
PG_unevictable = 1 << 13

# page types (page_type): what a frame not mapped by users is for
PGTY_none = ""
PGTY_buddy = "buddy"
PGTY_table = "table"
PGTY_zero = "zero"
PGTY_hugetlb = "hugetlb"  # a hugetlb folio (in the pool or in use): never on the LRU

# vm_flags (include/linux/mm.h)
VM_READ = 1 << 0
VM_WRITE = 1 << 1
VM_EXEC = 1 << 2
VM_SHARED = 1 << 3
VM_MAYREAD = 1 << 4
VM_MAYWRITE = 1 << 5
VM_MAYEXEC = 1 << 6
VM_MAYSHARE = 1 << 7
VM_LOCKED = 1 << 13
VM_NORESERVE = 1 << 21
VM_HUGETLB = 1 << 22
VM_HUGEPAGE = 1 << 29
VM_NOHUGEPAGE = 1 << 30


class Page:
    """struct page, created on first use; the head page of a large folio is the folio."""

    __slots__ = (
        "pfn", "flags", "refcount", "mapcount", "head", "order", "entire_mapcount",
        "large_mapcount", "nr_pages_mapped", "anon_vma", "index", "lock", "ptl",
        "pt_deposit", "page_type", "on_deferred_list", "mm", "pt_level", "swap",
        "mapping", "pt_share_count",
    )

    def __init__(self, pfn: int, head: int = -1) -> None:
        self.pfn = pfn
        self.flags = 0
        self.refcount = 0
        self.mapcount = 0          # PTE mappings of this page
        self.head = pfn if head < 0 else head  # compound_head
        self.order = 0             # folio_order, on the head
        self.entire_mapcount = 0   # PMD mappings of the whole folio (head)
        self.large_mapcount = 0    # all page-table mappings of the folio (head)
        self.nr_pages_mapped = 0   # subpages mapped by at least one PTE (head)
        self.anon_vma = None       # folio->mapping for anonymous folios
        self.index = 0             # linear page index in the anon_vma's address space
        self.lock = None           # FolioLock, created on first use
        self.ptl = None            # split ptlock, for page-table pages
        self.pt_deposit: list[int] | None = None  # pmd_huge_pte list, PMD table pages
        self.page_type = PGTY_none
        self.on_deferred_list = False
        self.mm = None             # page-table pages: the owning mm (pt_mm)
        self.pt_level = ""         # page-table pages: pgd, pud, pmd or pte
        self.swap = 0              # folio->swap: the first page's swap slot, as a PTE-format
                                   # swap entry (pgtable.swp_entry), for a swap-cache folio
        self.mapping = None        # folio->mapping of a page-cache folio (filemap.AddressSpace);
                                   # index is then its page offset in the file
        self.pt_share_count = 0    # ptdesc->pt_share_count of a PMD table: how many more
                                   # PUD entries than its own mm's map it (hugetlb sharing)

    @property
    def nr_pages(self) -> int:
        return 1 << self.order

    def __repr__(self) -> str:
        return (f"<page pfn={self.pfn} order={self.order} ref={self.refcount} "
                f"map={self.mapcount} entire={self.entire_mapcount} type={self.page_type!r}>")


class AnonVma:
    """struct anon_vma: the rmap root for anonymous folios; chains link it to VMAs."""

    __slots__ = ("id", "root", "rwsem", "vmas", "parent", "refcount")

    def __init__(self, id: int, root: "AnonVma | None", rwsem) -> None:
        self.id = id
        self.root = root or self
        self.rwsem = rwsem if root is None else root.rwsem  # the root's rwsem is the lock
        self.vmas: list[VmArea] = []   # anon_vma_chain: the VMAs this anon_vma serves
        self.parent = None
        self.refcount = 1


class VmArea:
    """struct vm_area_struct for an anonymous private mapping."""

    __slots__ = ("mm", "start", "end", "flags", "pgoff", "anon_vma", "avc", "page_prot",
                 "vm_file", "vm_private_data", "hugetlb_file", "vm_policy")

    def __init__(self, mm: "MmStruct", start: int, end: int, flags: int, pgoff: int) -> None:
        self.mm = mm
        self.start = start
        self.end = end
        self.flags = flags
        self.pgoff = pgoff          # vm_pgoff: start >> PAGE_SHIFT for a new anon VMA
        self.anon_vma: AnonVma | None = None
        self.avc: list[AnonVma] = []  # anon_vma_chain: every anon_vma linked to this VMA
        self.vm_file = None          # shmem: the shmem.ShmemFile mapped (pgoff in file pages)
        self.hugetlb_file = None     # hugetlb: the hugetlbfs file (kmm.hugetlb_resv.HugetlbFile)
        self.vm_private_data = None  # hugetlb: reservation map and HPAGE_RESV_* flags
        self.vm_policy = None        # mbind: the VMA's kmm.mempolicy.Mempolicy (None: the task's)
        from kmm.pgtable import vm_page_prot
        self.page_prot = vm_page_prot(flags)

    def linear_page_index(self, addr: int) -> int:
        return ((addr - self.start) >> PAGE_SHIFT) + self.pgoff

    def address_of(self, index: int) -> int:
        return self.start + ((index - self.pgoff) << PAGE_SHIFT)

    def __repr__(self) -> str:
        return f"<vma {self.start:#x}-{self.end:#x} flags={self.flags:#x}>"


class MmStruct:
    """struct mm_struct: the VMAs, the page-table root, locks and counters."""

    __slots__ = (
        "id", "owner", "pgd", "vmas", "mmap_lock", "page_table_lock", "rss_anon",
        "nr_ptes", "pgtables_bytes", "flags", "users", "cpumask", "huge_zero_ref",
        "khugepaged_slot", "swapents", "rss_shmem",
    )

    def __init__(self, id: int, owner: str, pgd: int, mmap_lock, page_table_lock) -> None:
        self.id = id
        self.owner = owner
        self.pgd = pgd
        self.vmas: list[VmArea] = []    # sorted by start
        self.mmap_lock = mmap_lock
        self.page_table_lock = page_table_lock
        self.rss_anon = 0               # MM_ANONPAGES
        self.swapents = 0               # MM_SWAPENTS
        self.rss_shmem = 0              # MM_SHMEMPAGES
        self.nr_ptes = 0                # PTE tables, deposited ones included
        self.pgtables_bytes = 0
        self.flags: set[str] = set()    # MMF_* names
        self.users = 1
        self.cpumask: set[int] = set()  # mm_cpumask: CPUs that may cache its TLB entries
        self.huge_zero_ref = False      # MMF_HUGE_ZERO_FOLIO
        self.khugepaged_slot = None

    def find_vma(self, addr: int) -> VmArea | None:
        """find_vma: the first VMA ending above addr (it may start above addr too)."""
        lo, hi = 0, len(self.vmas)
        vmas = self.vmas
        while lo < hi:
            mid = (lo + hi) // 2
            if vmas[mid].end <= addr:
                lo = mid + 1
            else:
                hi = mid
        return vmas[lo] if lo < len(vmas) else None

    def vma_lookup(self, addr: int) -> VmArea | None:
        vma = self.find_vma(addr)
        return vma if vma is not None and vma.start <= addr else None


HPAGE_NR = HPAGE_PMD_NR
