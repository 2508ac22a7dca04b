"""collapse_compound_extreme on the host kernel, with mremap, which scenarios (and so the
oracle) cannot express: the selftest's steps, run by this process through ctypes, with
the selftest's settings set and restored as the oracle does (its run lock and
HostKnobs). Needs root and THP; used by the live test in test_khugepaged.py, or:

    sudo python tests/selftests/host_khugepaged.py
"""

from __future__ import annotations

import ctypes
import re
import time

from kmm.tools import oracle, oracle_host

PAGE, HPAGE, NR = 4096, 2 << 20, 512
BASE = 1 << 30
PROT_RW, MAP_PRIVATE_ANONYMOUS = 3, 0x22
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_COLLAPSE = 14, 15, 25
EAGAIN = 11
SETTINGS = (("enabled", "madvise"), ("defrag", "always"), ("use_zero_page", 0),
            ("khugepaged/defrag", 1), ("khugepaged/alloc_sleep_millisecs", 10),
            ("khugepaged/scan_sleep_millisecs", 10), ("khugepaged/max_ptes_none", 511),
            ("khugepaged/max_ptes_swap", 64), ("khugepaged/max_ptes_shared", 256),
            ("khugepaged/pages_to_scan", 4096))
COUNTERS = ("thp_fault_alloc", "thp_split_pmd", "thp_deferred_split_page", "thp_collapse_alloc")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def anon_huge_kb(addr: int, size: int) -> int:
    """check_huge_anon: AnonHugePages of this process's VMAs inside [addr, addr+size)."""
    total, vma = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                vma = int(m.group(1), 16), int(m.group(2), 16)
            elif line.startswith("AnonHugePages:") and vma and vma[0] >= addr and vma[1] <= addr + size:
                total += int(line.split()[1])
    return total


def fill_memory(p: int) -> None:
    for i in range(NR):
        ctypes.c_uint32.from_address(p + i * PAGE).value = 0xdead0000 + i


def corrupted_pages(p: int) -> int:
    """validate_memory: pages whose first int is not the pattern."""
    return sum(ctypes.c_uint32.from_address(p + i * PAGE).value != 0xdead0000 + i
               for i in range(NR))


def collapse_compound_extreme(context: str) -> dict:
    """Run the case; returns whether it collapsed, the corrupted pages and the thp_*
    counters it moved."""
    libc = _libc()

    def madvise(p, n, advice):
        if libc.madvise(p, n, advice):
            raise OSError(ctypes.get_errno(), f"madvise {advice}")

    with oracle._run_lock():
        knobs = oracle_host.HostKnobs()
        knobs.save()
        try:
            for name, value in SETTINGS:
                oracle_host.write_knob(name, value)
            before = oracle_host.read_thp_vmstat()
            if libc.mmap(BASE, HPAGE, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0) != BASE:
                raise OSError(ctypes.get_errno(), "mmap at BASE_ADDR")
            for i in range(NR):
                madvise(BASE, HPAGE, MADV_HUGEPAGE)
                fill_memory(BASE)
                assert anon_huge_kb(BASE, HPAGE) == 2048, f"round {i}: no THP"
                madvise(BASE, HPAGE, MADV_NOHUGEPAGE)
                assert libc.mremap(BASE - i * PAGE, i * PAGE + HPAGE, (i + 1) * PAGE,
                                   MREMAP_MAYMOVE | MREMAP_FIXED, BASE + 2 * HPAGE) == BASE + 2 * HPAGE
                assert libc.mremap(BASE + 2 * HPAGE, (i + 1) * PAGE, (i + 1) * PAGE + HPAGE,
                                   MREMAP_MAYMOVE | MREMAP_FIXED,
                                   BASE - (i + 1) * PAGE) == BASE - (i + 1) * PAGE
            libc.munmap(BASE, HPAGE)
            p = BASE - HPAGE
            fill_memory(p)
            assert anon_huge_kb(p, HPAGE) == 0
            if context == "khugepaged":  # wait_for_scan
                madvise(p, HPAGE, MADV_HUGEPAGE)
                # wait_for_scan: two full scans, driven pass by pass the way the
                # oracle drives a khugepaged step (kmm.tools.oracle.Khugepaged.kick)
                kh = oracle_host.Khugepaged()
                target = oracle_host.full_scans() + 2
                deadline = time.monotonic() + oracle.KHUGEPAGED_TIMEOUT
                while anon_huge_kb(p, HPAGE) != 2048 and oracle_host.full_scans() < target:
                    if time.monotonic() > deadline:
                        raise oracle.OracleError("khugepaged did not scan within the timeout")
                    kh.kick(deadline)
                madvise(p, HPAGE, MADV_NOHUGEPAGE)
                collapsed = anon_huge_kb(p, HPAGE) == 2048
            else:  # __madvise_collapse
                oracle_host.write_knob("enabled", "never")
                madvise(p, HPAGE, MADV_HUGEPAGE)
                r = libc.madvise(p, HPAGE, MADV_COLLAPSE)
                if r and ctypes.get_errno() == EAGAIN:
                    r = libc.madvise(p, HPAGE, MADV_COLLAPSE)
                oracle_host.write_knob("enabled", "madvise")
                collapsed = r == 0 and anon_huge_kb(p, HPAGE) == 2048
            after = oracle_host.read_thp_vmstat()
            bad = corrupted_pages(p)
            libc.munmap(p, HPAGE)
        finally:
            knobs.restore()
    return {"collapsed": collapsed, "corrupted_pages": bad,
            "vmstat": {n: after[n] - before[n] for n in COUNTERS}}


if __name__ == "__main__":
    for ctx in ("khugepaged", "madvise"):
        print(ctx, collapse_compound_extreme(ctx))
