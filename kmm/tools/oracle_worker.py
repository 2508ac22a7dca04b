"""The oracle's worker process: one scenario process on the host kernel.

Run by kmm.tools.oracle as ``python -I -S oracle_worker.py`` (no site, no kmm on the
path), so it imports only the standard library; see oracle.py for the protocol.
"""
# The worker program. It must run under ``python -I -S`` (no site, no kmm on the path)
# and allocate as little as possible while steps run.
import ctypes, os, resource, struct, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
libc = ctypes.CDLL(None, use_errno=True)
vp, sz, ci, cl = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
libc.mmap.restype = vp
libc.mmap.argtypes = (vp, sz, ci, ci, ci, cl)
libc.munmap.argtypes = (vp, sz)
libc.mprotect.argtypes = (vp, sz, ci)
libc.madvise.argtypes = (vp, sz, ci)
libc.syscall.restype = cl
libc.memfd_create.restype = ci
libc.memfd_create.argtypes = (ctypes.c_char_p, ctypes.c_uint)
libc.fallocate.argtypes = (ci, ci, cl, cl)
libc.syscall.argtypes = (cl, cl, cl, cl, cl, cl)
memset = ctypes.memset
byte_at = ctypes.c_ubyte.from_address
get_errno = ctypes.get_errno
CMD = struct.Struct("<8q")
RES = struct.Struct("<3q")
MAP_FAILED = (1 << 64) - 1
MAP_FLAGS = 0x02 | 0x20 | 0x100000  # MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
fds = [int(x) for x in sys.argv[1].split(",")]
slot = int(sys.argv[2])
clone_nr = int(sys.argv[3])
clone_flags = int(sys.argv[4])
cmd_fd = fds[2 * slot]
res_fd = fds[2 * slot + 1]
memfds = {}  # region address -> the memfd mapped there (shmem scenarios)
nodemask = ctypes.c_long(0)  # set_mempolicy / mbind: one word of nodemask
# move_pages(2) / migrate_pages(2): a second handle, so syscall can take six arguments
sc6 = ctypes.CDLL(None, use_errno=True).syscall
sc6.restype = cl
sc6.argtypes = (cl, cl, cl, cl, cl, cl, cl)
NR_MOVE_PAGES, NR_MIGRATE_PAGES = {"aarch64": (239, 238)}.get(os.uname().machine, (279, 256))
move_status = []  # the status array of the last move_pages, read back by op 16

# Keep the interpreter's own anonymous memory (heap, arenas, stack) out of THP: under
# enabled=always khugepaged would otherwise collapse it during a khugepaged step.
with open("/proc/self/maps") as f:
    maps = f.read().splitlines()
for line in maps:
    parts = line.split()
    if len(parts) >= 5 and parts[1].startswith("rw") and parts[4] == "0":
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(lo, hi - lo, 15)  # MADV_NOHUGEPAGE
del maps, line, parts

def reply(status, err, value):
    os.write(res_fd, RES.pack(status, err, value))

def result(rc):
    if rc == 0:
        reply(0, 0, 0)
    else:
        reply(-1, get_errno(), 0)

while True:
    buf = os.read(cmd_fd, CMD.size)
    while buf and len(buf) < CMD.size:
        more = os.read(cmd_fd, CMD.size - len(buf))
        if not more:
            buf = b""
        buf += more
    if len(buf) < CMD.size:
        os._exit(0)  # the driver is gone
    op, a, b, c, d, e, f, g = CMD.unpack(buf)
    if op == 1:
        r = libc.mmap(a, b, 3, c or MAP_FLAGS, -1, 0)  # c: the driver's flags (hugetlb)
        if r == a:
            reply(0, 0, 0)
        elif r == MAP_FAILED or r is None:
            reply(-1, get_errno(), 0)
        else:  # a kernel without MAP_FIXED_NOREPLACE placed it elsewhere
            libc.munmap(r, b)
            reply(-1, 17, 0)
    elif op == 2:
        result(libc.munmap(a, b))
    elif op == 3:
        result(libc.mprotect(a, b, c))
    elif op == 4:
        result(libc.madvise(a, b, c))
    elif op == 5:
        if d:
            for p in range(a, b, c):
                memset(p, e, 1)
        else:
            for p in range(a, b, c):
                byte_at(p).value
        reply(0, 0, 0)
    elif op == 6:
        bad = 0
        for p in range(a, b, c):
            if byte_at(p).value != d:
                bad += 1
        reply(0, 0, bad)
    elif op == 7:
        pid = libc.syscall(clone_nr, clone_flags, 0, 0, 0, 0)
        if pid == 0:
            slot = a
            cmd_fd = fds[2 * slot]
            res_fd = fds[2 * slot + 1]
        elif pid < 0:
            reply(-1, get_errno(), 0)
        else:
            reply(0, 0, pid)
    elif op == 8:
        os._exit(0)
    elif op == 9:
        reply(0, 0, os.getpid())
    elif op == 10:  # memfd_create + ftruncate(size) + mmap(flags c) at a
        fd = libc.memfd_create(b"kmm", 0)
        if fd < 0:
            reply(-1, get_errno(), 0)
            continue
        try:
            os.ftruncate(fd, b)
        except OSError as err:
            os.close(fd)
            reply(-1, err.errno, 0)
            continue
        r = libc.mmap(a, b, 3, c, fd, 0)
        if r == a:
            memfds[a] = fd
            reply(0, 0, 0)
        else:
            er = get_errno()
            if r != MAP_FAILED and r is not None:
                libc.munmap(r, b)
                er = 17
            os.close(fd)
            reply(-1, er, 0)
    elif op == 11:  # ftruncate(memfd of region a, b)
        try:
            os.ftruncate(memfds[a], b)
            reply(0, 0, 0)
        except OSError as err:
            reply(-1, err.errno, 0)
    elif op == 12:  # fallocate(memfd of region a, PUNCH_HOLE | KEEP_SIZE, b, c)
        result(libc.fallocate(memfds[a], 3, b, c))
    elif op == 13:  # set_mempolicy(mode a, nodemask b (one word), maxnode c)
        nodemask.value = b
        result(libc.syscall(238, a, ctypes.addressof(nodemask), c, 0, 0))
    elif op == 14:  # mbind(start a, len b, mode c, nodemask d, maxnode e, flags f)
        nodemask.value = d
        result(libc.syscall(237, a, b, c, ctypes.addressof(nodemask), e, f))
    elif op == 15:  # move_pages(0, pages a..b step c, node d (-1: nodes NULL), flags e)
        addrs = list(range(a, b, c))
        n = len(addrs)
        pages = (ctypes.c_void_p * n)(*addrs)
        nodes = (ctypes.c_int * n)(*([d] * n)) if d >= 0 else None
        st = (ctypes.c_int * n)()
        r = sc6(NR_MOVE_PAGES, 0, n, ctypes.addressof(pages),
                ctypes.addressof(nodes) if nodes is not None else 0, ctypes.addressof(st), e)
        move_status = list(st)
        if r < 0:
            reply(-1, get_errno(), n)
        else:
            reply(0, r, n)  # the return value (pages not migrated) in the errno word
    elif op == 16:  # status[a] of the last move_pages
        reply(0, 0, move_status[a])
    elif op == 17:  # migrate_pages(0, 64, &mask a, &mask b)
        old_m, new_m = ctypes.c_ulong(a), ctypes.c_ulong(b)
        r = sc6(NR_MIGRATE_PAGES, 0, 64, ctypes.addressof(old_m), ctypes.addressof(new_m),
                0, 0)
        if r < 0:
            reply(-1, get_errno(), 0)
        else:
            reply(0, 0, r)
