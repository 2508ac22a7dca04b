"""The race laboratory finds a safeguard removed from the code, not only the switch.

kmm/bugs.py turns a safeguard off with a switch tested at its site; a lab that only
found switched-off safeguards could be tuned to the switches. Here the safeguard itself
is cut out of the function's source (an AST mutation: the statement holding the
recheck or the TLB flush is deleted, whatever the switch says), the mutated function
replaces the real one, and ``kmm explore`` must find the same kind of violation on the
bug's race program within the budget it needs with the switch.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import textwrap

import pytest

from kmm import bugs, huge_memory, pgtable_generic
from kmm.tools import explore

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
BUDGET = 40  # schedules: each of these bugs shows within a few with its switch


class _Cut(ast.NodeTransformer):
    """Deletes every statement (an ``if`` included) whose code calls ``callee``."""

    def __init__(self, callee: str) -> None:
        self.callee = callee
        self.cut = 0

    def _calls(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Call) and (
            getattr(n.func, "attr", None) == self.callee
            or getattr(n.func, "id", None) == self.callee) for n in ast.walk(node))

    def visit_If(self, node: ast.If):
        if self._calls(node.test) or all(self._calls(s) for s in node.body):
            self.cut += 1
            return None
        return self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr):
        if self._calls(node):
            self.cut += 1
            return None
        return node


def mutated(module, name: str, callee: str):
    """module.name with every statement calling ``callee`` cut out, compiled in the
    module's own globals."""
    fn = getattr(module, name)
    src = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(src)
    cut = _Cut(callee)
    tree = ast.fix_missing_locations(cut.visit(tree))
    assert cut.cut == 1, f"{name}: {cut.cut} statements call {callee}"
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    ns: dict = {}
    exec(compile(tree, inspect.getsourcefile(fn), "exec"), module.__dict__, ns)
    return ns[name]


# bug -> (module, function, the call whose statement is the safeguard)
MUTANTS = {
    # the pmd_none recheck under the PMD lock, before installing the THP
    "huge_fault_no_pmd_none_recheck": (huge_memory, "__do_huge_pmd_anonymous_page",
                                       "pmd_none"),
    # the TLB flush after clearing the PMD of a collapse
    "collapse_no_tlb_flush": (pgtable_generic, "pmdp_collapse_flush",
                              "flush_tlb_mm_range"),
    # the TLB flush after invalidating the PMD of a split
    "split_pmd_no_tlb_flush": (pgtable_generic, "pmdp_invalidate", "flush_tlb_mm_range"),
}


def first_violation(program: str, inject=()) -> tuple[int | None, str | None]:
    cfg = explore.Config(program=str(WORKLOADS / program), inject=list(inject))
    s = explore.explore(cfg, BUDGET)
    return s.first, (s.first_violation or {}).get("kind")


@pytest.mark.parametrize("bug", sorted(MUTANTS))
def test_a_safeguard_cut_from_the_source_is_found_as_its_switch_is(bug, monkeypatch):
    program = bugs.BUGS[bug].program
    switched, kind = first_violation(program, inject=[bug])
    assert switched is not None, f"{bug}: the switch is not found in {BUDGET} schedules"
    module, name, callee = MUTANTS[bug]
    monkeypatch.setattr(module, name, mutated(module, name, callee))
    found, mkind = first_violation(program)
    assert found is not None, f"{bug}: the mutant survives {BUDGET} schedules"
    assert mkind == kind and found <= switched + 3  # as soon (the mutant may lose a point)
    monkeypatch.undo()
    assert first_violation(program) == (None, None)  # the real code runs clean
