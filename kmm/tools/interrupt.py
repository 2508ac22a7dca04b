"""Ctrl-C and SIGTERM: one line, exit 128 + the signal's number, nothing left behind.

An interruption is never a finding. ``install`` replaces the handlers of SIGINT and
SIGTERM for the whole command: the first signal raises ``Interrupted`` (a
KeyboardInterrupt, so ``except Exception`` in the tools never swallows it) wherever
the main thread is; every later one is only remembered, so the clean-up that runs
while the exception unwinds (killing and reaping children and pool workers, restoring
host knobs) is not itself interrupted. Code that would otherwise record an outcome
(an explored schedule's violation, a failure file) asks ``caught()`` first: a state
corrupted by the exception landing half way through an operation is not a bug.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_caught: int | None = None


class Interrupted(KeyboardInterrupt):
    """The command was interrupted by ``signum`` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame) -> None:
    global _caught
    if _caught is not None:  # the first one unwinds; the clean-up runs to its end
        return
    _caught = signum
    raise Interrupted(signum)


def install() -> dict:
    """Take SIGINT and SIGTERM for this process (main thread only); returns the
    handlers they had, for ``restore``."""
    global _caught
    _caught = None
    try:
        return {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    except ValueError:  # not the main thread: signals are the main thread's business
        return {}


def restore(saved: dict) -> None:
    """Put back the handlers ``install`` replaced (the command is over; ``caught``
    still tells whether it was interrupted)."""
    for sig, old in saved.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)


def caught() -> int | None:
    """The signal that interrupted this command, if one did."""
    return _caught


def exit_code() -> int:
    """130 for SIGINT, 143 for SIGTERM: the shell's 128 + signal number."""
    return 128 + (_caught or signal.SIGINT)


def message() -> str:
    """The one line printed for an interruption."""
    name = signal.Signals(_caught or signal.SIGINT).name
    return "interrupted" if name == "SIGINT" else f"terminated ({name})"


def worker_init() -> None:
    """In a pool worker (a forked child): the parent alone reacts to Ctrl-C (the
    terminal sends it to the whole process group) and kills the workers itself; a
    worker whose parent vanished dies too (PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_pdeathsig()


PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """prctl(PR_SET_PDEATHSIG): this process gets ``sig`` when its parent exits."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): a descendant orphaned by a killed child (a spawned
    program's branch whose process was SIGKILLed) becomes our child, not init's (which
    here never reaps), so ``reap_children`` can end and reap it."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> list[int]:
    """The pids of this process's children (from /proc)."""
    me, out = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
            out.append(int(d))
    return out


def reap_children() -> None:
    """At the very end of the command: any child still there is a leak; end and reap it
    (a few rounds: a killed child's own children, e.g. a local Ray's agents, are
    orphaned to us, a child subreaper, and are ended in the next round)."""
    for _ in range(4):
        pids = children()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


class WorkerPool:
    """A process pool whose workers never outlive the explorer: they ignore Ctrl-C
    (the parent decides), die with the parent, and on any exception out of the
    explorer (an interruption) are killed and reaped before it goes on unwinding."""

    def __init__(self, jobs: int, ctx) -> None:
        import concurrent.futures as cf
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                           initializer=worker_init)

    def __enter__(self):
        return self.pool

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.pool.shutdown(wait=True)
            return
        kill_pool(self.pool)


def kill_pool(pool) -> None:
    """SIGKILL every worker of a ProcessPoolExecutor and reap it; shut the pool."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except (OSError, ValueError, AttributeError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            p.join()
        except (OSError, ValueError, AssertionError):
            pass
    pool.shutdown(wait=True)


def publish(path: str, text: str, *, replace: bool = True) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename
    (``replace``) or a link that fails if ``path`` exists; an interruption leaves no
    partial file and never clobbers one."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
