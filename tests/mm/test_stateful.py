"""Stateful property test: random sequences of mmap, madvise (hugepage, nohugepage,
dontneed), mprotect (r, rw), writes and reads of random page ranges, fork, child writes
and exits, run as a scenario with the invariant checker after every step.

A hypothesis RuleBasedStateMachine builds the scenario and, alongside, a model of what
the kernel guarantees to user space: the byte each process reads at each page (private
anonymous memory: zero until written, MADV_DONTNEED makes it zero again, fork gives the
child a copy, later writes on either side stay on that side), which accesses are
SIGSEGV (a write to a page whose VMA lacks VM_WRITE), and that a dead process's later
steps find no process. THPs, splits and COW are invisible to that model by design:
they must not change a single byte. At teardown the scenario runs once
(check_invariants after every step) and its step results must equal the model's.
"""

from __future__ import annotations

import json
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from kmm.testing import agreeing_checks, check_invariants
from kmm.tools.runner import run_scenario
from kmm.tools.scenario import load_scenario

PAGE = 4096
SIZES = [512, 1024 + 3, 768]  # pages: one PMD, two PMDs and a tail, one and a half


class Proc:
    """The model of one process: its regions, the byte at the start of each written
    page, and the protection of each page mprotect touched."""

    def __init__(self, regions=None, mem=None, prot=None):
        self.regions: dict[str, int] = dict(regions or {})  # region -> pages
        self.mem: dict[tuple[str, int], int] = dict(mem or {})  # (region, page) -> byte
        self.prot: dict[tuple[str, int], str] = dict(prot or {})  # default "rw"
        self.dead = False  # killed by SIGSEGV (the loader still knows the name)

    def fork(self) -> "Proc":
        return Proc(self.regions, self.mem, self.prot)


class ScenarioMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []
        self.expect: list[dict] = []
        self.procs: dict[str, Proc] = {"main": Proc()}
        self.nregions = 0
        self.nchildren = 0

    # ------------------------------------------------------------ helpers
    def step(self, op: str, proc: str, expect: dict, **kw) -> None:
        body = [f"op = {json.dumps(op)}", f"proc = {json.dumps(proc)}"]
        body += [f"{key} = {json.dumps(v)}" for key, v in kw.items()]  # TOML-compatible
        self.steps.append("[[steps]]\n" + "\n".join(body) + "\n")
        self.expect.append({"op": op, **expect})

    def result(self, proc: str) -> dict | None:
        """The result of any step by a process SIGSEGV killed; None while it lives."""
        if self.procs[proc].dead:
            return {"ok": False, "error": "no such process"}
        return None

    @staticmethod
    def pick_range(data, pages: int) -> tuple[int, int]:
        first = data.draw(st.integers(0, pages - 1), label="first page")
        n = data.draw(st.integers(1, min(pages - first, 600)), label="pages")
        return first, n

    def pick(self, data):
        """A process the scenario still knows (alive, or killed by SIGSEGV) that has a
        region, and one of its regions."""
        names = sorted(n for n, p in self.procs.items() if p.regions)
        name = data.draw(st.sampled_from(names), label="proc")
        p = self.procs[name]
        region = data.draw(st.sampled_from(sorted(p.regions)), label="region")
        return name, p, region

    def has_regions(self) -> bool:
        return any(p.regions for p in self.procs.values())

    # -------------------------------------------------------------- rules
    @precondition(lambda self: self.nregions < 2 and not self.procs["main"].dead)
    @rule(size=st.sampled_from(SIZES))
    def mmap(self, size):
        name = f"r{self.nregions}"
        self.nregions += 1
        self.procs["main"].regions[name] = size
        self.step("mmap", "main", {"ok": True}, region=name, size=size * PAGE)

    @precondition(has_regions)
    @rule(data=st.data(), advice=st.sampled_from(["hugepage", "nohugepage", "dontneed"]))
    def madvise(self, data, advice):
        name, p, region = self.pick(data)
        first, n = self.pick_range(data, p.regions[region])
        res = self.result(name)
        if res is None:
            res = {"ok": True}
            if advice == "dontneed":
                for i in range(first, first + n):
                    p.mem.pop((region, i), None)
        self.step("madvise", name, res, region=region, advice=advice,
                  offset=first * PAGE, length=n * PAGE)

    @precondition(has_regions)
    @rule(data=st.data(), prot=st.sampled_from(["r", "rw"]))
    def mprotect(self, data, prot):
        name, p, region = self.pick(data)
        first, n = self.pick_range(data, p.regions[region])
        res = self.result(name)
        if res is None:
            res = {"ok": True}
            for i in range(first, first + n):
                p.prot[(region, i)] = prot
        self.step("mprotect", name, res, region=region, prot=prot,
                  offset=first * PAGE, length=n * PAGE)

    @precondition(has_regions)
    @rule(data=st.data(), value=st.integers(1, 255))
    def write(self, data, value):
        name, p, region = self.pick(data)
        first, n = self.pick_range(data, p.regions[region])
        res = self.result(name)
        if res is None:
            res = {"ok": True}
            for i in range(first, first + n):
                if p.prot.get((region, i), "rw") != "rw":
                    # bad_area_access_error: the writes before this page happened
                    res = {"ok": False, "signal": "SIGSEGV"}
                    p.dead = True
                    break
                p.mem[(region, i)] = value
        self.step("touch", name, res, region=region, offset=first * PAGE,
                  length=n * PAGE, value=value)

    @precondition(has_regions)
    @rule(data=st.data())
    def read(self, data):
        name, p, region = self.pick(data)
        first, n = self.pick_range(data, p.regions[region])
        self.step("touch", name, self.result(name) or {"ok": True}, region=region,
                  offset=first * PAGE, length=n * PAGE, write=False)

    @precondition(has_regions)
    @rule(data=st.data())
    def check(self, data):
        """Read back a range and count the pages that do not hold ``value``: the model
        knows that count exactly."""
        name, p, region = self.pick(data)
        first, n = self.pick_range(data, p.regions[region])
        values = [p.mem.get((region, i), 0) for i in range(first, first + n)]
        value = data.draw(st.sampled_from(sorted(set(values))), label="value")
        res = self.result(name)
        if res is None:
            res = {"ok": True, "mismatches": sum(v != value for v in values)}
        self.step("check", name, res, region=region, offset=first * PAGE,
                  length=n * PAGE, value=value)

    @precondition(lambda self: not self.procs["main"].dead and self.procs["main"].regions
                  and len(self.procs) < 3 and self.nchildren < 2)
    @rule()
    def fork(self):
        self.nchildren += 1
        child = f"c{self.nchildren}"
        self.procs[child] = self.procs["main"].fork()
        self.step("fork", "main", {"ok": True}, child=child)

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def child_exit(self, data):
        name = data.draw(st.sampled_from(sorted(n for n in self.procs if n != "main")),
                         label="child")
        res = self.result(name) or {"ok": True}
        del self.procs[name]  # the loader forgets it: no later step may name it
        self.step("exit", name, res)

    # ----------------------------------------------------------- teardown
    def teardown(self) -> None:
        if not self.steps:
            return
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/stateful.toml"
            with open(path, "w") as f:
                f.write('description = "stateful"\n' + "".join(self.steps))
            # the full and the incremental checkers, which must agree at every step
            rep = run_scenario(load_scenario(path), check=agreeing_checks())
        text = "".join(self.steps)
        for i, (got, want) in enumerate(zip(rep["steps"], self.expect), 1):
            assert got == want, f"step {i}: {got} != {want}\n{text}"
        assert len(rep["steps"]) == len(self.expect)
        alive = {f"{n}/{r}" for n, p in self.procs.items() if not p.dead for r in p.regions}
        assert set(rep["regions"]) == alive, text


ScenarioMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, derandomize=True,
    database=None, suppress_health_check=[HealthCheck.too_slow])
test_scenarios = ScenarioMachine.TestCase


def test_mprotect_over_a_range_merged_into_the_next_vma(tmp_path):
    """Found by the state machine: mprotect(rw) of [read-only VMA][read-write VMA]. The
    first mprotect_fixup merges the read-only part into the next VMA (same flags now);
    do_mprotect_pkey goes on from vma_iter_end, the end of the merged VMA, so the call
    succeeds (it returned ENOMEM when the loop looked for a VMA starting at the old
    boundary) and the whole range is writable again."""
    path = tmp_path / "mprotect_merge.toml"
    path.write_text('''
[[steps]]
op = "mmap"
region = "a"
size = "4MiB"
[[steps]]
op = "touch"
region = "a"
[[steps]]
op = "mprotect"
region = "a"
length = "1MiB"
prot = "r"
[[steps]]
op = "mprotect"
region = "a"
prot = "rw"
[[steps]]
op = "touch"
region = "a"
value = 2
[[steps]]
op = "check"
region = "a"
value = 2
''')
    rep = run_scenario(load_scenario(path), check=check_invariants)
    assert rep["steps"] == [{"op": "mmap", "ok": True}, {"op": "touch", "ok": True},
                            {"op": "mprotect", "ok": True}, {"op": "mprotect", "ok": True},
                            {"op": "touch", "ok": True},
                            {"op": "check", "ok": True, "mismatches": 0}]
