"""The ``kmm run`` command as a user meets it (``python -m kmm``): bad input is exit code
2 and one stderr line naming the file, the step and the key; ``--json`` is the report
of design.md section 5; ``--seed`` and ``--trace`` give byte-identical JSON-lines traces.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKLOADS = ROOT / "workloads"


def kmm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kmm", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=120)


MMAP = '[[steps]]\nop = "mmap"\nregion = "a"\nsize = "4MiB"\n'

# (case, file text or None for a missing file, step, key, words in the message)
BAD = [
    ("malformed_toml", 'description = "x"\n[[steps]\nop = "mmap"\n', None, None,
     ["line 2"]),
    ("unknown_op", MMAP + '[[steps]]\nop = "mremap"\nregion = "a"\n', 2, "op",
     ["unknown op", "mremap"]),
    ("unknown_key", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nadvice = "hugepage"\n',
     2, "advice", ["unknown key for touch"]),
    ("bad_size", MMAP + '[[steps]]\nop = "munmap"\nregion = "a"\nlength = "1MB"\n', 2,
     "length", ['"1MB"']),
    ("bad_knob_value", '[khugepaged]\nmax_ptes_none = 512\n' + MMAP, None, "max_ptes_none",
     ["[khugepaged] max_ptes_none", "0..511"]),
    ("unknown_region", MMAP + '[[steps]]\nop = "touch"\nregion = "b"\n', 2, "region",
     ["unknown region 'b'"]),
    ("unknown_process", MMAP + '[[steps]]\nop = "touch"\nproc = "c1"\nregion = "a"\n', 2,
     "proc", ["process 'c1' does not exist"]),
    ("missing_file", None, None, None, ["cannot read"]),
]


@pytest.mark.parametrize("case, text, step, key, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case, text, step, key, words):
    path = tmp_path / f"{case}.toml"
    if text is not None:
        path.write_text(text)
    r = kmm("run", path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    line = r.stderr.rstrip("\n")
    assert line.startswith(f"kmm: {path}: ")
    if step is not None:
        assert f": step {step}: {key}: " in line
    elif key is not None:
        assert f" {key}: " in line
    for w in words:
        assert w in line
    assert "Traceback" not in r.stderr


def test_json_report(tmp_path):
    """--json prints the report: vmstat (every thp_* line), regions and steps, the
    recorded host's figures for this scenario (kernel-thp.md section 12: 16 MiB
    madvised, written: thp_fault_alloc 8, AnonHugePages 16384 kB)."""
    r = kmm("run", WORKLOADS / "fault_madvised.toml", "--json")
    assert r.returncode == 0 and r.stderr == ""
    rep = json.loads(r.stdout)
    assert {"vmstat", "regions", "steps"} <= set(rep)
    assert list(rep)[:3] == ["vmstat", "regions", "steps"]
    assert rep["vmstat"]["thp_fault_alloc"] == 8
    assert all(k.startswith("thp_") for k in rep["vmstat"])
    assert rep["regions"] == {"main/a": {"rss_kb": 16384, "anon_huge_kb": 16384}}
    assert rep["steps"] == [{"op": "mmap", "ok": True}, {"op": "madvise", "ok": True},
                            {"op": "touch", "ok": True},
                            {"op": "check", "ok": True, "mismatches": 0}]


def test_json_report_of_a_sigsegv(tmp_path):
    path = tmp_path / "segv.toml"
    path.write_text(MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nlength = "5MiB"\n'
                    '[[steps]]\nop = "check"\nregion = "a"\n')
    r = kmm("run", path, "--json")
    assert r.returncode == 0
    rep = json.loads(r.stdout)
    assert rep["steps"][1:] == [{"op": "touch", "ok": False, "signal": "SIGSEGV"},
                                {"op": "check", "ok": False, "error": "no such process"}]
    assert rep["regions"] == {}


@pytest.mark.parametrize("target, extra", [
    (WORKLOADS / "fork_child_writes.toml", []),
    (WORKLOADS / "two_cpu_fault.py", ["--mode", "random", "--cpus", "2"]),
], ids=["scenario", "program-random"])
def test_trace_files_are_byte_identical_for_the_same_seed(tmp_path, target, extra):
    """--seed 5 --trace FILE twice: the same bytes; one JSON object per line with the
    keys seq, t, actor and event (and nothing from the host)."""
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.jsonl"
        r = kmm("run", target, "--seed", "5", "--trace", out, *extra)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0]
    lines = outs[0].decode().splitlines()
    for line in lines:
        e = json.loads(line)
        assert {"seq", "t", "actor", "event"} <= set(e)
        assert list(e) == sorted(e)
    if extra:  # another seed: another interleaving, another trace
        other = tmp_path / "other.jsonl"
        assert kmm("run", target, "--seed", "6", "--trace", other, *extra).returncode == 0
        assert other.read_bytes() != outs[0]
