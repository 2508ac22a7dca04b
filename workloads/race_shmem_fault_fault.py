"""Two write faults on the same shmem pages at once, on two CPUs: one PMD-size memfd
folio and one small one.

shmem_enabled=always. The 2 MiB mapping's first write fault allocates a PMD-size folio
in the page cache and maps it with one PMD (do_set_pmd); the 64 KiB mapping is too
small for one, so its fault maps a 4 KiB folio with a PTE (finish_fault). Each CPU
writes its own byte of the same page of both, so both faults may find the entry empty
without the lock, and both get the folio from the page cache (the second waits for the
first's folio lock). The second must see, under the PMD or PTE lock, that the first
has mapped it (do_set_pmd's pmd_none, finish_fault's pte_none) and map nothing: one
mapping, counted once. Both bytes read back:

    kmm explore workloads/race_shmem_fault_fault.py --schedules 1000 --mode pct
"""

MiB = 1 << 20
SMALL = 64 << 10


async def main(k):
    k.set_knob("shmem_enabled", "always")
    p = await k.process("main")
    a = await p.mmap(2 * MiB, backing="memfd")
    b = await p.mmap(SMALL, backing="memfd")

    async def writer(cpu):
        q = p.on(cpu)
        await q.store(a + 8 * cpu, bytes([0x10 + cpu]))
        await q.store(b + 8 * cpu, bytes([0x20 + cpu]))

    await k.parallel(writer, writer)
    got = [await p.load(base + off) for base in (a, b) for off in (0, 8)]
    assert got == [b"\x10", b"\x11", b"\x20", b"\x21"], f"reads {got}"
    # one PMD mapping of one file THP (a second do_set_pmd would count twice)
    assert k.vmstat()["thp_file_mapped"] == 1, k.vmstat()["thp_file_mapped"]
    rss, _ = k.smaps(p, a, 2 * MiB)
    return {"rss_kb": rss, "lost_bytes": len(await p.verify())}
