"""Wait queues: kernel/sched/wait.c (wake_up, wait_event, wq_has_sleeper).

A wait_queue_head is named (``kswapd_wait``, ``kcompactd_wait``, ``khugepaged_wait``):
the machine keeps one list of waiting actors per name, changed only through kmm.atomic's
waitqueue operations. Mechanism wakes (the allocator's wakeup_kswapd, the khugepaged
and kcompactd kicks); the kthreads' policy (daemons, through kmm.daemon) waits.
"""

from __future__ import annotations

from kmm import atomic


def wq_has_sleeper(m, queue: str) -> bool:
    """wq_has_sleeper: someone waits on the queue (a waker may skip the wake-up)."""
    return bool(m.waitqueues.get(queue))


def wake_up(m, queue: str) -> bool:
    """wake_up / wake_up_interruptible: wake every actor waiting on the named queue.
    True if one was."""
    woken = False
    sched = m.sched
    for actor in atomic.waitqueue_pop(m, queue):
        if sched.interrupt_sleep(actor):
            woken = True
        elif actor.state == "blocked" and actor.blocked_on == ("waitqueue", queue):
            sched.wake(actor)
            woken = True
    return woken


async def wait_event(m, queue: str, timeout_ns: int | None = None) -> bool:
    """wait_event(_timeout) on the named queue: True if woken, False on timeout."""
    sched = m.sched
    me = sched.current
    atomic.waitqueue_add(m, queue, me)
    if timeout_ns is None:
        await sched.block(("waitqueue", queue))
        return True
    await sched.sleep(timeout_ns)
    # still queued: timed out, leave the queue; taken off by a waker: woken
    return not atomic.waitqueue_remove(m, queue, me)
