"""Scenario loading: the corpus loads, region addresses follow the contract, and every
class of bad input is a one-line ScenarioError naming the file, the step and the key."""

from __future__ import annotations

import json
import pathlib

import pytest

from kmm import vmstat
from kmm.tools.scenario import (
    REGION_BASE,
    MachineConfig,
    ScenarioError,
    load_scenario,
    parse_size,
)

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
CORPUS = sorted(WORKLOADS.glob("*.toml"))
MiB = 1 << 20


def write(tmp_path: pathlib.Path, text: str, name: str = "bad.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_corpus_is_there():
    assert len(CORPUS) >= 22


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_file_loads(path):
    sc = load_scenario(path)
    assert sc.path == str(path)
    assert sc.description and "\n" not in sc.description
    assert [s.index for s in sc.steps] == list(range(1, len(sc.steps) + 1))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_file_has_a_recording(path):
    rec = json.loads(path.with_name(path.stem + ".oracle.json").read_text())
    assert set(rec) == {"kernel", "report"}
    report = rec["report"]
    sc = load_scenario(path)
    swap = sc.machine.swap > 0
    # A run with swap extends the report with events and each region with swap_kb.
    # issue 12: "meminfo" (shmem/file THP lines that moved) and a region's
    # shmem_pmd_mapped_kb appear only when nonzero; issue 13 adds HugePages_* lines to
    # "meminfo", "hugetlb_events" and a region's private_/shared_hugetlb_kb, the same way;
    # issue 11: "mthp" (hugepages-*/stats files that moved) and a region's mthp_kb
    extra = [k for k in ("meminfo", "hugetlb_events", "mthp") if k in report]
    assert sorted(report) == sorted(["vmstat", "regions", "steps"]
                                    + (["events"] if swap else []) + extra)
    assert list(report)[:3] == ["vmstat", "regions", "steps"]
    assert list(report["vmstat"]) == list(vmstat.THP_EVENTS)
    assert len(report["steps"]) == len(sc.steps)
    fields = ["rss_kb", "anon_huge_kb"] + (["swap_kb"] if swap else [])
    opt = ("shmem_pmd_mapped_kb", "private_hugetlb_kb", "shared_hugetlb_kb", "mthp_kb")
    assert all([f for f in r if f not in opt] == fields for r in report["regions"].values())
    assert all(v for r in report["regions"].values() for f, v in r.items() if f in opt)
    assert all(report.get("meminfo", {}).values())
    assert all(report.get("hugetlb_events", {}).values())
    assert all(stats and all(stats.values()) for stats in report.get("mthp", {}).values())
    if swap:
        assert list(report["events"]) == ["pswpin", "pswpout"]


MINIMAL = """
description = "minimal"
[machine]
memory = "2GiB"
swap = "0"
cpus = 4
seed = 7
[thp]
enabled = "always"
defrag = "defer+madvise"
use_zero_page = 0
shrink_underused = true
[khugepaged]
max_ptes_none = 0
scan_sleep_millisecs = "100"
[[steps]]
op = "mmap"
region = "a"
size = "3MiB"
[[steps]]
op = "mmap"
region = "b"
size = 4096
[[steps]]
op = "fork"
child = "c1"
[[steps]]
op = "mmap"
proc = "c1"
region = "c"
size = "2MiB"
[[steps]]
op = "touch"
proc = "c1"
region = "a"
offset = "1KiB"
write = false
stride = "1MiB"
value = 0
[[steps]]
op = "madvise"
region = "b"
advice = "dontneed"
length = 17
[[steps]]
op = "exit"
proc = "c1"
[[steps]]
op = "khugepaged"
"""


def test_minimal_file_fields(tmp_path):
    sc = load_scenario(write(tmp_path, MINIMAL, "ok.toml"))
    assert sc.description == "minimal"
    assert sc.machine == MachineConfig(memory=2 << 30, swap=0, cpus=4, seed=7)
    assert sc.knobs == {
        "enabled": "always",
        "defrag": "defer+madvise",
        "use_zero_page": 0,
        "shrink_underused": 1,
        "khugepaged/max_ptes_none": 0,
        "khugepaged/scan_sleep_millisecs": 100,
    }
    ops = [s.op for s in sc.steps]
    assert ops == ["mmap", "mmap", "fork", "mmap", "touch", "madvise", "exit", "khugepaged"]
    a, b, fork, c, touch, madv, ex, kh = sc.steps
    # The cursor: addr, then += round_up(size, 2 MiB) + 2 MiB.
    assert a.addr == REGION_BASE
    assert b.addr == REGION_BASE + 4 * MiB + 2 * MiB
    assert c.addr == b.addr + 2 * MiB + 2 * MiB
    assert c.proc == "c1" and fork.child == "c1" and fork.proc == "main"
    assert (touch.offset, touch.length, touch.write, touch.stride, touch.value) == (1024, None, False, MiB, 0)
    assert madv.length == 17 and madv.advice == "dontneed"
    assert kh.full_scans == 1
    assert sc.regions() == {"a": 3 * MiB, "b": 4096, "c": 2 * MiB}


def test_defaults(tmp_path):
    sc = load_scenario(write(tmp_path, '[[steps]]\nop = "mmap"\nregion = "a"\nsize = 1\n', "d.toml"))
    assert sc.machine == MachineConfig()
    assert sc.knobs == {} and sc.description == ""
    s = sc.steps[0]
    assert (s.proc, s.offset, s.length, s.write, s.value, s.stride) == ("main", 0, None, True, 1, 4096)


SPLIT_RECLAIM = """
description = "issue 3 ops"
[machine]
swap = "64MiB"
[[steps]]
op = "mmap"
region = "a"
size = "4MiB"
[[steps]]
op = "split"
region = "a"
offset = "1MiB"
length = "4KiB"
[[steps]]
op = "fork"
child = "c1"
[[steps]]
op = "split"
proc = "c1"
region = "a"
[[steps]]
op = "reclaim"
[[steps]]
op = "reclaim"
proc = "c1"
"""


def test_split_and_reclaim_steps(tmp_path):
    sc = load_scenario(write(tmp_path, SPLIT_RECLAIM, "ok.toml"))
    assert sc.machine.swap == 64 * MiB
    _, split, _, split_child, reclaim, reclaim_child = sc.steps
    assert (split.op, split.proc, split.region, split.offset, split.length) == ("split", "main", "a", MiB, 4096)
    assert (split_child.proc, split_child.region, split_child.offset, split_child.length) == ("c1", "a", 0, None)
    assert (reclaim.op, reclaim.proc, reclaim.region) == ("reclaim", "main", None)
    assert reclaim_child.proc == "c1"


@pytest.mark.parametrize(
    "text, n",
    [(0, 0), (4096, 4096), ("0", 0), ("4KiB", 4096), ("2MiB", 2 * MiB), ("1GiB", 1 << 30),
     ("1TiB", 1 << 40), ("12", 12)],
)
def test_parse_size_good(text, n):
    assert parse_size(text, file="f.toml", step=3, key="size") == n


@pytest.mark.parametrize("text", [1.5, "4MB", -1, True, False, "4 KiB", "-4KiB", "4kib", "", "0x10", None, [1], "1048576TiB"])
def test_parse_size_bad(text):
    with pytest.raises(ScenarioError) as ei:
        parse_size(text, file="f.toml", step=3, key="size")
    assert str(ei.value).startswith("f.toml: step 3: size: ")
    assert ei.value.step == 3 and ei.value.key == "size" and ei.value.file == "f.toml"


MMAP = '[[steps]]\nop = "mmap"\nregion = "a"\nsize = "4MiB"\n'

# (case, file text, step number or None, key, a word the message must contain)
BAD = [
    ("malformed_toml", 'description = "x"\n[[steps]\nop = "mmap"\n', None, None, "line 2"),
    ("unterminated_string", 'description = "x\n', None, None, "line 1"),
    ("unknown_top_level_table", '[machnie]\ncpus = 2\n', None, "machnie", "unknown top-level"),
    ("unknown_top_level_key", 'descrption = "x"\n', None, "descrption", "unknown top-level"),
    ("steps_not_array", 'steps = 3\n', None, "steps", "array of tables"),
    ("unknown_op", MMAP + '[[steps]]\nop = "mremap"\nregion = "a"\n', 2, "op", "unknown op"),
    ("missing_op", MMAP + '[[steps]]\nregion = "a"\n', 2, "op", "required"),
    ("unknown_key_in_step", MMAP + '[[steps]]\nop = "madvise"\nregion = "a"\nadvice = "hugepage"\nstride = 4096\n',
     2, "stride", "unknown key for madvise"),
    ("key_of_other_op", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nprot = "r"\n', 2, "prot", "unknown key"),
    ("missing_required_key", MMAP + '[[steps]]\nop = "mprotect"\nregion = "a"\n', 2, "prot", "required"),
    ("bad_advice", MMAP + '[[steps]]\nop = "madvise"\nregion = "a"\nadvice = "huge"\n', 2, "advice", "one of"),
    ("bad_prot", MMAP + '[[steps]]\nop = "mprotect"\nregion = "a"\nprot = "rwx"\n', 2, "prot", "one of"),
    ("bad_size_unit", '[[steps]]\nop = "mmap"\nregion = "a"\nsize = "4MB"\n', 1, "size", "size"),
    ("float_size", '[[steps]]\nop = "mmap"\nregion = "a"\nsize = 4.0\n', 1, "size", "size"),
    ("negative_offset", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\noffset = -4096\n', 2, "offset", "negative"),
    ("bool_length", MMAP + '[[steps]]\nop = "munmap"\nregion = "a"\nlength = true\n', 2, "length", "size"),
    ("zero_stride", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nstride = 0\n', 2, "stride", "above 0"),
    ("value_too_big", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nvalue = 256\n', 2, "value", "0..255"),
    ("value_bool", MMAP + '[[steps]]\nop = "check"\nregion = "a"\nvalue = true\n', 2, "value", "integer"),
    ("write_not_bool", MMAP + '[[steps]]\nop = "touch"\nregion = "a"\nwrite = 1\n', 2, "write", "true or false"),
    ("full_scans_zero", '[[steps]]\nop = "khugepaged"\nfull_scans = 0\n', 1, "full_scans", ">= 1"),
    ("bad_knob_value", '[khugepaged]\nmax_ptes_none = 512\n', None, "max_ptes_none", "0..511"),
    ("bad_enabled", '[thp]\nenabled = "sometimes"\n', None, "enabled", "always, madvise, never"),
    ("zero_pages_to_scan", '[khugepaged]\npages_to_scan = 0\n', None, "pages_to_scan", "1.."),
    ("unknown_knob", '[thp]\nmax_ptes_none = 5\n', None, "max_ptes_none", "unknown knob"),
    ("khugepaged_knob_path", '[khugepaged]\n"khugepaged/defrag" = 1\n', None, "khugepaged/defrag", "unknown knob"),
    ("thp_not_table", 'thp = 1\n', None, "thp", "table"),
    ("machine_cpus_zero", '[machine]\ncpus = 0\n', None, "cpus", ">= 1"),
    ("machine_memory_unit", '[machine]\nmemory = "1GB"\n', None, "memory", "size"),
    ("machine_unknown_key", '[machine]\nnuma = 2\n', None, "numa", "unknown key"),
    ("unknown_region", MMAP + '[[steps]]\nop = "touch"\nregion = "b"\n', 2, "region", "unknown region"),
    ("region_before_mmap", '[[steps]]\nop = "touch"\nregion = "a"\n' + MMAP, 1, "region", "unknown region"),
    ("unknown_proc", MMAP + '[[steps]]\nop = "touch"\nproc = "c1"\nregion = "a"\n', 2, "proc", "does not exist"),
    ("exited_proc", MMAP + '[[steps]]\nop = "fork"\nchild = "c1"\n[[steps]]\nop = "exit"\nproc = "c1"\n'
     '[[steps]]\nop = "touch"\nproc = "c1"\nregion = "a"\n', 4, "proc", "exited"),
    ("region_reused", MMAP + MMAP, 2, "region", "already mapped"),
    ("inherited_region_reused", MMAP + '[[steps]]\nop = "fork"\nchild = "c1"\n'
     '[[steps]]\nop = "mmap"\nproc = "c1"\nregion = "a"\nsize = 4096\n', 3, "region", "already mapped"),
    ("child_region_unknown_to_parent", '[[steps]]\nop = "fork"\nchild = "c1"\n'
     '[[steps]]\nop = "mmap"\nproc = "c1"\nregion = "b"\nsize = 4096\n'
     '[[steps]]\nop = "touch"\nregion = "b"\n', 3, "region", "unknown region"),
    ("fork_name_taken", '[[steps]]\nop = "fork"\nchild = "main"\n', 1, "child", "already used"),
    ("fork_name_reused_after_exit", '[[steps]]\nop = "fork"\nchild = "c1"\n[[steps]]\nop = "exit"\nproc = "c1"\n'
     '[[steps]]\nop = "fork"\nchild = "c1"\n', 3, "child", "already used"),
    ("bad_region_name", '[[steps]]\nop = "mmap"\nregion = "a/b"\nsize = 1\n', 1, "region", "name"),
    ("step_not_table", 'steps = [1]\n', 1, None, "table"),
    # issue 3: split (region, offset, length) and reclaim (no keys of its own)
    ("split_without_region", MMAP + '[[steps]]\nop = "split"\n', 2, "region", "required for split"),
    ("split_unknown_region", MMAP + '[[steps]]\nop = "split"\nregion = "b"\n', 2, "region", "unknown region"),
    ("split_before_mmap", '[[steps]]\nop = "split"\nregion = "a"\n', 1, "region", "unknown region"),
    ("split_bad_length", MMAP + '[[steps]]\nop = "split"\nregion = "a"\nlength = "2MB"\n', 2, "length", "size"),
    ("split_negative_offset", MMAP + '[[steps]]\nop = "split"\nregion = "a"\noffset = -1\n', 2, "offset", "negative"),
    ("split_stride", MMAP + '[[steps]]\nop = "split"\nregion = "a"\nstride = 4096\n', 2, "stride",
     "unknown key for split (allowed: op, proc, region, offset, length)"),
    ("split_by_exited_proc", MMAP + '[[steps]]\nop = "fork"\nchild = "c1"\n[[steps]]\nop = "exit"\nproc = "c1"\n'
     '[[steps]]\nop = "split"\nproc = "c1"\nregion = "a"\n', 4, "proc", "exited"),
    ("reclaim_region", MMAP + '[[steps]]\nop = "reclaim"\nregion = "a"\n', 2, "region",
     "unknown key for reclaim (allowed: op, proc)"),
    ("reclaim_amount", '[[steps]]\nop = "reclaim"\namount = "1MiB"\n', 1, "amount", "unknown key for reclaim"),
    ("reclaim_unknown_proc", '[[steps]]\nop = "reclaim"\nproc = "c9"\n', 1, "proc", "does not exist"),
    ("unknown_op_lists_new_ops", '[[steps]]\nop = "shrink"\n', 1, "op", "split, reclaim"),
    ("machine_swap_unit", '[machine]\nswap = "64MB"\n', None, "swap", "size"),
    ("machine_swap_negative", '[machine]\nswap = -1\n', None, "swap", "negative"),
]


@pytest.mark.parametrize("case, text, step, key, word", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, case, text, step, key, word):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    e = ei.value
    msg = str(e)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert e.file == str(path)
    assert e.step == step
    assert e.key == key
    if step is not None:
        assert msg.startswith(f"{path}: step {step}: {key}: " if key else f"{path}: step {step}: ")
    elif key is not None:
        assert f" {key}: " in msg
    assert word in msg


def test_table_key_is_shown_with_its_table(tmp_path):
    path = write(tmp_path, '[thp]\nenabled = "sometimes"\n', "x.toml")
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    assert str(ei.value) == (
        f"{path}: [thp] enabled: must be one of always, madvise, never"
    )


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, 'description = "x"\n\nfoo = \n', "x.toml")
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    assert str(ei.value).startswith(f"{path}: line 3: ")
    assert ei.value.step is None and ei.value.key is None


def test_missing_file(tmp_path):
    with pytest.raises(ScenarioError) as ei:
        load_scenario(tmp_path / "nope.toml")
    assert "nope.toml" in str(ei.value) and "\n" not in str(ei.value)


SHMEM = """
[thp]
shmem_enabled = "within_size"
[[steps]]
op = "mmap"
region = "m"
size = "4MiB"
backing = "memfd"
[[steps]]
op = "fork"
child = "c"
[[steps]]
op = "punch_hole"
proc = "c"
region = "m"
offset = "1MiB"
length = "4KiB"
[[steps]]
op = "ftruncate"
region = "m"
size = "3MiB"
"""


def test_shmem_backing_punch_hole_and_ftruncate(tmp_path):
    sc = load_scenario(write(tmp_path, SHMEM, "ok.toml"))
    assert sc.knobs["shmem_enabled"] == "within_size"
    mmap, _, punch, trunc = sc.steps
    assert mmap.backing == "memfd"
    assert (punch.proc, punch.offset, punch.length) == ("c", 1 << 20, 4096)
    assert trunc.size == 3 << 20


@pytest.mark.parametrize("text, key, word", [
    ('[[steps]]\nop = "mmap"\nregion = "a"\nsize = 1\nbacking = "tmpfs"\n', "backing",
     "must be one of"),
    ('[[steps]]\nop = "mmap"\nregion = "a"\nsize = 1\n[[steps]]\nop = "punch_hole"\n'
     'region = "a"\n', "region", "memfd region"),
    ('[[steps]]\nop = "mmap"\nregion = "a"\nsize = 1\nbacking = "shmem"\n[[steps]]\n'
     'op = "ftruncate"\nregion = "a"\nsize = 0\n', "region", "memfd region"),
    ('[thp]\nshmem_enabled = "sometimes"\n', "shmem_enabled", "must be one of"),
])
def test_shmem_bad_input(tmp_path, text, key, word):
    with pytest.raises(ScenarioError) as e:
        load_scenario(write(tmp_path, text))
    assert e.value.key == key and word in str(e.value)
