"""The invariant checker's checks (kmm/testing.py) and where it may run: each check is
shown to catch the breach it exists for (a state built by hand, or a safeguard removed),
and to stay silent on the correct kernel.
"""

from __future__ import annotations

from kmm import memory
from kmm.machine import Machine, MachineConfig
from kmm.pgtable import pmd_index, pte_index, pte_pfn, table_pfn
from kmm.runtime.trace import Trace
from kmm.tools import explore as ex
from kmm.workload import Kernel

MiB = 1 << 20


def _machine(cpus=2):
    m = Machine(MachineConfig(memory=64 * MiB, cpus=cpus, seed=1), mode="free", trace=Trace())
    return m, Kernel(m)


def _pte_folio(m, mm, addr):
    t = table_pfn(m.physmem.tables[memory.pmd_lookup(m, mm, addr)][pmd_index(addr)])
    return m.physmem.folio(pte_pfn(m.physmem.tables[t][pte_index(addr)]))


# ------------------------------------------------------------- where it runs
def test_checker_never_runs_inside_a_half_finished_free():
    """__folio_put drops the last reference, then takes the folio off the LRU under the
    lru lock: in between (a point, the lock acquire) the folio has refcount 0 and is
    still on the LRU, as in the kernel. The checker at every quiescent point used to
    run there ("LRU holds a non-live folio"); the freeing actor is inside an update."""
    m, k = _machine()
    chk = ex.Checker(m, k, "point")

    async def driver():
        p = await k.process("main")
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "nohugepage")
        await p.touch(a, 4096)
        folio = _pte_folio(m, p.task.mm, a)
        await m.folio_ref_add(folio, 1)  # a reference that outlives the mapping
        await p.munmap(a, 2 * MiB)
        m.sched.on_point = chk.at_point
        await m.folio_put(folio)  # the last one: the free runs here
        assert m.zone.is_free(folio.pfn) and not m.freeing

    m.run(driver)
