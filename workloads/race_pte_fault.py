"""4 KiB faults racing on the same PTE: two CPUs, a VM_NOHUGEPAGE region (no THP).

Every round races two calls on one not-yet-faulted 4 KiB page, both under the mmap
read lock, serialized only by the PTE lock and the rechecks after it (do_anonymous_page:
pte_none again under the lock, else release the new page; do_wp_page: pte_same):

- read vs write: a read fault (the shared zero page) against a write fault (a new
  page); the read returns 0 or the written byte, the byte then reads back as written.
- write vs write: both CPUs write a byte of their own in the same page; one fault
  installs its page, the other finds the PTE filled and writes through it. Both bytes
  read back.
- write vs MADV_DONTNEED of that page: the write faults while the zap drops the page;
  madvise returns 0, each byte reads back as written or as zero (if the zap came after
  it), never as anything else, and the same from both CPUs.

- write faults vs MADV_DONTNEED of a whole 2 MiB: the emptied PTE table is freed
  (try_to_free_pte) while the faults lock it (pte_offset_map_lock rechecks the PMD).

Each round is run at three offsets of the second CPU (0, 3 and 9 loads of another page
first), so the race lands before, during and after the first fault.

    kmm run workloads/race_pte_fault.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_pte_fault.py --schedules 10000 --mode pct
"""

MACHINE = {"memory": "256MiB"}
MiB = 1 << 20
PAGE = 4096
DELAYS = (0, 3, 9)
NZ = 16  # bytes the writer stores into the page being dropped


async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 * MiB)
    assert await p.madvise(a, 2 * MiB, "nohugepage") == 0
    await p.store(a + MiB, b"\x01")  # the page the late CPU reads to wait
    page = a

    async def later(q, n):
        for _ in range(n):
            await q.load(a + MiB)

    for delay in DELAYS:
        # read vs write
        x = page
        page += PAGE

        async def reader(cpu, x=x):
            return await p.on(cpu).load(x)

        async def writer(cpu, x=x, delay=delay):
            q = p.on(cpu)
            await later(q, delay)
            await q.store(x, b"\x11")

        got, _ = await k.parallel(reader, writer)
        assert got in (b"\x00", b"\x11"), f"read fault returned {got!r}"
        assert await p.load(x) == b"\x11"

        # write vs write, a byte each
        y = page
        page += PAGE

        async def w0(cpu, y=y):
            await p.on(cpu).store(y + 1, b"\x21")

        async def w1(cpu, y=y, delay=delay):
            q = p.on(cpu)
            await later(q, delay)
            await q.store(y + 2, b"\x22")

        await k.parallel(w0, w1)
        assert await p.load(y + 1, 2) == b"\x21\x22"

        # write vs MADV_DONTNEED of that page
        z = page
        page += PAGE

        async def wz(cpu, z=z):
            q = p.on(cpu)
            for i in range(NZ):  # still storing when the zap and its flush land
                await q.store(z + 64 * i, bytes([0x31 + i]))

        async def dz(cpu, z=z, delay=delay):
            q = p.on(cpu)
            await later(q, delay)
            return await q.madvise(z, PAGE, "dontneed")

        _, dropped = await k.parallel(wz, dz)
        assert dropped == 0, f"MADV_DONTNEED returned {dropped}"
        for i in range(NZ):
            # both CPUs see the same byte (a CPU left with a stale translation of the
            # dropped page would read what it wrote into freed memory)
            got = await p.on(0).load(z + 64 * i)
            assert got == await p.on(1).load(z + 64 * i), f"CPUs disagree on byte {i}"
            assert got in (b"\x00", bytes([0x31 + i])), f"byte {i} reads {got!r}"

    # write faults vs MADV_DONTNEED of the whole 2 MiB: the zap leaves the PTE table
    # empty and frees it (try_to_free_pte) while the faults walk into it
    for delay in DELAYS:
        t = await p.mmap(2 * MiB)
        assert await p.madvise(t, 2 * MiB, "nohugepage") == 0
        await p.store(t, b"\x51")

        async def wt(cpu, t=t):
            q = p.on(cpu)
            for i in range(1, 5):
                await q.store(t + i * 3 * PAGE, bytes([0x51 + i]))

        async def dt(cpu, t=t, delay=delay):
            q = p.on(cpu)
            await later(q, delay)
            return await q.madvise(t, 2 * MiB, "dontneed")

        _, dropped = await k.parallel(wt, dt)
        assert dropped == 0, f"MADV_DONTNEED returned {dropped}"
        for i in range(1, 5):
            got = await p.on(0).load(t + i * 3 * PAGE)
            assert got == await p.on(1).load(t + i * 3 * PAGE), f"CPUs disagree ({i})"
            assert got in (b"\x00", bytes([0x51 + i])), f"byte {i} reads {got!r}"

    rss, huge = k.smaps(p, a, 2 * MiB)
    assert huge == 0, f"{huge} kB of THP in a VM_NOHUGEPAGE region"
    return {"lost_bytes": len(await p.verify())}
