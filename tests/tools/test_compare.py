"""kmm compare: the THP vs hugetlb table's structure, and the figures the host pins
(recordings workloads/fault_madvised and workloads/hugetlb_pool_fault)."""

from __future__ import annotations

import json
import pathlib

from kmm.tools import compare

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"
MiB = 1 << 20


def recorded(name: str) -> dict:
    return json.loads((WORKLOADS / f"{name}.oracle.json").read_text())["report"]


def test_table_has_a_column_per_configuration_and_a_row_per_figure(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('description = "2 MiB written"\n[[steps]]\nop = "mmap"\nregion = "a"\n'
                    'size = "2MiB"\n[[steps]]\nop = "touch"\nregion = "a"\n')
    res = compare.compare(str(path), memory=64 * MiB, fragmented=False)
    assert list(res["configs"]) == ["thp_never", "thp_madvise", "thp_always", "hugetlb"]
    assert res["skipped"] == {"mthp": "no mTHP (per-size knobs) in this tree"}
    text = compare.format_table(res).splitlines()
    assert text[3].split() == list(res["configs"])
    assert [line[:31].strip() for line in text[4:4 + len(compare.ROWS)]] == \
        [label.strip() for label, _ in compare.ROWS]
    # failure modes of a short pool: the reservation fails at mmap, NORESERVE at a fault
    assert res["hugetlb_pool_short"] == {"reserved": "mmap: ENOMEM",
                                         "noreserve": "touch: SIGBUS"}
    hug, never = res["configs"]["hugetlb"], res["configs"]["thp_never"]
    assert (hug["page_faults"], never["page_faults"]) == (1, 512)
    # under pressure anonymous memory is swapped, hugetlb memory stays
    assert hug["pressure"]["hugetlb_kb_after"] == 2048
    assert never["pressure"]["rss_kb_after"] == 0


def test_hugetlb_and_thp_madvise_columns_agree_with_the_host():
    # fault_madvised (host): 16 MiB written under MADV_HUGEPAGE is 16384 kB of Rss, all
    # AnonHugePages; hugetlb_pool_fault (host): 4 MiB written through MAP_HUGETLB is
    # Private_Hugetlb 4096 kB and no Rss
    _, steps, _ = compare.load_pattern(str(WORKLOADS / "fault_madvised.toml"))
    thp = compare.run_config(steps, "thp_madvise", memory=256 * MiB, pressure=False)
    host = recorded("fault_madvised")["regions"]["main/a"]
    assert (thp["rss_kb"], thp["anon_huge_kb"]) == (host["rss_kb"], host["anon_huge_kb"])
    _, steps, _ = compare.load_pattern(str(WORKLOADS / "hugetlb_pool_fault.toml"))
    hug = compare.run_config(steps, "hugetlb", memory=128 * MiB, pressure=False)
    host = recorded("hugetlb_pool_fault")["regions"]["main/a"]
    assert (hug["rss_kb"], hug["hugetlb_kb"]) == (host["rss_kb"], host["private_hugetlb_kb"])


def test_on_a_fragmented_machine_thp_falls_back_and_hugetlb_has_no_pool(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('description = "2 MiB written"\n[[steps]]\nop = "mmap"\nregion = "a"\n'
                    'size = "2MiB"\n[[steps]]\nop = "touch"\nregion = "a"\n')
    _, steps, _ = compare.load_pattern(str(path))
    got = compare._fragmented(steps, ["thp_madvise", "hugetlb"])
    assert got == {
        "thp_madvise": "ran; 0 THPs, 1 fallbacks to 4 KiB, hugetlb pool 0 pages",
        "hugetlb": "mmap: ENOMEM; 0 THPs, 0 fallbacks to 4 KiB, hugetlb pool 0 pages"}
