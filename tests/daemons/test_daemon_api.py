"""The public daemon API (kmm/daemon.py): its views agree with the machine, its actions
do what their kernel counterparts do, and every call's result is plain msgpack data."""

from __future__ import annotations

from conftest import run as crun

import dataclasses
import inspect

import msgpack

from kmm.daemon import VM_HUGEPAGE, DaemonContext, FolioView, PmdView

MiB = 1 << 20
BLOCK = 2 * MiB


def run(fn, **kw):
    """``await fn(m, k, ctx)`` as the driver of a small machine, with a DaemonContext."""
    async def driver(m, k):
        return await fn(m, k, DaemonContext(m, "probe"))
    return crun(driver, memory=64 * MiB, **kw)


def ev(m, name):
    return m.vmstat.events[name]


def test_a_faulted_thp_shows_as_a_huge_pmd_of_an_order_9_folio():
    """MADV_HUGEPAGE then a write fault: the view has a huge PMD whose folio is order 9,
    one reference, one (entire) mapping and no PTE mapping of its pages; the next block,
    never touched, is none; the mm list shows the VMA with VM_HUGEPAGE, registered."""
    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(2 * BLOCK)
        await p.madvise(a, 2 * BLOCK, "hugepage")
        await p.touch(a, 4096)
        pid = p.task.pid
        huge, none = ctx.page_table(pid, a, a + 2 * BLOCK)
        head = ctx.folio(huge.pfn)
        tail = ctx.folio(huge.pfn + 7)
        return pid, a, ctx.mm_list(), huge, none, head, tail, m.physmem.folio(huge.pfn)
    pid, a, mms, huge, none, head, tail, folio = run(fn)
    assert (huge.addr, huge.kind, huge.present, huge.young, huge.dirty) == \
        (a, "huge", 512, True, True)
    assert none == PmdView(a + BLOCK, "none")
    assert head.pfn == head.head == huge.pfn == folio.pfn and head.order == 9
    assert (head.refcount, head.mapcount, head.entire_mapcount, head.page_mapcount) == \
        (1, 1, 1, 0)
    assert head.anon and "head" in head.flags and head.lru.endswith("_anon")
    assert (tail.head, tail.order, tail.refcount) == (huge.pfn, 9, 1)
    (mm,) = [x for x in mms if x["pid"] == pid]
    assert mm["name"] == "app" and mm["khugepaged"]
    (vma,) = mm["vmas"]
    assert (vma["start"], vma["end"], vma["thp"]) == (a, a + 2 * BLOCK, True)
    assert vma["flags"] & VM_HUGEPAGE


def test_a_pte_table_view_counts_present_young_and_none_ptes():
    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(BLOCK)
        await p.touch(a, 64 * 4096)        # 64 pages, 4 KiB each (no MADV_HUGEPAGE)
        (v,) = ctx.page_table(p.task.pid, a, a + BLOCK, ptes=True)
        return v, ctx.folio(v.ptes[0][3])
    v, f = run(fn)
    assert (v.kind, v.present, v.young_ptes, v.dirty_ptes, v.none_ptes) == \
        ("table", 64, 64, 64, 448)
    assert len(v.ptes) == 512 and v.ptes[0][:3] == [True, True, True]
    assert v.ptes[64] == [False, False, False, -1]
    assert (f.order, f.refcount, f.mapcount, f.page_mapcount) == (0, 1, 1, 1)


def test_clear_young_stays_clear_under_a_cached_tlb_entry_until_a_flush():
    """ptep_test_and_clear_young does not flush (x86): a load through the CPU's cached
    translation neither misses nor sets the accessed bit again; after a flush the next
    load walks the tables (one TLB miss) and the hardware walker sets it."""
    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(BLOCK)
        await p.touch(a, 4096)
        pid = p.task.pid
        out = [await ctx.clear_young(pid, a, a + BLOCK),
               await ctx.clear_young(pid, a, a + BLOCK)]
        misses = sum(ctx.tlb_misses())
        await p.load(a)                          # a TLB hit
        out.append(sum(ctx.tlb_misses()) - misses)
        out.append(await ctx.clear_young(pid, a, a + BLOCK, flush=True))
        await p.load(a)                          # walks again: young
        out.append(sum(ctx.tlb_misses()) - misses)
        out.append(await ctx.clear_young(pid, a, a + BLOCK))
        return a, out
    a, (first, second, hit_misses, after_hit, walk_misses, after_walk) = run(fn)
    assert first == [[a, 1]] and second == [[a, 0]]
    assert hit_misses == 0 and after_hit == [[a, 0]]
    assert walk_misses == 1 and after_walk == [[a, 1]]


def test_clear_young_of_a_huge_pmd_flushes_it():
    """pmdp_clear_flush_young flushes the 2 MiB range when the PMD was young, so the
    next access walks and sets the bit again."""
    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(BLOCK)
        await p.madvise(a, BLOCK, "hugepage")
        await p.touch(a, 4096)
        pid = p.task.pid
        first = await ctx.clear_young(pid, a, a + BLOCK)
        young_after_clear = ctx.page_table(pid, a, a + BLOCK)[0].young
        await p.load(a)
        return a, first, young_after_clear, await ctx.clear_young(pid, a, a + BLOCK)
    a, first, young_after_clear, again = run(fn)
    assert first == [[a, 512]] and not young_after_clear and again == [[a, 512]]


def test_collapse_and_split_requests_do_what_the_kernel_does():
    """collapse (as khugepaged) of a block of 4 KiB pages: SCAN_SUCCEED, thp_collapse_alloc
    1, a huge PMD; refused under max_ptes_none 0 for a sparse block unless as
    MADV_COLLAPSE. split_huge_pmd: thp_split_pmd 1, the folio stays order 9, now
    PTE-mapped; split_huge_page: thp_split_page 1, order-0 pages."""
    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(2 * BLOCK)
        await p.touch(a, BLOCK)                   # dense, 4 KiB pages
        await p.touch(a + BLOCK, 4096)            # sparse: one page
        await p.madvise(a, 2 * BLOCK, "hugepage")
        pid = p.task.pid
        k.set_knob("khugepaged/max_ptes_none", 0)
        r = {"dense": await ctx.collapse(pid, a), "alloc": ev(m, "thp_collapse_alloc"),
             "sparse": await ctx.collapse(pid, a + BLOCK),
             "sparse_madvise": await ctx.collapse(pid, a + BLOCK, mode="madvise"),
             "again": await ctx.collapse(pid, a),
             "kinds": [v.kind for v in ctx.page_table(pid, a, a + 2 * BLOCK)]}
        r["split_pmd"] = await ctx.split_huge_pmd(pid, a)
        v = ctx.page_table(pid, a, a + BLOCK, ptes=True)[0]
        r["after_pmd_split"] = (v.kind, v.present, ctx.folio(v.ptes[0][3]).order)
        r["split_pmd_events"] = (ev(m, "thp_split_pmd"), ev(m, "thp_split_page"))
        r["split_page"] = await ctx.split_huge_page(pid, a + BLOCK)
        v = ctx.page_table(pid, a + BLOCK, a + 2 * BLOCK, ptes=True)[0]
        r["after_page_split"] = (v.kind, ctx.folio(v.ptes[0][3]).order)
        r["split_page_events"] = (ev(m, "thp_split_pmd"), ev(m, "thp_split_page"))
        r["gone"] = await ctx.collapse(9999, a)
        return r
    r = run(fn)
    assert r["dense"] == "SCAN_SUCCEED" and r["alloc"] == 1
    assert r["sparse"] == "SCAN_EXCEED_NONE_PTE" and r["sparse_madvise"] == "SCAN_SUCCEED"
    assert r["again"] == "SCAN_PMD_MAPPED" and r["kinds"] == ["huge", "huge"]
    assert r["split_pmd"] is True and r["after_pmd_split"] == ("table", 512, 9)
    assert r["split_pmd_events"] == (1, 0)
    assert r["split_page"] == 1 and r["after_page_split"] == ("table", 0)
    assert r["split_page_events"] == (2, 1)  # the PMD-mapped THP's PMD split first
    assert r["gone"] == "SCAN_ANY_PROCESS"


# Every public method of DaemonContext with arguments to call it with: a method added
# without an entry here fails test_every_call_returns_plain_msgpack_data.
def calls(pid, a):
    return {
        "sleep": (1000,), "wait": ("probe_wait", 1000), "knob": ("khugepaged/max_ptes_none",),
        "zone": (), "kswapd_order": (), "set_kswapd_order": (0,),
        "prepare_kswapd_sleep": (0,), "balance_pgdat": (0,),
        "count_vm_event": ("kswapd_low_wmark_hit_quickly",),
        "kcompactd_work_requested": (), "kcompactd_do_work": (), "wakeup_kcompactd": (0,),
        "hugepage_pmd_enabled": (), "khugepaged_has_work": (), "khugepaged_scan_at_head": (),
        "khugepaged_scan_mm_slot": (512,), "vmstat": (), "mm_list": (),
        "page_table": (pid, a, a + 2 * BLOCK, True), "folio": (1,), "tlb_misses": (),
        "clear_young": (pid, a, a + 2 * BLOCK), "collapse": (pid, a + BLOCK),
        "split_huge_pmd": (pid, a), "split_huge_page": (pid, a),
        "try_to_free_pages": (0,),
    }


def plain(v):
    """What the wire carries: a dataclass as the dict of its fields."""
    if dataclasses.is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def test_every_call_returns_plain_msgpack_data():
    public = {name for name, fn in inspect.getmembers(DaemonContext, inspect.isfunction)
              if not name.startswith("_")}

    async def fn(m, k, ctx):
        p = await k.process("app")
        a = await p.mmap(2 * BLOCK)
        await p.madvise(a, 2 * BLOCK, "hugepage")
        await p.touch(a, 4096)                         # a THP
        await p.touch(a + BLOCK, 4096)                 # a THP too (for split)
        table = calls(p.task.pid, a)
        assert set(table) == public, "every DaemonContext method needs an entry in calls()"
        out = {}
        for name, args in table.items():
            r = getattr(ctx, name)(*args)
            out[name] = await r if inspect.isawaitable(r) else r
        out["now"] = ctx.now
        out["khugepaged_sleep_expire"] = ctx.khugepaged_sleep_expire
        out["folio_none"] = ctx.folio(-1)
        return out
    out = run(fn, check=lambda m, k: None)
    for name, value in out.items():
        data = plain(value)
        assert msgpack.unpackb(msgpack.packb(data)) == data, name
    assert isinstance(out["page_table"][0], PmdView) and isinstance(out["folio"], FolioView)
