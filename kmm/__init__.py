"""kmm: an emulator of Linux 6.18's transparent huge page subsystem.

The public surface: ``Machine`` (the emulated machine), ``Kernel``/``Proc`` (the program
API of kmm.workload) and the errors a user meets.
"""

from kmm.fault import OutOfMemory, Segv
from kmm.machine import KernelBug, Machine, MachineConfig
from kmm.workload import Kernel, Proc

__all__ = ["Kernel", "KernelBug", "Machine", "MachineConfig", "OutOfMemory", "Proc", "Segv"]
