"""mm/oom_kill.c: when memory cannot be found, kill the process that frees the most.

In Linux 6.18 a fault whose allocation fails even after reclaim reaches the allocator's
``__alloc_pages_may_oom``, which calls ``out_of_memory``: ``select_bad_process`` scores
every process with ``oom_badness`` (its resident pages, swap entries and page-table
pages) and ``oom_kill_process`` sends the highest SIGKILL and counts ``oom_kill`` in
/proc/vmstat. The allocation is then retried; if the victim was the faulting process
itself, it dies of the SIGKILL on its way back to user space.

The emulator's allocator gives up instead (kmm.page_alloc: no OOM killer there); the
fault comes back as VM_FAULT_OOM (``fault.OutOfMemory``) and the program API calls
``out_of_memory`` for it, which has the same outcome: the victim is killed and its
memory freed at once (the oom_reaper's work folded in), then the access is retried.
"""

from __future__ import annotations

from kmm.pgtable import PAGE_SIZE
from kmm.uapi import OomKilled

OOM_KILL = "oom_kill"  # the /proc/vmstat event (enum vm_event_item OOM_KILL)


def oom_badness(task) -> int:
    """oom_badness: the pages freed by killing ``task``: rss, swap entries and the
    page-table pages (oom_score_adj 0 for every emulated process)."""
    mm = task.mm
    return mm.rss_anon + mm.swapents + mm.pgtables_bytes // PAGE_SIZE


def select_bad_process(m):
    """select_bad_process: the live process with the highest badness; on a tie the
    later one in the process list (``points < chosen_points`` skips only a lower
    score). None when no process can be killed."""
    chosen, chosen_points = None, None
    for task in m.tasks.values():
        if not task.alive:
            continue
        points = oom_badness(task)
        if chosen_points is not None and points < chosen_points:
            continue
        chosen, chosen_points = task, points
    return chosen, chosen_points or 0


def count_oom_kill(m) -> None:
    """count_vm_event(OOM_KILL); the line appears in a report once it moved."""
    m.vmstat.events[OOM_KILL] = m.vmstat.events.get(OOM_KILL, 0) + 1


async def out_of_memory(m, current) -> bool:
    """out_of_memory for a fault of ``current`` that found no memory: kill the victim
    (oom_kill_process: SIGKILL, then its address space is torn down) and count it.
    Returns True if the victim was ``current`` (it must not retry the access)."""
    from kmm import fork
    victim, points = select_bad_process(m)
    if victim is None:
        m.bug("Out of memory and no killable processes...")
    count_oom_kill(m)
    victim.signal = "SIGKILL"
    await fork.do_exit(m, victim)
    if victim is current:
        raise OomKilled(victim.name, points)
    return False
