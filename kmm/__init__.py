"""kmm: an emulator of Linux 6.18's transparent huge page subsystem.

The public surface: ``Machine`` (the emulated machine), ``Kernel``/``Proc`` (the program
API of kmm.workload) and the errors a user meets. They load on first use, so a process
that needs only part of kmm (a spawned actor's child: kmm.runtime.child and the wire)
does not import the whole emulator to start.
"""

import importlib

_PUBLIC = {"OutOfMemory": "kmm.fault", "Segv": "kmm.fault", "Sigbus": "kmm.fault",
           "KernelBug": "kmm.machine",
           "Machine": "kmm.machine", "MachineConfig": "kmm.machine",
           "Kernel": "kmm.workload", "Proc": "kmm.workload"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kmm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
