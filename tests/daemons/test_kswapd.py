"""kswapd (daemons/kswapd.py, policy) over balance_pgdat and wakeup_kswapd (mm/vmscan.c).

A small machine is filled with anonymous pages until its free pages drop below the low
watermark; wakeup_kswapd (what the allocator's slow path calls) wakes kswapd from
``kswapd_wait``, and kswapd reclaims (swapping out) until the zone is above its high
watermark, then naps HZ/10 and sleeps. Waiting is in emulated time only.
"""

from __future__ import annotations

from conftest import run as crun

from kmm import daemon, swapfile, testing, vmscan, vmscan_node
from kmm.daemons.kswapd import Kswapd
from kmm.pgtable import PAGE_SIZE

MiB = 1 << 20
CHUNK = 16 * PAGE_SIZE
NAP_NS = 200_000_000  # longer than kswapd's HZ/10 nap


def run(fn, *, memory=16 * MiB, swap=64 * MiB):
    """A small machine with swap and kswapd; the full invariant check runs where the
    test asks (after every step it would cost a walk of every page per page)."""
    async def driver(m, k):
        m.swap_info = swapfile.swapon(m, swap)
        daemon.start_daemon(m, Kswapd())
        return await fn(m, k)
    return crun(driver, memory=memory, check=None)


def ev(m, name):
    return m.vmstat.events[name]


async def fill_below_low(m, p, a, limit):
    """Write 16-page chunks from a until free pages are below the low watermark."""
    z = m.zone
    while z.nr_free >= z.wmark["low"]:
        assert a < limit, "the region is too small to reach the low watermark"
        await p.touch(a, CHUNK, value=(a >> 12) % 250 + 1)
        a += CHUNK
    return a


def test_kswapd_woken_at_the_low_watermark_reclaims_to_the_high_one():
    """Below the low watermark wakeup_kswapd wakes kswapd (it sleeps on kswapd_wait);
    balance_pgdat swaps out until the zone meets its high watermark (pageoutrun 1,
    pgsteal_kswapd, pswpout), kswapd then naps and sleeps. Every byte reads back."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(64 * MiB)
        await m.sched.sleep(NAP_NS)  # kswapd's first nap ends: it sleeps for good
        assert ev(m, "pageoutrun") == 0
        end = await fill_below_low(m, p, a, a + 64 * MiB)
        z = m.zone
        assert z.nr_free < z.wmark["low"] and not vmscan_node.pgdat_balanced(m, 0)
        testing.check_invariants(m, k)
        await vmscan_node.wakeup_kswapd(m, 0)
        await m.sched.sleep(1_000_000_000)  # one emulated second: kswapd runs meanwhile
        assert vmscan_node.pgdat_balanced(m, 0) and z.nr_free > z.wmark["high"]
        # every page was just written (young): the first balance_pgdat mostly marks
        # them referenced (FOLIOREF_KEEP) down to priority 1 and the zone is still
        # unbalanced, so kswapd does not sleep (high watermark "hit quickly") and a
        # second run reclaims what was seen before
        assert ev(m, "pageoutrun") == 2
        assert ev(m, "kswapd_high_wmark_hit_quickly") == 1
        assert ev(m, "kswapd_low_wmark_hit_quickly") == 0
        assert ev(m, "pgsteal_kswapd") > 0 and ev(m, "pgsteal_direct") == 0
        assert ev(m, "pswpout") == ev(m, "pgsteal_kswapd")
        assert p.task.mm.swapents == ev(m, "pswpout")
        testing.check_invariants(m, k)
        assert await p.verify() == []
        assert ev(m, "pswpin") > 0
        return end
    run(fn)


def test_kswapd_stays_asleep_while_the_zone_is_balanced():
    """wakeup_kswapd on a balanced zone only records the order: kswapd is not woken."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(MiB)
        await p.touch(a, MiB, value=1)
        await m.sched.sleep(1_000_000)
        await vmscan_node.wakeup_kswapd(m, 0)
        await m.sched.sleep(1_000_000_000)
        assert ev(m, "pageoutrun") == 0 and ev(m, "pswpout") == 0
        assert vmscan.NODE_DATA(m).kswapd_order == 0
    run(fn)


def test_a_wakeup_during_kswapds_nap_counts_low_wmark_hit_quickly():
    """kswapd_try_to_sleep: woken during its HZ/10 nap after balancing, kswapd counts
    kswapd_low_wmark_hit_quickly and balances again at once."""
    async def fn(m, k):
        p = await k.process()
        a = await p.mmap(64 * MiB)
        await m.sched.sleep(NAP_NS)
        nxt = await fill_below_low(m, p, a, a + 64 * MiB)
        await vmscan_node.wakeup_kswapd(m, 0)
        await m.sched.sleep(1_000_000)  # kswapd balances, then starts its nap
        runs = ev(m, "pageoutrun")
        assert runs and vmscan_node.pgdat_balanced(m, 0)
        assert ev(m, "kswapd_low_wmark_hit_quickly") == 0
        await fill_below_low(m, p, nxt, a + 64 * MiB)
        await vmscan_node.wakeup_kswapd(m, 0)
        await m.sched.sleep(1_000_000_000)
        assert ev(m, "kswapd_low_wmark_hit_quickly") == 1
        assert ev(m, "pageoutrun") > runs and vmscan_node.pgdat_balanced(m, 0)
        testing.check_invariants(m, k)
    run(fn)
