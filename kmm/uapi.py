"""What user space sees of the kernel's refusals: errno names and fatal signals.

A light module (no emulator import): a spawned program's child rebuilds these errors by
name, and a program may import them (``from kmm import KmmError``) without loading the
machine.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Awaitable

__all__ = ["KmmError", "OomKilled", "errno_name"]


class KmmError(OSError):
    """A call the emulated kernel refused, as Python's own system calls raise it:
    ``errno_name`` ("EINVAL", ...), ``errno`` its number, ``call`` the API call with
    its arguments (OSError's ``strerror`` is the text)."""

    def __init__(self, errno_name: str, call: str = "", detail: str = "") -> None:
        code = getattr(_errno, errno_name, 0)
        text = _os.strerror(code) if code else errno_name
        super().__init__(code, f"{call}: {text}" if call else text)
        if detail:
            self.strerror += f" ({detail})"
        self.errno_name = errno_name
        self.call = call

    def __str__(self) -> str:
        if self.strerror is None:  # rebuilt from its message (a spawned program's)
            return str(self.args[0]) if self.args else self.errno_name
        return f"{self.errno_name}: {self.strerror}"

    def __reduce__(self):
        return (KmmError, (self.errno_name, self.call))


class OomKilled(Exception):
    """The process was chosen by the OOM killer (kmm.oom_kill) and died of SIGKILL."""

    signal = "SIGKILL"

    def __init__(self, task: str = "", points: int = 0) -> None:
        super().__init__(f"process {task} killed by the OOM killer (SIGKILL, "
                         f"oom_badness {points} pages)")
        self.task = task
        self.points = points


async def errno_name(call: Awaitable) -> object:
    """The value of a call, or the errno name of the KmmError it raised: for programs
    that report a refusal as a result (a race's MADV_COLLAPSE may get EAGAIN)."""
    try:
        return await call
    except KmmError as e:
        return e.errno_name
