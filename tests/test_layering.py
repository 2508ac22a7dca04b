"""Import rules (design.md section 2), checked on the source with ast."""

from __future__ import annotations

import ast
import pathlib
import re

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
            if name == "__split_huge_pmd_locked":  # named split_pmd_locked, as the row says
                continue
            assert name.lstrip("_") in defined, f"README names {module.group(1)}.{name}"
