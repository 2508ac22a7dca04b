"""VM_BUG_ON and the strict-mode error: what kmm raises when a rule is broken.

include/linux/mmdebug.h. ``KernelBug`` is the emulated kernel reaching a state the real
one never may; ``StrictError`` (strict mode, kmm.atomic) is emulator code changing
shared state outside the shared-state layer.
"""


class KernelBug(Exception):
    """VM_BUG_ON: the emulated kernel reached a state the real one never may."""


class StrictError(KernelBug):
    """Strict mode: shared state changed outside kmm.atomic (names the field and caller)."""
