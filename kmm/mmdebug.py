"""VM_BUG_ON and the strict-mode error: what kmm raises when a rule is broken.

include/linux/mmdebug.h. ``KernelBug`` is the emulated kernel reaching a state the real
one never may; ``StrictError`` (strict mode, kmm.atomic) is emulator code changing
shared state outside the shared-state layer.

The kernel's debug assertions (mmdebug.h, lockdep.h, mmap_lock.h) live here too. A
``VM_BUG_ON_FOLIO`` or a lock-held assertion states what a function requires of its
caller; the emulator keeps them where 6.18 has them (CONFIG_DEBUG_VM and CONFIG_LOCKDEP
on), so a path that reaches a function without the lock it needs is reported there, as
a ``KernelBug`` naming the function, the lock and the actor, even when no interleaving
happens to break anything in that run. They are plain functions: checking is not an
operation on shared state, so none is a preemption point.

- ``VM_BUG_ON_FOLIO(m, cond, folio, what)``: raise if ``cond``, with the folio's dump;
- ``folio_test_locked(folio)``: PG_locked is set (by any actor);
- ``lockdep_assert_held(m, lock, what)``: the current actor holds ``lock`` (a spinlock
  or folio lock as owner; an rwsem for read or write);
- ``assert_spin_locked(m, lock, what)``: someone holds the spinlock;
- ``pmd_lockptr(m, pmd_tbl)``: the split PMD lock of a PMD table;
- ``mmap_assert_locked(m, mm, what)`` / ``mmap_assert_write_locked(m, mm, what)``: the
  current actor holds mm's mmap_lock (for read or write / for write).
"""


class KernelBug(Exception):
    """VM_BUG_ON: the emulated kernel reached a state the real one never may."""


class StrictError(KernelBug):
    """Strict mode: shared state changed outside kmm.atomic (names the field and caller)."""


def _bug(m, msg: str) -> None:
    raise KernelBug(msg)


def _actor(m) -> str:
    cur = m.sched.current
    return cur.name if cur is not None else "?"


def VM_BUG_ON_FOLIO(m, cond: bool, folio, what: str) -> None:  # noqa: N802 - kernel name
    """VM_BUG_ON_FOLIO: a folio in a state the caller must never pass on."""
    if cond:
        _bug(m, f"VM_BUG_ON_FOLIO({what}) in {_actor(m)}: {folio!r}")


def folio_test_locked(folio) -> bool:
    """folio_test_locked: PG_locked is set."""
    lk = folio.lock
    return lk is not None and lk.owner is not None


def _holds(lock, actor) -> bool:
    owner = getattr(lock, "owner", None)
    if owner is actor:
        return True
    if hasattr(lock, "readers"):
        return lock.writer is actor or actor in lock.readers
    return False


def lockdep_assert_held(m, lock, what: str) -> None:
    """lockdep_assert_held: the current actor holds ``lock``."""
    if lock is None or not _holds(lock, m.sched.current):
        name = lock.name if lock is not None else "a lock that does not exist"
        _bug(m, f"{what}: lockdep_assert_held({name}) fails in {_actor(m)}")


def assert_spin_locked(m, lock, what: str) -> None:
    """assert_spin_locked: the spinlock is held (by anyone)."""
    if lock is None or lock.owner is None:
        name = lock.name if lock is not None else "a lock that does not exist"
        _bug(m, f"{what}: assert_spin_locked({name}) fails in {_actor(m)}")


def pmd_lockptr(m, pmd_tbl: int):
    """pmd_lockptr: the split ptlock of the PMD table (USE_SPLIT_PMD_PTLOCKS)."""
    return m.table_lock(pmd_tbl)


def mmap_assert_locked(m, mm, what: str) -> None:
    """mmap_assert_locked: mmap_lock held for read or write by the current actor."""
    if not _holds(mm.mmap_lock, m.sched.current):
        _bug(m, f"{what}: mmap_assert_locked({mm.mmap_lock.name}) fails in {_actor(m)}")


def mmap_assert_write_locked(m, mm, what: str) -> None:
    """mmap_assert_write_locked: mmap_lock held for write by the current actor."""
    if mm.mmap_lock.writer is not m.sched.current:
        _bug(m, f"{what}: mmap_assert_write_locked({mm.mmap_lock.name}) fails in "
                f"{_actor(m)}")
