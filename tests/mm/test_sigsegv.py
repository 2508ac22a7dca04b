"""SIGSEGV (arch/x86/mm/fault.c do_user_addr_fault -> bad_area / bad_area_access_error):
an access outside every VMA (SEGV_MAPERR) or a write to a VMA without VM_WRITE
(SEGV_ACCERR) kills the process. design.md section 5: the accesses before the bad one
have happened, the step is {"ok": false, "signal": "SIGSEGV"}, the process's memory is
released (exit_mmap) and its regions leave the report, and later steps naming it are
{"ok": false, "error": "no such process"}; other processes go on.
"""

from __future__ import annotations

import pytest

from kmm.fault import Segv
from kmm.machine import Machine, MachineConfig
from kmm.runtime.trace import Trace
from kmm.testing import check_invariants
from kmm.tools.runner import run_scenario
from kmm.tools.scenario import load_scenario
from kmm.workload import Kernel

MiB = 1 << 20
GiB = 1 << 30
BOOT_FREE = GiB // 4096 - 1  # a 1 GiB machine less empty_zero_page
SEGV = {"ok": False, "signal": "SIGSEGV"}
GONE = {"ok": False, "error": "no such process"}


def scenario(tmp_path, text):
    path = tmp_path / "segv.toml"
    path.write_text(text)
    return run_scenario(load_scenario(path), check=check_invariants)


def ok(op, **kw):
    return {"op": op, "ok": True, **kw}


STEPS_BEFORE = '''
[[steps]]
op = "mmap"
region = "a"
size = "4MiB"
[[steps]]
op = "madvise"
region = "a"
advice = "hugepage"
'''


def test_touch_past_the_end_of_a_region(tmp_path):
    """The touch runs off the end of a 4 MiB region into the gap before the next one
    (SEGV_MAPERR): the 4 MiB before it were written (two THPs faulted), then the
    process died; main's memory is all back, later steps find no process."""
    rep = scenario(tmp_path, STEPS_BEFORE + '''
[[steps]]
op = "touch"
region = "a"
length = "6MiB"
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "check"
region = "a"
[[steps]]
op = "madvise"
region = "a"
advice = "dontneed"
[[steps]]
op = "exit"
''')
    assert rep["steps"] == [ok("mmap"), ok("madvise"), {"op": "touch", **SEGV},
                            {"op": "touch", **GONE}, {"op": "check", **GONE},
                            {"op": "madvise", **GONE}, {"op": "exit", **GONE}]
    assert rep["vmstat"]["thp_fault_alloc"] == 2  # the writes before the bad one
    assert rep["regions"] == {}
    assert rep["zone"]["nr_free"] == BOOT_FREE  # pages, tables and deposits freed


def test_write_to_a_read_only_region(tmp_path):
    """mprotect(PROT_READ) then a write: the VMA lacks VM_WRITE (SEGV_ACCERR). Reads
    were fine; the write kills the process; a child forked before keeps its copy."""
    rep = scenario(tmp_path, STEPS_BEFORE + '''
[[steps]]
op = "touch"
region = "a"
value = 7
[[steps]]
op = "fork"
child = "c1"
[[steps]]
op = "mprotect"
region = "a"
prot = "r"
[[steps]]
op = "check"
region = "a"
value = 7
[[steps]]
op = "touch"
region = "a"
offset = "3MiB"
length = 1
value = 9
[[steps]]
op = "check"
region = "a"
value = 7
[[steps]]
op = "check"
proc = "c1"
region = "a"
value = 7
[[steps]]
op = "touch"
proc = "c1"
region = "a"
value = 8
[[steps]]
op = "check"
proc = "c1"
region = "a"
value = 8
''')
    assert rep["steps"] == [
        ok("mmap"), ok("madvise"), ok("touch"), ok("fork"), ok("mprotect"),
        ok("check", mismatches=0), {"op": "touch", **SEGV}, {"op": "check", **GONE},
        ok("check", mismatches=0), ok("touch"), ok("check", mismatches=0)]
    # main is gone; the child owns the two THPs alone now and wrote them in place
    assert rep["regions"] == {"c1/a": {"rss_kb": 4096, "anon_huge_kb": 4096}}
    assert rep["vmstat"]["thp_fault_alloc"] == 2
    assert rep["vmstat"]["thp_split_pmd"] == 0


def test_mprotect_none_read_is_sigsegv(tmp_path):
    """PROT_NONE: the VMA has neither VM_READ nor VM_WRITE, even a read faults."""
    rep = scenario(tmp_path, STEPS_BEFORE + '''
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "mprotect"
region = "a"
offset = "2MiB"
prot = "none"
[[steps]]
op = "check"
region = "a"
[[steps]]
op = "exit"
''')
    assert rep["steps"][-2:] == [{"op": "check", **SEGV}, {"op": "exit", **GONE}]
    assert rep["regions"] == {} and rep["zone"]["nr_free"] == BOOT_FREE


def test_touch_of_a_munmapped_hole_in_a_child_spares_the_parent(tmp_path):
    """The child dies in the hole; the parent's THPs, shared until then, stay mapped and
    readable; the child's death frees only what it alone held."""
    rep = scenario(tmp_path, STEPS_BEFORE + '''
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "fork"
child = "c1"
[[steps]]
op = "munmap"
proc = "c1"
region = "a"
offset = "1MiB"
length = "4KiB"
[[steps]]
op = "touch"
proc = "c1"
region = "a"
value = 2
[[steps]]
op = "touch"
proc = "c1"
region = "a"
[[steps]]
op = "check"
region = "a"
''')
    assert rep["steps"][-3:] == [{"op": "touch", **SEGV}, {"op": "touch", **GONE},
                                 ok("check", mismatches=0)]
    assert rep["regions"] == {"main/a": {"rss_kb": 4096, "anon_huge_kb": 4096}}
    # the munmap split the child's PMD; the child's COW copies of the first MiB died
    # with it
    assert rep["vmstat"]["thp_split_pmd"] == 1


def test_segv_in_a_program_kills_only_that_process():
    """The program API: Proc.store past the end raises Segv (SEGV_MAPERR) after killing
    the process with SIGSEGV; its mm is torn down (exit_mmap) and everything it held
    returns to the allocator; the invariants hold after every operation."""
    m = Machine(MachineConfig(memory=GiB, cpus=2), trace=Trace())
    k = Kernel(m)
    k.after_op = lambda: check_invariants(m, k)
    out = {}

    async def driver():
        boot = m.zone.nr_free
        p = await k.process("p")
        a = await p.mmap(2 * MiB)
        await p.madvise(a, 2 * MiB, "hugepage")
        with pytest.raises(Segv) as ei:
            await p.store(a + 2 * MiB - 2, b"\x01\x02\x03\x04")  # crosses the end
        out["code"] = ei.value.code
        out["task"] = (p.task.alive, p.task.signal, p.task.mm.pgd)
        out["leak"] = boot - m.zone.nr_free
        check_invariants(m, k)
        with pytest.raises(ProcessLookupError):
            await p.touch(a, 4096)

    m.run(driver)
    assert out["code"] == "SEGV_MAPERR"
    assert out["task"] == (False, "SIGSEGV", -1)
    assert out["leak"] == 0
    assert m.vmstat.events["thp_fault_alloc"] == 1  # the bytes before the end were stored
