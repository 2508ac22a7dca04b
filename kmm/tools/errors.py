"""Whose error is it? A user's program or daemon, or the emulated kernel.

A program (``async def main(k)``) or a plug-in daemon is the user's code: when it fails
(a syntax error, its own exception, a SIGSEGV/SIGBUS of its process, a wrong use of
the program API) the command prints the user's own frames and names the file, never
kmm's internals (``--traceback`` prints everything). An exception raised inside kmm's
own code (a KernelBug, a lockdep splat, anything else) is the kernel's.

A frame is the user's when its file is neither in the kmm package nor in the Python
installation (the standard library, site-packages: trio and the like).
"""

from __future__ import annotations

import os
import sysconfig
import traceback

import kmm

_KMM_DIR = os.path.dirname(os.path.abspath(kmm.__file__)) + os.sep
_SYSTEM_DIRS = tuple(sorted({os.path.abspath(p) + os.sep for p in (
    sysconfig.get_paths().get("stdlib", ""), sysconfig.get_paths().get("platstdlib", ""),
    sysconfig.get_paths().get("purelib", ""), sysconfig.get_paths().get("platlib", ""))
    if p}))

def _package_dirs(name: str) -> tuple[str, ...]:
    """Where an installed package of kmm's lives (kmm.daemons: the built-in daemons are
    kmm's own code, not the user's)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return ()
    locs = getattr(spec, "submodule_search_locations", None) or ()
    return tuple(os.path.abspath(p) + os.sep for p in locs)


_SYSTEM_DIRS += _package_dirs("kmm.daemons")
# the program API: an exception raised here is a wrong call by the program
_API_FILES = {os.path.join(_KMM_DIR, "workload.py")}


def is_user_file(filename: str) -> bool:
    if not filename or filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return not path.startswith(_KMM_DIR) and not path.startswith(_SYSTEM_DIRS)


def user_frames(e: BaseException) -> list[traceback.FrameSummary]:
    """The frames of ``e``'s traceback in the user's files, outermost first."""
    return [f for f in traceback.extract_tb(e.__traceback__) if is_user_file(f.filename)]


def raised_by_user(e: BaseException) -> bool:
    """Was ``e`` raised by the user's code, or by the program API refusing a call?
    (The innermost frame is the user's, or is the API's right below a user frame.)"""
    from kmm import fault
    from kmm.uapi import OomKilled
    if isinstance(e, (fault.Segv, getattr(fault, "SigBus", fault.Segv), OomKilled)):
        return True  # a signal that killed the user's process (its access, the OOM killer)
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return False
    if is_user_file(tb[-1].filename):
        return True
    # the API refusing a call (KmmError, or TypeError/ValueError naming an argument):
    # the frames below the user's are all the API's
    i = len(tb) - 1
    while i >= 0 and os.path.abspath(tb[i].filename) in _API_FILES:
        i -= 1
    return i < len(tb) - 1 and i >= 0 and is_user_file(tb[i].filename)


def _show_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


class UserCodeError(Exception):
    """A user's program or daemon failed. ``str`` is one line: who, where and what;
    ``frames()`` the user's own stack."""

    exit_code = 1

    def __init__(self, who: str, error: BaseException, where: str = "") -> None:
        self.who, self.error = who, error
        frames = user_frames(error)
        if not where and frames:
            f = frames[-1]
            where = f"{_show_path(f.filename)}, line {f.lineno}, in {f.name}"
        if isinstance(error, SyntaxError) and not where:
            where = f"{_show_path(error.filename or who)}, line {error.lineno}"
        from kmm import fault
        from kmm.uapi import OomKilled
        what = (f"SyntaxError: {error.msg}" if isinstance(error, SyntaxError)
                else f"killed by {error}" if isinstance(error, fault.Segv)
                else str(error) if isinstance(error, OomKilled)
                else f"{type(error).__name__}: {error}" if str(error)
                else type(error).__name__)
        self.where = where
        super().__init__(" ".join((f"{who}: {what}" + (f" ({where})" if where else "")).split()))

    def frames(self) -> str:
        """The user's frames as Python prints a traceback (the program's part only);
        empty when the one line names the only one."""
        fr = user_frames(self.error)
        if len(fr) < 2:
            return ""
        return "".join(traceback.format_list(fr)).rstrip("\n")


class ProgramError(UserCodeError):
    """A program failed: its own exception, a signal of its process, a wrong API call."""


class ProgramLoadError(UserCodeError):
    """A program that cannot run at all (syntax, import, no async main): bad input."""

    exit_code = 2


class DaemonError(UserCodeError):
    """A plug-in daemon's own code raised: the actor died (as a spawned one's ChildDied)."""

    exit_code = 3

    def __init__(self, actor: str, error: BaseException) -> None:
        super().__init__(f"actor {actor} (in-process daemon) raised", error)
        self.actor = actor
