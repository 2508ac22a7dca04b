"""The data check of kmm.checks: every byte a workload wrote reads back.

Emulator-only. ``read_mapped_byte`` reads a byte through a process's page tables
without faulting (kmm.testing exports it); ``data_errors`` is the check (kmm.checks
registers it, ``ctx`` its Checker),
which keeps each written page's place in the tables until an entry on its path changes
and a task's written bytes grouped by page while its shadow stays (the bytes
themselves are read again at every check, a page's with one itemgetter).
"""

from __future__ import annotations

from operator import itemgetter

from kmm import checks_hugetlb, swapfile
from kmm.memory import pmd_lookup
from kmm.pgtable import (
    is_migration_entry, is_pmd_migration_entry, migration_entry_pfn, pgd_index, pmd_index,
    pmd_pfn, pmd_trans_huge, pte_index, pte_pfn, pud_index, table_pfn,
)


def _resolve(m, mm, addr: int) -> tuple[tuple[int, ...], int]:
    """Where kmm.testing.read_mapped_byte reads addr: (the tables on the path, the pfn),
    the pfn -1 when unmapped and -2 when a swap entry (read through the swap device,
    never cached)."""
    tables = m.physmem.tables
    pgd = mm.pgd
    e = tables[pgd][pgd_index(addr)]
    if not e:
        return (pgd,), -1
    pud = table_pfn(e)
    e = tables[pud][pud_index(addr)]
    if not e:
        return (pgd, pud), -1
    pmd = table_pfn(e)
    e = tables[pmd][pmd_index(addr)]
    if not e:
        return (pgd, pud, pmd), -1
    sub = (addr >> 12) & 511
    if pmd_trans_huge(e):
        return (pgd, pud, pmd), pmd_pfn(e) + sub
    if is_pmd_migration_entry(e):
        return (pgd, pud, pmd), migration_entry_pfn(e) + sub
    pte = table_pfn(e)
    path = (pgd, pud, pmd, pte)
    if pte not in tables:  # a PMD pointing at no table (mapping_errors reports it)
        return path, -1
    p = tables[pte][pte_index(addr)]
    if not p:
        return path, -1
    if swapfile.is_swap_entry(m, p):
        return path, -2
    return path, migration_entry_pfn(p) if is_migration_entry(p) else pte_pfn(p)


def _moved(ctx, dt: set[int], path: tuple[int, ...], addr: int) -> bool:
    """Whether an entry _resolve read for addr along path changed since the last
    check (a table on the path is dirty)."""
    for t, i in zip(path, (pgd_index(addr), pud_index(addr), pmd_index(addr),
                           pte_index(addr))):
        if t in dt:
            slots = ctx.changed_slots(t)
            if slots is None or i in slots:
                return True
    return False


def data_errors(ctx) -> list[str]:
    """Every byte a workload wrote reads back (with a Kernel only): kmm.testing's
    _data_errors, with each page's place in the page tables kept until an entry it read
    changes and each task's written bytes grouped by page while its shadow stays
    (the bytes themselves are read again every time, a page's at once; a task whose
    page disagrees is read again byte by byte, for the errors in shadow order)."""
    m, k = ctx.m, ctx.k
    if k is None:
        return []
    where: dict = ctx.state.setdefault("data", {})
    plans: dict = ctx.state.setdefault("data_plans", {})
    dt = ctx.dirty_tables
    if dt:
        # forget every place whose path changed, not only those looked up now: an
        # address out of the shadow at this check (MADV_DONTNEED'd) and written again
        # before the next would otherwise come back to a place from before the change
        # (race_dontneed_fault under PCT: the freed PTE table, its old pfn read as 0).
        # A place read one entry of each table on its path: only those count.
        for key in [key for key, (path, _) in where.items()
                    if not dt.isdisjoint(path) and _moved(ctx, dt, path, key[2] << 12)]:
            del where[key]
    data = m.physmem.data
    errs = []

    def place(task, vpage: int) -> tuple[tuple[int, ...], int]:
        # every place kept read entries that did not change since (the purge above)
        key = (task.name, task.mm.pgd, vpage)
        got = where.get(key)
        if got is None:
            got = where[key] = _resolve(m, task.mm, vpage << 12)
        return got

    def read(task, addr: int) -> int | None:
        pfn = place(task, addr >> 12)[1]
        if pfn == -1:
            return None
        if pfn == -2:
            return read_mapped_byte(m, task.mm, addr)
        frame = data.get(pfn)
        return 0 if frame is None else frame[addr & 4095]

    live = set()
    for name, shadow in k.shadow.items():
        task = m.tasks.get(name)
        if task is None or not task.alive:
            continue
        live.add(name)
        unknown = k.unknown.get(name) or frozenset()  # written while its fork ran
        skip = checks_hugetlb.unchecked_ranges(task)
        plan = _plan(plans, task, shadow, unknown, skip)
        if not _pages_agree(task, plan, where, data, m):
            for addr, want in shadow.items():
                if not plan.checked(addr):
                    continue
                got = read(task, addr)
                if got is not None and got != want:
                    errs.append(f"{name}: byte at {addr:#x} reads {got}, was written "
                                f"{want}")
                if got is None and want != 0:
                    vma = task.mm.vma_lookup(addr)
                    if vma is not None and vma.vm_file is None:  # (a private file
                        # mapping's COW page may be zapped: the file shows through again)
                        errs.append(f"{name}: written byte at {addr:#x} is no longer "
                                    "mapped")
        for addr, want in k.lazy.get(name, {}).items():
            got = read(task, addr)
            if got not in (None, 0, want):
                errs.append(f"{name}: MADV_FREE'd byte at {addr:#x} reads {got}, "
                            f"was written {want}")
    for name in [n for n in plans if n not in live]:
        del plans[name]
    return errs + file_errors(m, k)


class _Plan:
    """A task's checked shadow bytes grouped by virtual page, as of its last check:
    vpage -> {offset: byte}, and per page (offsets getter, bytes, any nonzero)."""

    __slots__ = ("key", "shadow", "unknown", "skip", "bypage", "groups")

    def __init__(self, key: tuple, shadow: dict, unknown, skip: list) -> None:
        self.key = key  # (task name, its pgd): a place's key is key + (vpage,)
        self.shadow = dict(shadow)
        self.unknown = frozenset(unknown)
        self.skip = list(skip)
        self.bypage: dict[int, dict[int, int]] = {}
        self.groups: dict[int, tuple] = {}
        for addr, want in shadow.items():
            if self.checked(addr):
                self.bypage.setdefault(addr >> 12, {})[addr & 4095] = want
        for vp in self.bypage:
            self._group(vp)

    def checked(self, addr: int) -> bool:
        """Whether the byte at addr is checked (not written during a fork, not in a
        range the hugetlb check leaves alone)."""
        return addr not in self.unknown and not (
            self.skip and any(lo <= addr < hi for lo, hi in self.skip))

    def _group(self, vp: int) -> None:
        offs = self.bypage.get(vp)
        if not offs:
            self.bypage.pop(vp, None)
            self.groups.pop(vp, None)
            return
        get = itemgetter(*offs)
        wants = get(offs)  # (an int for one offset, as the getter gives)
        self.groups[vp] = ((*self.key, vp), get, wants, any(offs.values()), tuple(offs))

    def update(self, shadow: dict) -> None:
        """Regroup the pages of the bytes written or dropped since."""
        touched = set()
        for addr, _ in shadow.items() ^ self.shadow.items():
            vp = addr >> 12
            touched.add(vp)
            if addr in shadow and self.checked(addr):
                self.bypage.setdefault(vp, {})[addr & 4095] = shadow[addr]
            elif vp in self.bypage:
                self.bypage[vp].pop(addr & 4095, None)
        for vp in touched:
            self._group(vp)
        self.shadow = dict(shadow)


def _plan(plans: dict, task, shadow: dict, unknown, skip: list) -> _Plan:
    key = (task.name, task.mm.pgd)
    plan = plans.get(task.name)
    if plan is None or plan.key != key or plan.unknown != unknown or plan.skip != skip:
        plan = plans[task.name] = _Plan(key, shadow, unknown, skip)
    elif plan.shadow != shadow:
        plan.update(shadow)
    return plan


def _pages_agree(task, plan: _Plan, where: dict, data: dict, m) -> bool:
    """Every checked byte of the task reads what was written, page by page (False:
    some page disagrees or is unmapped with a nonzero byte; read it byte by byte)."""
    where_get = where.get
    data_get = data.get
    for key, get, wants, nonzero, offs in plan.groups.values():
        got = where_get(key)  # (its place, as data_errors' place() keeps it)
        if got is None:
            got = where[key] = _resolve(m, task.mm, key[2] << 12)
        pfn = got[1]
        if pfn >= 0:
            frame = data_get(pfn)
            if frame is None:
                if nonzero:
                    return False
            elif get(frame) != wants:
                return False
        elif pfn == -1:
            if nonzero:
                return False
        else:  # a swap entry: read through the swap device, byte by byte
            base = key[2] << 12
            got = tuple(read_mapped_byte(m, task.mm, base + o) for o in offs)
            if got != (wants if len(offs) > 1 else (wants,)):
                return False
    return True


def file_errors(m, k) -> list[str]:
    """Bytes written through shared file mappings read back from the page cache (or
    its swap entries), whoever maps the file now."""
    st = m.__dict__.get("shmem")
    errs = []
    for (ino, off), want in getattr(k, "file_shadow", {}).items():
        inode = st.inodes.get(ino) if st is not None else None
        if inode is None:
            continue  # evicted: nothing maps or holds the file any more
        got = read_file_byte(m, inode, off)
        if (got or 0) != want:
            errs.append(f"shmem inode {ino}: byte at offset {off:#x} reads {got}, was "
                        f"written {want}")
    return errs


def read_file_byte(m, inode, off: int) -> int | None:
    """The byte at file offset off through the page cache or its swap entry (None: a
    hole)."""
    sw = inode.mapping.swapped.get(off >> 12)
    if sw is not None:
        from kmm.pgtable import swp_entry, swp_offset, swp_type
        entry, _order, base = sw
        slot = swp_entry(swp_type(entry), swp_offset(entry) + (off >> 12) - base)
        return swapfile.read_swapped_byte(m, slot, off & 4095)
    folio = m.physmem.pages.get(inode.mapping.i_pages.get(off >> 12, -1))
    if folio is None:
        return None
    pfn = folio.pfn + (off >> 12) - folio.index
    return m.physmem.read(pfn, off & 4095, 1)[0]


def read_mapped_byte(m, mm, addr: int) -> int | None:
    """The byte at addr through mm's page tables, without faulting (None if unmapped)."""
    t = pmd_lookup(m, mm, addr)
    if t < 0:
        return None
    e = m.physmem.tables[t][pmd_index(addr)]
    if not e:
        return None
    if pmd_trans_huge(e):
        pfn = pmd_pfn(e) + ((addr >> 12) & 511)
    elif is_pmd_migration_entry(e):
        pfn = migration_entry_pfn(e) + ((addr >> 12) & 511)
    else:
        p = m.physmem.tables[table_pfn(e)][pte_index(addr)]
        if not p:
            return None
        if swapfile.is_swap_entry(m, p):
            return swapfile.read_swapped_byte(m, p, addr & 4095)
        pfn = migration_entry_pfn(p) if is_migration_entry(p) else pte_pfn(p)
    return m.physmem.read(pfn, addr & 4095, 1)[0]


def _data_errors(m, k) -> list[str]:
    """Every written byte read back through the tables (the reference data_errors keeps
    in step with)."""
    errs = []
    for name, shadow in k.shadow.items():
        task = m.tasks.get(name)
        if task is None or not task.alive:
            continue
        unknown = k.unknown.get(name, ())
        skip = checks_hugetlb.unchecked_ranges(task)
        for addr, want in shadow.items():
            if addr in unknown or (skip and any(lo <= addr < hi for lo, hi in skip)):
                continue
            got = read_mapped_byte(m, task.mm, addr)
            if got is not None and got != want:
                errs.append(f"{name}: byte at {addr:#x} reads {got}, was written {want}")
            if got is None and want != 0:
                vma = task.mm.vma_lookup(addr)
                if vma is not None and vma.vm_file is None:
                    errs.append(f"{name}: written byte at {addr:#x} is no longer mapped")
        for addr, want in k.lazy.get(name, {}).items():
            got = read_mapped_byte(m, task.mm, addr)
            if got not in (None, 0, want):
                errs.append(f"{name}: MADV_FREE'd byte at {addr:#x} reads {got}, "
                            f"was written {want}")
    return errs + file_errors(m, k)
