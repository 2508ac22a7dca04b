"""Import rules (design.md section 2), checked on the source with ast."""

from __future__ import annotations

import ast
import pathlib
import re

import kmm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_kmm_never_imports_daemons_or_workloads():
    for f in (ROOT / "kmm").rglob("*.py"):
        bad = {i for i in imports(f) if i.split(".")[0] in ("daemons", "workloads")
               or i.startswith(("kmm.daemons", "kmm.workloads"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_daemons_see_only_the_daemon_api():
    """Policy daemons are written against kmm.daemon alone (plus the standard library)."""
    for f in (ROOT / "daemons").rglob("*.py"):
        bad = {i for i in imports(f) if i.startswith("kmm") and i != "kmm.daemon"}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_workloads_see_only_the_program_api():
    """Programs are written against kmm.workload (and kmm's public names) alone, as a
    user's are; mechanism they need is a program API call (move_page, memory_reclaim)."""
    for f in (ROOT / "workloads").rglob("*.py"):
        bad = {i for i in imports(f) if i.startswith("kmm") and i not in ("kmm", "kmm.workload")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "kmm":
                names = {a.name for a in node.names}
                assert names <= set(kmm.__all__), f"{f.relative_to(ROOT)} imports {names}"
            # k.machine is the emulator's inside: a program that reads it breaks when
            # mechanism moves, and a spawned program has no machine to read
            if isinstance(node, ast.Attribute) and node.attr == "machine":
                raise AssertionError(f"{f.relative_to(ROOT)}:{node.lineno} reads .machine")


def test_runtime_imports_no_mechanism():
    allowed = {"kmm.runtime"}
    for f in (ROOT / "kmm" / "runtime").rglob("*.py"):
        bad = {i for i in imports(f) if i.startswith("kmm") and
               not any(i == a or i.startswith(a + ".") for a in allowed)}
        assert not bad, f"{f.relative_to(ROOT)} imports mechanism {bad}"


def test_mechanism_never_imports_tools():
    for f in (ROOT / "kmm").glob("*.py"):
        if f.name in ("__main__.py",):
            continue
        bad = {i for i in imports(f) if i.startswith("kmm.tools")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_readme_index_names_only_functions_that_exist():
    """The README's kernel-function index must not name a function kmm lacks."""
    text = (ROOT / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `kmm/")]
    assert rows
    for row in rows:
        module = re.match(r"\| `kmm/(\w+)\.py`", row)
        if module is None:
            continue
        src = (ROOT / "kmm" / f"{module.group(1)}.py").read_text()
        # kernel "__name"s may be "_name" or "name" in Python (mangling, style.md 2)
        defined = {n.name.lstrip("_") for n in ast.walk(ast.parse(src))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        cell = row.split("|")[3]
        for name in re.findall(r"`(\w+)`", cell):
            assert name.lstrip("_") in defined, f"README names {module.group(1)}.{name}"


# kmm/*.py that are not mechanism: the assembly (machine), the public facades (daemon:
# the daemon API; workload: the program API), the test helpers and the entry point
FACADES = {"machine", "daemon", "workload", "testing", "__init__", "__main__"}


def _kmm_graph() -> dict[str, set[str]]:
    """kmm module -> the kmm modules it imports (anywhere in the file: a lazy import in
    a function is a dependency too)."""
    mods = {f.stem: f for f in (ROOT / "kmm").glob("*.py")}
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module == "kmm":
                    deps |= {"kmm." + a.name for a in node.names}
                else:
                    deps.add(node.module)
        graph[name] = {d.split(".")[1] for d in deps
                       if d.startswith("kmm.") and d.split(".")[1] in mods} - {name}
    return graph


def test_mechanism_never_imports_the_machine_or_the_daemon_api():
    """machine.py is the assembly at the top and kmm.daemon a facade for policy: the
    mm/ mechanism modules (waitqueues: kmm.wait; costs: kmm.cost) import neither."""
    for name, deps in _kmm_graph().items():
        if name in FACADES:
            continue
        bad = deps & {"machine", "daemon", "workload", "testing"}
        assert not bad, f"kmm/{name}.py imports {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_cycles_are_the_kernels_own():
    """The import circles inside kmm/ hold only mm/ files that call each other in the
    kernel too: the allocator, reclaim, compaction, migration, swap, rmap, the fault
    path, THP and khugepaged (page_alloc.c calls into vmscan.c and compaction.c, which
    call back into it; huge_memory.c and rmap.c call each other; hugetlb.c is called
    by the fault path and __folio_put and calls the allocator; ...), and the two
    headers mm_types.h/pgtable.h. The shared-state layer (atomic), the locks, the
    waitqueues, the costs and the facades are outside every circle."""
    mm_circle = {"compaction", "huge_memory", "hugetlb", "hugetlb_fault", "hugetlb_resv",
                 "hugetlb_pmd_share",  # mm/hugetlb.c's PMD table sharing
                 "huge_memory_split",  # mm/huge_memory.c's folio split side
                 "huge_memory_migrate",  # mm/huge_memory.c's PMD migration entries
                 # NUMA balancing: the hinting faults (memory.c, huge_memory.c) ask
                 # sched/fair.c's filter; fair.c's task_numa_work calls change_prot_numa
                 # -> mprotect.c's change_protection -> huge_memory.c, memory.c
                 "memory_numa", "numa_balancing", "mprotect", "mmap",  # mprotect.c <-> vma.c
                 "khugepaged", "khugepaged_collapse", "memory",
                 "memory_anon", "memory_swapin", "memory_wp", "memory_zap",  # mm/memory.c parts
                 "migrate", "page_alloc", "page_io", "rmap", "swap", "swap_state",
                 "swapfile", "vmscan", "vmscan_node",  # vmscan_node: mm/vmscan.c's node side
                 # issue 12: shmem.c, filemap.c, truncate.c, memory.c's file faults and
                 # khugepaged.c's collapse_file call into the fault path and back
                 "filemap", "khugepaged_file", "memory_file", "shmem", "truncate",
                 # issue 14: mempolicy.c's vma_alloc_folio is the fault path's allocator
                 # and its MPOL_MF_MOVE calls migration
                 "mempolicy"}
    cycles = _cycles(_kmm_graph())
    assert sorted(map(sorted, cycles)) == sorted([sorted(mm_circle),
                                                  ["mm_types", "pgtable"]])
