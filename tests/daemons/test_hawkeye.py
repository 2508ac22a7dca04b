"""The research daemon (daemons/hawkeye.py) against stock khugepaged on its workload
(workloads/promote_hot.py): fewer TLB misses and less RSS, hot blocks promoted, sparse
ones not."""

from __future__ import annotations

import pytest

from kmm import daemon
from kmm.daemons.hawkeye import HawkEye
from kmm.tools.runner import run_program

# The workload, smaller (12 blocks, 3 epochs) to keep the test fast: khugepaged still
# needs a second pass to reach the hot blocks, which still overflow the 4 KiB TLB.
SMALL = '''
from kmm.workloads import promote_hot as w
w.BLOCKS, w.EPOCHS = 12, 3
MACHINE = w.MACHINE
main = w.main
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("promote") / "promote_small.py"
    path.write_text(SMALL)
    stock = run_program(str(path))
    research = run_program(str(path), daemons=[HawkEye])
    return stock, research


def test_hawkeye_promotes_the_hot_blocks_first_and_never_the_sparse_ones(results):
    stock, research = results
    s, r = stock["result"], research["result"]
    assert (s["policy"], r["policy"]) == ("khugepaged", "hawkeye")
    assert s["hot_thps"] == r["hot_thps"] == 4          # both ran and promoted the hot
    assert s["sparse_thps"] == 8 and r["sparse_thps"] == 0
    assert r["tlb_misses"] < s["tlb_misses"]
    assert r["rss_kb"] < s["rss_kb"] and r["anon_huge_kb"] < s["anon_huge_kb"]
    # khugepaged collapsed in its own scan; hawkeye through the MADV_COLLAPSE flavour
    assert stock["khugepaged"]["scan_results"]["khugepaged"]["SCAN_SUCCEED"] == 12
    assert research["khugepaged"]["scan_results"] == {"madvise": {"SCAN_SUCCEED": 4}}


def test_hawkeye_is_an_installed_daemon_with_its_knobs():
    rows = {row["name"]: row for row in daemon.describe_daemons()}
    assert rows["hawkeye"]["knobs"] == {"util_threshold_pct": 90, "decay_shift": 1,
                                        "min_young": 1}
    assert daemon.load_daemons(["hawkeye"]) == [HawkEye]
