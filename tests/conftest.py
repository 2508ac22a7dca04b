"""What the tests share: strict mode, and one way to run a driver on a fresh machine.

Every Machine built by a test runs in strict mode (kmm.atomic): shared state changed
outside the shared-state layer raises StrictError. Test files import ``run``
(``from conftest import run``; pyproject puts tests/ on the path) and bind their own
defaults with functools.partial where they need other ones.
"""

from __future__ import annotations

import os

os.environ.setdefault("KMM_STRICT", "1")

from kmm import testing  # noqa: E402 - after the strict-mode switch
from kmm.machine import Machine, MachineConfig  # noqa: E402
from kmm.runtime.trace import Trace  # noqa: E402
from kmm.workload import Kernel  # noqa: E402


def run(fn, *, m=None, k=None, memory: int = 1 << 30, cpus: int = 1, seed: int = 1,
        mode: str = "free", knobs: dict | None = None, swap: int = 0,
        check=testing.check_invariants, final: bool = True, machine: bool = False):
    """``await fn(m, k)`` as the driver of a fresh machine (or of the given ``m``, with
    ``k``): ``check(m, k)`` after every workload operation (None: none), the full
    invariant check when fn returns unless ``final`` is False. Returns fn's value, or
    ``(m, value)`` with ``machine``."""
    if m is None:
        m = Machine(MachineConfig(memory=memory, swap=swap, cpus=cpus, seed=seed),
                    mode=mode, trace=Trace())
        for name, value in (knobs or {}).items():
            m.sysfs.write(name, value)
    if k is None:
        k = Kernel(m)
    if check is not None:
        k.after_op = lambda: check(m, k)
    box = {}

    async def driver() -> None:
        box["value"] = await fn(m, k)
        if final:
            testing.check_invariants(m, k)

    m.run(driver)
    return (m, box.get("value")) if machine else box.get("value")
