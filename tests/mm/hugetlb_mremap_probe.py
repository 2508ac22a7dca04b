"""Host probe (run as root on the 6.18 host, not by pytest): mremap of MAP_HUGETLB
mappings, the figures tests/mm/test_hugetlb_pmd_share.py compares the emulator with.

    python tests/mm/hugetlb_mremap_probe.py > tests/mm/hugetlb_mremap.host.json

It takes the oracle's lock (kmm.tools.oracle), sets /proc/sys/vm/nr_hugepages to 4 and
always puts it back to 0. Each case maps at a fixed address, writes the first byte of
each huge page, calls mremap(old, old_len, new_len, MREMAP_MAYMOVE | MREMAP_FIXED,
new) and records the errno (0: moved), the bytes read back at the new place and the
pool's HugePages_Free / HugePages_Rsvd after the move and after unmapping everything.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MiB = 1 << 20
A = 0x2000_0000_0000
B = A + (1 << 30)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_RW = 3
MAP_SHARED, MAP_PRIVATE, MAP_ANON, MAP_HUGETLB = 1, 2, 0x20, 0x40000
MAP_FIXED_NOREPLACE = 0x100000
FAILED = ctypes.c_void_p(-1).value

# name -> (shared, size, old offset, old_len, new_len, new address)
CASES = {
    "move_private": (False, 4 * MiB, 0, 4 * MiB, 4 * MiB, B),
    "move_shared": (True, 4 * MiB, 0, 4 * MiB, 4 * MiB, B),
    "shrink_private": (False, 4 * MiB, 0, 4 * MiB, 2 * MiB, B),
    "move_second_page": (False, 4 * MiB, 2 * MiB, 2 * MiB, 2 * MiB, B),
    "new_addr_unaligned": (False, 4 * MiB, 0, 4 * MiB, 4 * MiB, B + 4096),
    "old_addr_unaligned": (False, 4 * MiB, 4096, 2 * MiB, 2 * MiB, B),
    "grow": (False, 4 * MiB, 0, 4 * MiB, 6 * MiB, B),
}


def meminfo() -> tuple[int, int]:
    v = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            v[k] = int(rest.split()[0])
    return v["HugePages_Free"], v["HugePages_Rsvd"]


def case(shared, size, off, old_len, new_len, new):
    flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANON | MAP_HUGETLB | MAP_FIXED_NOREPLACE
    p = libc.mmap(A, size, PROT_RW, flags, -1, 0)
    assert p == A, ctypes.get_errno()
    for i in range(0, size, 2 * MiB):
        ctypes.c_char.from_address(A + i).value = bytes([0x10 + i // (2 * MiB)])
    r = libc.mremap(A + off, old_len, new_len, 3, new)
    err = ctypes.get_errno() if r == FAILED else 0
    got = []
    if not err:
        got = [ctypes.c_char.from_address(new + i).value[0] if i < new_len else None
               for i in range(0, new_len, 2 * MiB)]
    after = meminfo()
    libc.munmap(A, size)
    if not err:
        libc.munmap(new, new_len)
    return {"errno": os.strerror(err) if err else 0, "errno_name": _name(err),
            "read": got, "free_rsvd_after": list(after), "free_rsvd_end": list(meminfo())}


def _name(err: int) -> str | int:
    import errno
    return errno.errorcode.get(err, err) if err else 0


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from kmm.tools import oracle
    out = {"kernel": os.uname().release}
    with oracle._run_lock():
        try:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write("4")
            for name, args in CASES.items():
                out[name] = case(*args)
        finally:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write("0")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
