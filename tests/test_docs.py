"""The documentation is the repository's own: complete for the program API, and never
pointing outside the repository (a clone has no project notes, no shared design files,
no issue tracker notes)."""

from __future__ import annotations

import argparse
import pathlib
import re

from kmm import workload
from kmm.tools import apidoc, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What a clone does not have: the project's shared notes and its issue threads.
OUTSIDE = re.compile(
    r"\.\./shared|/work/shared|\bdesign\.md\b|\bstyle\.md\b|\bkernel-thp(?:-reference)?\.md\b"
    r"|\bpattern \d+(?:\.\d+)+|\b[Ii]ssue[- ]#?\d+|\bissues? notes?\b|\bthe brief\b")


def shipped_files() -> list[pathlib.Path]:
    """README, docs/, and everything a user installs or runs: kmm/, daemons/,
    workloads/ (programs, scenarios, their READMEs), pyproject.toml."""
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    for top in ("kmm", "daemons", "workloads"):
        files += sorted(p for p in (ROOT / top).rglob("*")
                        if p.suffix in (".py", ".md", ".toml", ".txt") and p.is_file())
    return files


def help_texts() -> dict[str, str]:
    """`kmm --help` and every `kmm CMD --help`."""
    p = cli.build_parser()
    out = {"kmm": p.format_help()}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"kmm {name}"] = sub.format_help()
    return out


def test_nothing_points_outside_the_repository():
    bad = []
    for f in shipped_files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    for name, text in help_texts().items():
        for line in text.splitlines():
            if OUTSIDE.search(line):
                bad.append(f"{name} --help: {line.strip()}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_the_scan_catches_what_it_must():
    for text in ("see ../shared/design.md", "design.md section 6", "pattern 7.3.1",
                 "in the issue-3 notes", "issue 17", "kernel-thp-reference.md 2.4"):
        assert OUTSIDE.search(text), text
    for text in ("docs/scenario-format.md", "issue a TLB flush", "mm/huge_memory.c"):
        assert not OUTSIDE.search(text), text


def test_program_api_page_is_generated_from_the_code():
    page = (ROOT / "docs" / "program-api.md").read_text()
    assert page == apidoc.render(), (
        "docs/program-api.md is stale: python -m kmm.tools.apidoc > docs/program-api.md")


def test_every_public_call_is_documented():
    page = (ROOT / "docs" / "program-api.md").read_text()
    for var, cls in (("k", workload.Kernel), ("p", workload.Proc)):
        for name, obj in apidoc.calls(cls):
            assert re.search(rf"^### `(await )?{var}\.{name}\b", page, re.M), f"{var}.{name}"
            fn = obj.fget if isinstance(obj, property) else obj
            assert fn.__doc__, f"{cls.__name__}.{name} has no docstring"
    for name in ("KmmError", "OomKilled", "errno_name"):
        assert name in page


def test_readme_links_the_docs_and_documents_exit_codes():
    readme = (ROOT / "README.md").read_text()
    for doc in ("scenario-format.md", "report-format.md", "budgets.md", "program-api.md",
                "daemon-api.md", "wire.md"):
        assert f"docs/{doc}" in readme, doc
        assert (ROOT / "docs" / doc).is_file()
    rows = re.findall(r"^\| (\d+) \|", readme, re.M)
    assert sorted(map(int, rows)) == sorted(cli.EXIT_CODES)
