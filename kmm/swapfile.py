"""The swap device: mm/swapfile.c (filled in by the swap work; a stub until then)."""

from __future__ import annotations


def swapon(m, size: int):
    """swapon: the machine's swap device of ``size`` bytes, or None without swap."""
    return None
