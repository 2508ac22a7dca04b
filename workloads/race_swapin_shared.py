"""Swap-in faults racing on one swap PTE whose slot a forked child shares.

The parent writes a VM_NOHUGEPAGE region, pages it out (MADV_PAGEOUT: a swap PTE per
page, each slot's count 1) and forks: copy_pte_range duplicates every swap PTE into
the child (swap_duplicate: each slot's count 2). With a count above 1 a fault cannot
take the synchronous device's direct path (which the slot's SWAP_HAS_CACHE serializes);
it reads the page into the swap cache, where a second fault on the same PTE finds the
same folio. The two faults are then serialized by the folio lock and the PTE lock, and
only do_swap_page's pte_same under the PTE lock tells the second that the first has
mapped the page: without it the second maps it again and frees the child's share of
the slot (swap_free twice), leaving the child's swap PTE on a freed slot.

Every round races two of the parent's CPUs on one swapped-out 4 KiB page (read vs
read, read vs write, write vs write), at three offsets of the second CPU (0, 2 and 6
loads of a resident page first), so the race lands before, during and after the first
fault:

- each read returns the byte written before the fork (the touch writes the first byte
  of each page); each write reads back; the page then reads back as written from both CPUs;
- the child reads every page as it was at the fork (its swap PTE still names a live
  slot holding those bytes), and so does the parent wherever it did not write.

    kmm run workloads/race_swapin_shared.py --cpus 2 --mode random --seed 1
    kmm explore workloads/race_swapin_shared.py --schedules 10000 --mode pct
"""

MACHINE = {"memory": "256MiB", "swap": "64MiB"}
PAGE = 4096
DELAYS = (0, 2, 6)
KINDS = ("rr", "rw", "ww")
OLD = 0x33


async def main(k):
    p = await k.process("main")
    size = (len(DELAYS) * len(KINDS) + 2) * PAGE
    a = await p.mmap(size)
    assert await p.madvise(a, size, "nohugepage") == 0
    await p.touch(a, size, value=OLD)
    out = k.vmstat().get("pswpout", 0)
    assert await p.madvise(a, size - PAGE, "pageout") == 0
    assert k.vmstat().get("pswpout", 0) - out >= size // PAGE - 1, "pageout wrote too little"
    resident = a + size - PAGE  # the page the late CPU loads to wait
    child = await p.fork("child")

    async def later(q, n):
        for _ in range(n):
            await q.load(resident)

    page = a
    for delay in DELAYS:
        for kind in KINDS:
            x = page
            page += PAGE

            async def first(cpu, x=x, kind=kind):
                q = p.on(cpu)
                if kind == "ww":
                    await q.store(x + 1, b"\x51")
                    return await q.load(x + 1)
                return await q.load(x)

            async def second(cpu, x=x, kind=kind, delay=delay):
                q = p.on(cpu)
                await later(q, delay)
                if kind == "rr":
                    return await q.load(x)
                await q.store(x + 2, b"\x62")
                return await q.load(x + 2)

            got1, got2 = await k.parallel(first, second)
            want1 = b"\x51" if kind == "ww" else bytes([OLD])
            want2 = bytes([OLD]) if kind == "rr" else b"\x62"
            assert got1 == want1, f"{kind} delay {delay}: first CPU read {got1!r}"
            assert got2 == want2, f"{kind} delay {delay}: second CPU read {got2!r}"
            for cpu in (0, 1):
                back = await p.on(cpu).load(x, 3)
                assert back[0] == OLD, f"{kind}: CPU {cpu} reads byte 0 as {back[0]}"
                if kind == "ww":
                    assert back[1:] == b"\x51\x62", f"ww: CPU {cpu} reads {back[1:]!r}"
                elif kind == "rw":
                    assert back[1:] == b"\x00\x62", f"rw: CPU {cpu} reads {back[1:]!r}"
            got = await child.load(x, 3)
            assert got == bytes([OLD, 0, 0]), f"{kind}: the child reads {got!r} after the race"

    for x in range(a, page, PAGE):
        got = await child.load(x, 3)
        assert got == bytes([OLD, 0, 0]), f"the child reads {got!r} at {x:#x}"
    return {"lost_bytes": len(await p.verify()), "child_lost": len(await child.verify())}
