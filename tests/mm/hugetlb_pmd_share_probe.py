"""Host probe (run as root on the 6.18 host, not by pytest): the page-table accounting
of hugetlb PMD sharing, the figures tests/mm/test_hugetlb_pmd_share.py compares the
emulator with.

    python tests/mm/hugetlb_pmd_share_probe.py > tests/mm/hugetlb_pmd_share.host.json

Takes the oracle's lock (kmm.tools.oracle), sets /proc/sys/vm/nr_hugepages to 512 and
always puts it back to 0. The parent maps a PUD-aligned 1 GiB MAP_SHARED|MAP_HUGETLB
range at 0x200000000000 and writes every huge page; it forks; the child reads one page
(huge_pmd_share), then MADV_DONTNEEDs 2 MiB of it (huge_pmd_unshare). At each stage
each process's VmPTE (kB, /proc/PID/status), the node's PageTables (kB, /proc/meminfo;
machine-wide, so other processes' page tables move it too: indicative only) and
HugePages_Free / HugePages_Rsvd are recorded.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MiB = 1 << 20
GiB = 1 << 30
A = 0x2000_0000_0000
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_SHARED, MAP_ANON, MAP_HUGETLB, MAP_FIXED_NOREPLACE = 1, 0x20, 0x40000, 0x100000
MADV_DONTNEED = 4


def status(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                return int(line.split()[1])
    return -1


def meminfo() -> dict[str, int]:
    v = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            v[k] = int(rest.split()[0])
    return {k: v[k] for k in ("PageTables", "HugePages_Free", "HugePages_Rsvd")}


def run() -> dict:
    out = {}
    p = libc.mmap(A, GiB, 3, MAP_SHARED | MAP_ANON | MAP_HUGETLB | MAP_FIXED_NOREPLACE, -1, 0)
    assert p == A, ctypes.get_errno()
    out["parent_mapped"] = {"VmPTE": status(), **meminfo()}
    for i in range(0, GiB, 2 * MiB):
        ctypes.c_char.from_address(A + i).value = b"\x05"
    out["parent_populated"] = {"VmPTE": status(), **meminfo()}
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its stages through the pipe, one JSON line each
        os.close(r)
        os.read(r2, 1)
        st = {"child_forked": {"VmPTE": status(), **meminfo()}}
        assert ctypes.c_char.from_address(A).value == b"\x05"
        st["child_touched"] = {"VmPTE": status(), **meminfo()}
        assert libc.madvise(A + 2 * MiB, 2 * MiB, MADV_DONTNEED) == 0
        st["child_dontneed"] = {"VmPTE": status(), **meminfo()}
        os.write(w, json.dumps(st).encode())
        os._exit(0)
    os.close(w)
    os.write(w2, b"g")
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    out.update(json.loads(data))
    out["parent_end"] = {"VmPTE": status(), **meminfo()}
    libc.munmap(ctypes.c_void_p(A), ctypes.c_size_t(GiB))
    return out


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from kmm.tools import oracle
    res = {"kernel": os.uname().release}
    with oracle._run_lock():
        try:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write("512")
            with open("/proc/sys/vm/nr_hugepages") as f:
                if int(f.read()) != 512:
                    raise SystemExit("the host could not allocate 512 huge pages")
            res["stages"] = run()
        finally:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write("0")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
