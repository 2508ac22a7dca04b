"""RCU, as far as page-table freeing needs it: kernel/rcu/tree.c, include/linux/rcupdate.h.

A lockless page-table walker (``__pte_offset_map``: the fault path, rmap walkers) reads
a PMD and then the PTE table it points to with no lock that keeps the table alive;
6.18 makes that safe by walking under ``rcu_read_lock`` and freeing detached PTE tables
(MADV_DONTNEED's pt_reclaim, khugepaged's retract) only after a grace period
(``tlb_remove_table`` -> ``call_rcu``, ``pte_free_defer``). The walker then takes the
table's lock and rechecks the PMD (``pmd_same``): a table detached meanwhile is still
readable and its lock still exists, the recheck fails and the walker retries.

The model: each actor has a read-side nesting count (``rcu_read_lock_nesting`` of its
task), cheap and not a preemption point, as the real ``rcu_read_lock`` is a counter
bump. ``call_rcu`` records which actors are inside a read-side section at that moment;
the grace period ends when each of them has left its section once (readers that enter
later do not delay it: they cannot have seen the detached table). The callbacks then
run in the actor whose ``rcu_read_unlock`` ended the grace period, as RCU_SOFTIRQ runs
them on some CPU; with no reader at ``call_rcu`` the callback runs at once, so a run with
no concurrent walker frees exactly when it did before RCU was modelled. Left out: the
grace-period kthread, callback batching and expedited grace periods.
"""

from __future__ import annotations

from typing import Awaitable, Callable


class RcuState:
    """The machine's RCU state: per-actor nesting counts and the pending callbacks."""

    __slots__ = ("nesting", "pending")

    def __init__(self) -> None:
        self.nesting: dict[object, int] = {}  # actor -> rcu_read_lock nesting depth
        # callbacks waiting for a grace period: (actors still inside a section that was
        # open at call time, the callback)
        self.pending: list[tuple[set, Callable[[], Awaitable[None]]]] = []


def rcu_read_lock(m) -> None:
    """rcu_read_lock: enter a read-side section; what is reached through an RCU-freed
    pointer stays allocated until the matching rcu_read_unlock."""
    st = m.rcu
    cur = m.sched.current
    st.nesting[cur] = st.nesting.get(cur, 0) + 1


async def rcu_read_unlock(m) -> None:
    """rcu_read_unlock: leave the section; leaving the outermost one reports a quiescent
    state, which may end grace periods and run their callbacks here."""
    st = m.rcu
    cur = m.sched.current
    n = st.nesting.get(cur, 0)
    if n <= 0:
        m.bug(f"rcu_read_unlock without rcu_read_lock in {cur.name}")
    if n > 1:
        st.nesting[cur] = n - 1
        return
    del st.nesting[cur]
    if not st.pending:
        return
    ready = []
    for waiters, fn in st.pending:
        waiters.discard(cur)
        if not waiters:
            ready.append(fn)
    if ready:
        st.pending = [(w, fn) for w, fn in st.pending if w]
        for fn in ready:  # rcu_do_batch, in call order
            await fn()


def rcu_read_lock_held(m) -> bool:
    """rcu_read_lock_held (CONFIG_DEBUG_LOCK_ALLOC): the current actor is in a section."""
    return m.rcu.nesting.get(m.sched.current, 0) > 0


async def call_rcu(m, fn: Callable[[], Awaitable[None]]) -> None:
    """call_rcu: run ``fn`` once every read-side section open now has ended."""
    st = m.rcu
    readers = {a for a, n in st.nesting.items() if n > 0}
    if readers:
        st.pending.append((readers, fn))
    else:
        await fn()


def rcu_errors(m) -> list[str]:
    """For the invariant checker: a callback still pending while no actor it waits for
    is inside a read-side section is a grace period that never ends (a leak)."""
    st = m.rcu
    errs = []
    for waiters, fn in st.pending:
        if not any(st.nesting.get(a, 0) > 0 for a in waiters):
            errs.append(f"RCU callback {getattr(fn, '__qualname__', fn)} pending after "
                        f"its grace period")
    return errs
