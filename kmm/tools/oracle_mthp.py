"""The oracle's mTHP measurements on the host (issue 11).

``read_mthp_stats`` reads every /sys/kernel/mm/transparent_hugepage/hugepages-<size>kB/
stats/ file; the report's ``mthp`` is the change over the run of those that moved
(huge_memory_mthp.mthp_report). ``region_folio_kb`` does what the kernel's
tools/mm/thpmaps does for one range of a process: each present page's pfn from
/proc/PID/pagemap, its folio's head and size from /proc/kpageflags (compound head and
tail bits), summed per size for anonymous folios below PMD size. Root only (pagemap
hides pfns from others).
"""

from __future__ import annotations

import os
import struct

from kmm import sysfs

THP_DIR = sysfs.THP_DIR
PAGE_SIZE = 4096
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
KPF_ANON = 1 << 12
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16


def read_mthp_stats() -> dict[str, dict[str, int]]:
    """{"hugepages-64kB": {"anon_fault_alloc": n, ...}, ...} for every size folder."""
    out: dict[str, dict[str, int]] = {}
    for folder in sorted(os.listdir(THP_DIR)):
        stats_dir = os.path.join(THP_DIR, folder, "stats")
        if not folder.startswith("hugepages-") or not os.path.isdir(stats_dir):
            continue
        values = {}
        for name in sorted(os.listdir(stats_dir)):
            with open(os.path.join(stats_dir, name)) as f:
                values[name] = int(f.read())
        out[folder] = values
    return out


def _flags(kpf, pfn: int) -> int:
    kpf.seek(pfn * 8)
    data = kpf.read(8)
    return struct.unpack("<Q", data)[0] if len(data) == 8 else 0


def _folio(kpf, pfn: int, cache: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
    """(head pfn, nr pages, head flags) of the folio holding pfn."""
    got = cache.get(pfn)
    if got is not None:
        return got
    flags = _flags(kpf, pfn)
    if not flags & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL):
        return pfn, 1, flags
    head = pfn
    while _flags(kpf, head) & KPF_COMPOUND_TAIL:
        head -= 1
    nr = 1
    while nr < 512 and _flags(kpf, head + nr) & KPF_COMPOUND_TAIL:
        nr += 1
    got = (head, nr, _flags(kpf, head))
    for p in range(head, head + nr):
        cache[p] = got
    return got


def region_folio_kb(pid: int, addr: int, size: int) -> dict[str, int]:
    """kB of [addr, addr+size) mapped by anonymous folios of 16 kB .. 1024 kB, per
    folio size (as huge_memory_mthp.region_folio_kb gives it in the emulator)."""
    npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    out: dict[int, int] = {}
    cache: dict[int, tuple[int, int, int]] = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kpf:
        pm.seek(addr // PAGE_SIZE * 8)
        data = pm.read(npages * 8)
        for (entry,) in struct.iter_unpack("<Q", data):
            if not entry & PM_PRESENT:
                continue
            pfn = entry & PM_PFN_MASK
            if not pfn:
                continue
            _head, nr, hflags = _folio(kpf, pfn, cache)
            if 4 <= nr < 512 and hflags & KPF_ANON:
                out[nr] = out.get(nr, 0) + PAGE_SIZE // 1024
    return {f"{nr * 4}kB": kb for nr, kb in sorted(out.items())}
