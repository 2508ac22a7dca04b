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

    @classmethod
    def _revive(cls, message: str) -> "KmmError":
        """Rebuilt from ``str(e)`` (a spawned program's child gets the owner's error as
        its message): "EINVAL: mmap(...): Invalid argument"."""
        name, _, rest = message.partition(": ")
        call = rest.rsplit(": ", 1)[0] if ": " in rest else ""
        e = cls(name, call)
        if str(e) != message:  # a detail the text does not rebuild: keep the message
            e.strerror = message.partition(": ")[2]
        return e


class OomKilled(Exception):
    """The process was chosen by the OOM killer (kmm.oom_kill) and died of SIGKILL."""

    signal = "SIGKILL"

    def __init__(self, task: str = "", points: int = 0) -> None:
        super().__init__(f"process {task} killed by the OOM killer (SIGKILL, "
                         f"oom_badness {points} pages)")
        self.task = task
        self.points = points

    @classmethod
    def _revive(cls, message: str) -> "OomKilled":
        """Rebuilt from ``str(e)`` (see KmmError._revive)."""
        import re
        m = re.fullmatch(r"process (.*) killed by the OOM killer \(SIGKILL, oom_badness "
                         r"(\d+) pages\)", message)
        return cls(m.group(1), int(m.group(2))) if m else cls()


async def errno_name(call: Awaitable) -> object:
    """The value of a call, or the errno name of the KmmError it raised: for programs
    that report a refusal as a result (a race's MADV_COLLAPSE may get EAGAIN)."""
    try:
        return await call
    except KmmError as e:
        failed = getattr(e, "_failed", None)  # (kernel, process, call, errno)
        if failed is not None:  # to be examined: Kernel.expect, or explore reports it
            failed[0].failed.append(failed[1:])
        return e.errno_name
