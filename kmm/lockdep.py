"""Lock-order validation in the style of kernel/locking/lockdep.c.

Every acquisition is checked before the actor may wait for the lock, so a bad order is
reported instead of hung on:

- **recursive locking**: the actor already holds this lock instance (or another lock of
  the same class without a nesting annotation), e.g. a PMD lock taken twice;
- **the documented order** (``ORDER``, shaped like the comment at the top of mm/rmap.c):
  taking a lock of an outer class while holding an inner one;
- **circular dependency**: the new edge closes a cycle in the graph of class pairs seen
  so far in this run, even if no deadlock happened this time.

Each report names both acquisition sites: where the held lock was taken and where the
new one is being taken (and, for a cycle, where the opposite order was first seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Outermost first (the order documented at the top of mm/rmap.c, with the THP
# additions of mm/huge_memory.c and mm/khugepaged.c).
ORDER: tuple[str, ...] = (
    "khugepaged_mm_lock",
    "i_rwsem",
    "mmap_lock",
    "invalidate_lock",
    "hugetlb_fault_mutex",  # rmap.c: hugetlbfs PageHuge() take locks in this order
    "hugetlb_vma_lock",
    "folio_lock",
    "i_mmap_rwsem",
    "anon_vma",
    "page_table_lock",
    "ptlock_pmd",
    "ptlock_pte",
    "i_pages",
    "swap_cluster_lock",
    "swap_info_lock",
    "split_queue_lock",
    "lru_lock",
    "hugetlb_lock",
    "zone_lock",
)
RANK = {name: i for i, name in enumerate(ORDER)}


class LockdepSplat(Exception):
    """A lock-order bug, reported the way lockdep prints it (KernelBug family)."""


@dataclass(slots=True)
class HeldLock:
    lock: object  # the lock instance (has .name and .cls)
    site: str
    subclass: int
    read: bool


@dataclass
class Lockdep:
    """The dependency graph of one run: class -> class, with the sites first seen."""

    edges: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    succ: dict[str, set[str]] = field(default_factory=dict)
    enabled: bool = True
    # lockdep's chain cache (lookup_chain_cache): (class, subclass, the held (class,
    # subclass) stack) already validated, with no lock of that class held
    chains: set = field(default_factory=set)

    def check_acquire(self, actor, lock, site: str, subclass: int = 0,
                      read: bool = False) -> None:
        """Validate ``actor`` taking ``lock`` at ``site`` against what it holds."""
        if not self.enabled:
            return
        held = actor.held
        if not held:
            return  # nothing held: no order to check, nothing to recurse on
        cls = lock.cls
        key = None
        if len(held) <= 4:
            stack = tuple([(h.lock.cls, h.subclass) for h in held])
            key = (cls, subclass, stack)
            if key in self.chains:
                return  # the same chain passed before: the same verdict, edges known
        self._validate(actor, lock, site, subclass, cls)
        if key is not None and all(c != cls for c, _ in key[2]):
            self.chains.add(key)  # (a held lock of the class: check the instance again)

    def _validate(self, actor, lock, site: str, subclass: int, cls: str) -> None:
        seen = set()  # the class checks once per held (class, subclass): a collapse
        for h in actor.held:  # holds 512 folio locks
            hcls = h.lock.cls
            if h.lock is lock:
                raise LockdepSplat(
                    "WARNING: possible recursive locking detected\n"
                    f"{actor.name} is trying to acquire {lock.name} at {site}\n"
                    f"but already holds it, taken at {h.site}")
            key = (hcls, h.subclass)
            if key in seen:
                continue
            seen.add(key)
            if hcls == cls:
                if h.subclass == subclass:
                    raise LockdepSplat(
                        "WARNING: possible recursive locking detected\n"
                        f"{actor.name} is trying to acquire {lock.name} ({cls}) at {site}\n"
                        f"while holding {h.lock.name} of the same class, taken at {h.site}\n"
                        "(nested locks of one class need a subclass annotation)")
                continue
            if RANK.get(cls, 99) < RANK.get(hcls, 99):
                raise LockdepSplat(
                    "WARNING: lock order violation (mm/rmap.c order)\n"
                    f"{actor.name} is trying to acquire {lock.name} ({cls}) at {site}\n"
                    f"while holding {h.lock.name} ({hcls}), taken at {h.site}\n"
                    f"but {cls} must be taken before {hcls}")
            self._add_edge(actor, hcls, cls, h.site, site)

    def _add_edge(self, actor, a: str, b: str, site_a: str, site_b: str) -> None:
        if (a, b) in self.edges:
            return
        path = self._path(b, a)
        if path is not None:
            first = self.edges[(path[0], path[1])]
            raise LockdepSplat(
                "WARNING: possible circular locking dependency detected\n"
                f"{actor.name} is trying to acquire {b} at {site_b}\n"
                f"while holding {a}, taken at {site_a}\n"
                f"but the opposite order {' -> '.join(path)} was seen before: "
                f"{path[0]} taken at {first[0]}, then {path[1]} at {first[1]}")
        self.edges[(a, b)] = (site_a, site_b)
        self.succ.setdefault(a, set()).add(b)

    def _path(self, src: str, dst: str) -> list[str] | None:
        stack = [(src, [src])]
        seen = {src}
        while stack:
            node, path = stack.pop()
            if node == dst:
                return path
            for nxt in sorted(self.succ.get(node, ())):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    def graph(self) -> list[tuple[str, str, str, str]]:
        """The observed lock-order graph: (outer, inner, outer site, inner site)."""
        return [(a, b, sa, sb) for (a, b), (sa, sb) in sorted(self.edges.items())]
