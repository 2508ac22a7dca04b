"""move_pages(2) and migrate_pages(2) on a two-node machine: mm/migrate.c
do_pages_move / add_folio_for_migration / do_pages_stat_array and mm/mempolicy.c
kernel_migrate_pages / do_migrate_pages. (On the one-node host the same calls are
recorded by workloads/move_pages_thp.toml.)"""

from __future__ import annotations

import pytest

from kmm import mmzone
from kmm.workload import KmmError

from tests.mm.test_huge_memory import MiB, ev, pmd_at
from tests.mm.test_numa_balancing import _thp_on, _two_nodes

EFAULT, EACCES, EBUSY = -14, -13, -16


def test_move_pages_moves_a_thp_whole_and_the_other_addresses_of_it_are_busy():
    """do_pages_move queues the THP for the first address (add_folio_for_migration
    isolates the whole folio); the next address of the same THP cannot be isolated
    again (-EBUSY) and, not queued, flushes the queue: the THP moves whole
    (thp_migration_success 1, pgmigrate_success 512) and the queued address's status
    becomes node 1; the third address finds the THP on node 1 already (status 1)."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0, value=4)
        r, status = await p.move_pages([a, a + MiB, a + 4096], [1, 1, 1])
        assert (r, status) == (0, [1, EBUSY, 1])
        assert mmzone.page_to_nid(m, pmd_at(m, p.task.mm, a)[1] >> 12 & ~511) == 1
        assert (ev(m, "thp_migration_success"), ev(m, "pgmigrate_success")) == (1, 512)
        assert await p.move_pages([a, a + 2 * MiB]) == (0, [1, EFAULT])  # past the VMA
        assert await p.verify() == []
    _two_nodes(fn)


def test_move_pages_errors_per_page_and_per_call():
    """__add_folio_for_migration: -EACCES for a folio mapped by two processes without
    MPOL_MF_MOVE_ALL (then it moves with it); do_pages_stat_array: -EFAULT outside any
    VMA and for the huge zero folio; do_pages_move: a node without memory fails the
    call with -ENODEV."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        c = await p.fork("child")
        assert await p.move_pages([a], [1]) == (0, [EACCES])
        assert await p.move_pages([a], [1], move_all=True) == (0, [1])
        assert (await c.move_pages([a]))[1] == [1]
        z = await p.mmap(2 * MiB)
        await p.madvise(z, 2 * MiB, "hugepage")
        await p.load(z)  # the huge zero folio
        assert (await p.move_pages([z, 0x1000]))[1] == [EFAULT, EFAULT]
        with pytest.raises(KmmError, match="ENODEV"):
            await p.move_pages([a], [2])
        assert await p.verify() == [] and await c.verify() == []
    _two_nodes(fn)


def test_migrate_pages_moves_every_folio_of_the_old_node():
    """kernel_migrate_pages -> do_migrate_pages -> migrate_to_node(0 -> 1): every folio
    of the process on node 0 (a THP and small pages) moves to node 1; returns 0 (none
    left behind). New nodes without memory: -EINVAL."""
    async def fn(m, k):
        p, a = await _thp_on(k, 0)
        b = await p.mmap(2 * MiB)
        await p.madvise(b, 2 * MiB, "nohugepage")
        await p.on_node(0).touch(b, 8 * 4096, value=2)
        assert await p.migrate_pages([0], [1]) == 0
        _, status = await p.move_pages([a, a + MiB] + [b + i * 4096 for i in range(8)])
        assert status == [1] * 10
        assert (ev(m, "thp_migration_success"), ev(m, "pgmigrate_success")) == (1, 520)
        with pytest.raises(KmmError, match="EINVAL"):
            await p.migrate_pages([0], [5])
        assert await p.verify() == []
    _two_nodes(fn)
