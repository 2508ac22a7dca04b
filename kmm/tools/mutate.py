"""``kmm mutate``: does the race laboratory catch safeguards removed from the source?

For each mutant of kmm.tools.mutate_catalogue: copy the tree (kmm/, daemons/,
workloads/, tests/) into a temporary directory, apply the mutant's edits there (each
``old`` text exactly once inside the named function, found with ``ast``; the file must
still compile), then

1. explore it: for each race program (the mutant's own first, then with ``wide`` every
   other ``workloads/race_*.py``), in ``random``, ``pct`` and ``pct-focus`` mode (pct
   with ``--focus fn:FUNCTION``, the mutated function), ``budget`` schedules each,
   in a child process whose ``import kmm`` is the copy; the first
   violation kills the mutant (a child that runs past ``timeout`` seconds is a hang,
   which kills it too);
2. if it survived, run its test files with pytest in the copy; a failing test kills it.

The kill table gives, per mutant, what killed it (program, mode, schedules needed, the
violation kind; or the test) or ``survived``, and the kill rate. The working tree is
never written. ``jobs`` mutants run at once.

    kmm mutate --list
    kmm mutate anon_write_no_pte_none_recheck --budget 50
    kmm mutate --all --budget 200 --jobs 2
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from kmm.tools.mutate_catalogue import BY_NAME, MUTANTS, Mutant

ROOT = pathlib.Path(__file__).resolve().parents[2]
COPIED = ("kmm", "daemons", "workloads", "tests", "pyproject.toml")
# "pct-focus": pct with its change points aimed at the mutated function (--focus fn:F)
MODES = ("random", "pct", "pct-focus")


class MutateError(Exception):
    """A mutant that does not apply to this tree: one line for the user."""


@dataclass
class Kill:
    mutant: str
    kind: str
    by: str = "survived"     # "explore", "test", "hang", "survived", "error"
    program: str = ""
    mode: str = ""
    schedules: int = 0       # schedules run up to and including the killing one
    violation: str = ""      # the violation kind, or the failing test
    message: str = ""
    explored: int = 0        # schedules run in all
    seconds: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    tested: bool = False

    @property
    def killed(self) -> bool:
        return self.by in ("explore", "test", "hang")

    def describe(self) -> str:
        if self.by == "explore":
            return (f"explore {self.program} {self.mode}, schedule {self.schedules} "
                    f"({self.explored} run in all): {self.violation}")
        if self.by == "hang":
            return f"hang: explore {self.program} {self.mode} ran past its timeout"
        if self.by == "test":
            return f"test {self.violation}"
        if self.by == "error":
            return f"error: {self.message}"
        return (f"survived ({self.explored} schedules"
                + (", tests passed)" if self.tested else ", no tests run)"))


# ------------------------------------------------------------------ applying
def _function_span(tree: ast.Module, name: str) -> tuple[int, int]:
    """(first line, last line), 1-based, of the function ``name`` or ``Class.method``."""
    parts = name.split(".")
    body = tree.body
    node = None
    for i, part in enumerate(parts):
        for n in body:
            want = (ast.ClassDef,) if i < len(parts) - 1 else (ast.FunctionDef,
                                                                 ast.AsyncFunctionDef)
            if isinstance(n, want) and n.name == part:
                node = n
                body = n.body
                break
        else:
            raise MutateError(f"no function {name}")
    start = node.lineno - len(node.decorator_list)
    return start, node.end_lineno


def mutate_source(text: str, mu: Mutant) -> str:
    """The file's text with the mutant's edits applied inside its function."""
    lines = text.splitlines(keepends=True)
    try:
        start, end = _function_span(ast.parse(text), mu.function)
    except MutateError as e:
        raise MutateError(f"{mu.name}: {mu.file}: {e}") from None
    body = "".join(lines[start - 1:end])
    for old, new in mu.edits:
        n = body.count(old)
        if n == 1:
            body = body.replace(old, new)
            continue
        # tolerant of line breaks and of the shared-state door's spelling of a call
        # (m.entry_read(...) or atomic.entry_read(m, ...))
        found = list(re.finditer(_loose(old.strip()), body))
        if len(found) != 1:
            raise MutateError(f"{mu.name}: {mu.file}:{mu.function}: the text to edit "
                              f"occurs {len(found)} times (want 1): {old.strip()[:60]!r}")
        a, b = found[0].span()
        body = body[:a] + new.strip() + body[b:]
    return "".join(lines[:start - 1]) + body + "".join(lines[end:])


_DOOR_CALLS = ("entry_read", "entry_set", "entry_get_and_clear", "entry_cmpxchg",
               "folio_ref_add", "folio_put")


def _loose(text: str) -> str:
    """A regex for ``text`` with any whitespace run matching any other, and
    ``m.CALL(`` matching ``MODULE.CALL(m, `` for the shared-state calls."""
    pat = r"\s+".join(re.escape(w) for w in text.split())
    for call in _DOOR_CALLS:
        pat = pat.replace(re.escape(f"m.{call}("),
                          rf"(?:m\.{call}\(|\w+\.{call}\(m,\s*)")
    return pat


def copy_tree(dst: pathlib.Path, root: pathlib.Path = ROOT) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)


def apply(mu: Mutant, dst: pathlib.Path) -> None:
    """Apply the mutant to the copy at ``dst`` (which must not be the working tree)."""
    if dst.resolve() == ROOT.resolve():
        raise MutateError("refusing to mutate the working tree")
    path = dst / mu.file
    text = mutate_source(path.read_text(), mu)
    try:
        compile(text, str(path), "exec")
    except SyntaxError as e:
        raise MutateError(f"{mu.name}: the mutated {mu.file} does not compile: {e}")
    path.write_text(text)


def check_catalogue(root: pathlib.Path = ROOT) -> list[str]:
    """Every mutant applies to this tree (an edit anchor may have moved): the errors."""
    errs = []
    for mu in MUTANTS:
        try:
            mutated = mutate_source((root / mu.file).read_text(), mu)
            compile(mutated, mu.file, "exec")
        except (MutateError, SyntaxError) as e:
            errs.append(str(e))
    return errs


# ----------------------------------------------------------------- exploring
def _child_env(copy: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _explore_child(copy: pathlib.Path, program: str, mode: str, budget: int,
                   timeout: float, function: str = "") -> dict[str, Any]:
    """Explore one program of the copy in a child process: {first, kind, message,
    schedules} or {hang: True}. Mode ``pct-focus``: pct aimed at ``function``."""
    focus = [f"fn:{function}"] if mode == "pct-focus" else []
    mode = "pct" if mode == "pct-focus" else mode
    code = ("import json, sys, kmm\n"
            "from kmm.tools import explore as ex\n"
            f"assert kmm.__file__.startswith({str(copy)!r}), kmm.__file__\n"
            f"cfg = ex.Config(program={program!r}, mode={mode!r}, seed=1,\n"
            f"                depth=ex.DEFAULT_DEPTH[{mode!r}], focus={focus!r})\n"
            f"s = ex.explore(cfg, {budget})\n"
            "v = s.first_violation or {}\n"
            "print(json.dumps({'first': s.first, 'kind': v.get('kind'),\n"
            "                  'message': v.get('message', '')[:400],\n"
            "                  'schedules': s.schedules}))\n")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_child_env(copy),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"hang": True, "seconds": time.perf_counter() - t0}
    if r.returncode != 0 or not r.stdout.strip():
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"first": 0, "kind": "kernel-bug", "message": f"explore died: {tail}",
                "schedules": 1, "seconds": time.perf_counter() - t0}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - t0
    return out


def _run_tests(copy: pathlib.Path, tests: tuple[str, ...], timeout: float) -> str | None:
    """The first failing test of ``tests`` in the copy, or None if all pass."""
    files = [t for t in tests if (copy / t.split("::")[0]).exists()]
    if not files:
        return None
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                            "no:cacheprovider", *files], cwd=copy, env=_child_env(copy),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{' '.join(files)} (timed out)"
    if r.returncode == 0:
        return None
    for ln in r.stdout.splitlines():
        if ln.startswith("FAILED ") or ln.startswith("ERROR "):
            return ln.split(" ", 1)[1].split(" - ")[0]
    return f"{' '.join(files)} (pytest exit {r.returncode})"


def race_programs(root: pathlib.Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "workloads").glob("race_*.py"))


def run_mutant(mu: Mutant, budget: int, *, wide: bool = False, tests: bool = True,
               modes: tuple[str, ...] = MODES, timeout: float = 300.0,
               test_timeout: float = 600.0) -> Kill:
    """Explore (then test) one mutant in a fresh copy of the tree; its Kill."""
    kill = Kill(mu.name, mu.kind)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"kmm-mutant-{mu.name}-") as tmp:
        copy = pathlib.Path(tmp)
        try:
            copy_tree(copy)
            apply(mu, copy)
        except MutateError as e:
            kill.by, kill.message = "error", str(e)
            return kill
        programs = list(mu.programs)
        if wide:
            programs += [p for p in race_programs(copy) if p not in programs]
        for prog in programs:
            path = str(copy / "workloads" / prog)
            if not os.path.exists(path):
                continue
            for mode in modes:
                res = _explore_child(copy, path, mode, budget, timeout,
                                     mu.function.split(".")[-1])
                kill.runs.append({"program": prog, "mode": mode, **res})
                if res.get("hang"):
                    kill.by, kill.program, kill.mode = "hang", prog, mode
                    kill.explored += budget
                    kill.seconds = time.perf_counter() - t0
                    return kill
                kill.explored += res["schedules"]
                if res["first"] is not None:
                    kill.by, kill.program, kill.mode = "explore", prog, mode
                    kill.schedules = res["first"] + 1
                    kill.violation, kill.message = res["kind"], res["message"]
                    kill.seconds = time.perf_counter() - t0
                    return kill
        if tests:
            failed = _run_tests(copy, mu.tests, test_timeout)
            kill.tested = True
            if failed:
                kill.by, kill.violation = "test", failed
    kill.seconds = time.perf_counter() - t0
    return kill


def run_all(mutants: list[Mutant], budget: int, *, jobs: int = 1, progress=None,
            **kw: Any) -> list[Kill]:
    """Every mutant, ``jobs`` at a time; the Kills in catalogue order."""
    if jobs <= 1:
        out = []
        for mu in mutants:
            out.append(run_mutant(mu, budget, **kw))
            if progress:
                progress(out[-1])
        return out
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(run_mutant, mu, budget, **kw): mu.name for mu in mutants}
        done: dict[str, Kill] = {}
        for fut in cf.as_completed(futs):
            k = fut.result()
            done[k.mutant] = k
            if progress:
                progress(k)
    return [done[mu.name] for mu in mutants]


def format_table(kills: list[Kill]) -> str:
    """The kill table and the kill rate."""
    w = max([len(k.mutant) for k in kills] + [6])
    lines = [f"{'mutant':<{w}}  {'kind':<10}  {'time':>6}  killed by"]
    for k in kills:
        lines.append(f"{k.mutant:<{w}}  {k.kind:<10}  {k.seconds:>5.0f}s  {k.describe()}")
    n = len(kills)
    killed = sum(k.killed for k in kills)
    errors = sum(k.by == "error" for k in kills)
    by_explore = sum(k.by in ("explore", "hang") for k in kills)
    lines.append(f"killed {killed}/{n - errors} ({100 * killed / max(n - errors, 1):.0f}%): "
                 f"{by_explore} by exploration, {killed - by_explore} by the tests"
                 + (f"; {errors} did not apply" if errors else ""))
    return "\n".join(lines)


def cli(args) -> int:
    """kmm mutate (argument handling in kmm.tools.cli)."""
    if args.list:
        for mu in MUTANTS:
            print(f"{mu.name:<38} {mu.kind:<10} {mu.file}:{mu.function}")
            print(f"    {mu.why}")
        errs = check_catalogue()
        for e in errs:
            print(f"does not apply: {e}", file=sys.stderr)
        return 1 if errs else 0
    if args.all:
        chosen = list(MUTANTS)
    else:
        if not args.names:
            print("kmm mutate: name mutants, or --all, or --list", file=sys.stderr)
            return 2
        unknown = [n for n in args.names if n not in BY_NAME]
        if unknown:
            print(f"kmm mutate: unknown mutant {unknown[0]!r} (kmm mutate --list)",
                  file=sys.stderr)
            return 2
        chosen = [BY_NAME[n] for n in args.names]
    if args.budget < 1 or args.jobs < 1:
        print("kmm mutate: --budget and --jobs must be at least 1", file=sys.stderr)
        return 2

    def progress(k: Kill) -> None:
        if not args.quiet:
            print(f"  {k.mutant}: {k.describe()} ({k.seconds:.0f}s)", file=sys.stderr)

    kills = run_all(chosen, args.budget, jobs=args.jobs, progress=progress,
                    wide=args.wide, tests=not args.no_tests,
                    modes=tuple(args.mode or MODES), timeout=args.timeout)
    print(format_table(kills))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k2: v for k2, v in vars(k).items()} for k in kills], f, indent=1)
    return 0 if all(k.killed for k in kills) else 1
