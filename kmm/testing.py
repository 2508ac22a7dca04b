"""The invariant checker, run after every step in tests (and every point in explore).

``check_invariants(m, k)`` rebuilds, from the page tables alone, what every struct page
must say, and compares:

- every mapped pfn is allocated (not on a free list), and every page table is too;
- per page: PTE mapcount = PTE mappings; per folio: entire mapcount = PMD mappings,
  large mapcount = all mappings, refcount = mappings (no pins are modelled);
- per mm: nr_ptes = PTE tables + deposited tables; pgtables_bytes = every table page;
  Rss counter = mapped pages; per PMD table: deposited tables = huge PMDs under it;
- the buddy free lists are consistent (page_alloc.Zone.check);
- every mapping (present PTE or PMD, swap or migration entry) lies inside a VMA of its
  mm; a page marked PG_anon_exclusive, or named by an exclusive migration or swap
  entry, is mapped by one mm, once; no RCU callback outlives its grace period
  (kmm.checks_cross);
- with a Kernel, every byte a workload wrote reads back (through the page tables,
  without faulting), and every process reads what it wrote itself or zero: a byte
  another process wrote, after a fork or anywhere, never shows through
  (checks_cross.cross_process_errors).

The checks themselves live in kmm.checks, each registered with the state it reads, so
``incremental_checker`` (what ``kmm explore`` keeps for a run) gives the same verdicts
re-checking only what changed.
"""

from __future__ import annotations

from kmm import checks, checks_mthp  # noqa: F401 - checks_mthp registers its checks
from kmm.checks_data import _data_errors, read_mapped_byte  # noqa: F401 - its API


class InvariantError(AssertionError):
    """An invariant of the machine does not hold; the message lists every breach."""


def check_invariants(m, k=None) -> None:
    errs = invariant_errors(m, k)
    if errs:
        raise InvariantError("\n".join(errs[:40]))


def invariant_errors(m, k=None) -> list[str]:
    """Every breach, found by running every registered check (kmm.checks) in full."""
    return checks.Checker(m, k, incremental=False).errors()


def incremental_checker(m, k=None) -> "checks.Checker":
    """A checker kept for a whole run: ``.errors()`` gives what invariant_errors would,
    re-checking only what changed since its last call (kmm.checks)."""
    return checks.Checker(m, k)


def agreeing_checks():
    """A ``check(m, k)`` for runners that runs the full checker and one incremental
    checker per machine, kept across calls, and raises unless their verdicts are equal
    (then raises InvariantError on a breach, as check_invariants does)."""
    kept: dict[int, tuple] = {}

    def check(m, k=None) -> None:
        got = kept.get(id(m))
        if got is None or got[0] is not m:
            got = kept[id(m)] = (m, incremental_checker(m, k))
        full = invariant_errors(m, k)
        inc = got[1].errors()
        if inc != full:
            raise AssertionError(f"incremental checker: {inc} != full checker: {full}")
        if full:
            raise InvariantError("\n".join(full[:40]))

    return check


def inside_update(m, actor) -> bool:
    """The actor is halfway through an update of shared state: it holds a lock (every
    multi-step update but one is made under a lock), a server actor is handling a
    request, or it is inside __folio_put (refcount 0, the folio not yet off the LRU
    and back in the buddy: swap.__folio_put, Machine.freeing)."""
    return bool(actor.held or actor.busy or actor in m.freeing)


def quiescent(m, but=None) -> bool:
    """No actor (other than ``but``) is inside an update: the invariants must hold."""
    return not any(inside_update(m, a) for a in m.sched.actors if a is not but)


def check_between_ops(m, k) -> None:
    """check_invariants, unless another actor is inside an operation (holds a lock,
    or is freeing a folio): the invariants hold between operations, not halfway
    through another CPU's fault."""
    if quiescent(m, but=m.sched.current):
        check_invariants(m, k)


def run_machine(fn, *, memory: int = 1 << 30, cpus: int = 1, seed: int = 1,
                mode: str = "free", knobs: dict | None = None, check=check_invariants,
                swap: int = 0, nodes: int = 1, node_memory: tuple = (),
                node_cpus: tuple = ()):
    """Run ``await fn(m, k)`` as the driver of a fresh machine, ``check(m, k)`` after
    every workload operation and at the end. Returns (machine, fn's value)."""
    from kmm.machine import Machine, MachineConfig
    from kmm.runtime.trace import Trace
    from kmm.workload import Kernel
    m = Machine(MachineConfig(memory=memory, swap=swap, cpus=cpus, seed=seed, nodes=nodes,
                              node_memory=node_memory, node_cpus=node_cpus), mode=mode,
                trace=Trace())
    for name, value in (knobs or {}).items():
        m.sysfs.write(name, value)
    k = Kernel(m)
    k.after_op = lambda: check(m, k)
    box = {}

    async def driver() -> None:
        box["value"] = await fn(m, k)
        check_invariants(m, k)

    m.run(driver)
    return m, box.get("value")


async def together(m, **fns) -> None:
    """Run each ``fns[name]()`` as its own actor named ``name`` on CPU i (mod the CPU
    count) and wait for all of them: a forced concurrency for tests."""
    await m.sched.spawn_and_join([(name, fn, i % len(m.cpus))
                                  for i, (name, fn) in enumerate(fns.items())])
