"""pct with a focus needs the number of focus points of a measuring run; a measuring
run in which another actor ran to the end first never reaches the focus, which left
pct without any change point (every schedule the same strict-priority order)."""

from __future__ import annotations

import pathlib

from kmm.tools import explore as ex

WORKLOADS = pathlib.Path(__file__).resolve().parents[2] / "workloads"


def test_pct_focus_measures_the_next_seeds_until_one_reaches_the_focus():
    """race_wp_lock_zap, focus fn:do_huge_pmd_wp_page (the COW-reuse fault): in the
    aimed random run of seed 1 the splitter runs to its end first, so the write fault
    finds 4 KiB pages and never enters do_huge_pmd_wp_page (0 focus points). measure
    then tries seed 2, 3, ... and returns the focus points of the first run that gets
    there, so pct places its change points inside the fault (where the mutants
    huge_wp_no_folio_get and huge_wp_no_pmd_same_after_sleep are killed)."""
    cfg = ex.Config(program=str(WORKLOADS / "race_wp_lock_zap.py"), mode="pct", seed=1,
                    depth=3, focus=["fn:do_huge_pmd_wp_page"])
    first = ex.run_schedule(cfg, "random", 1, {"max_points": ex.MEASURE_CAP}, aim=True,
                            digest=False)
    assert first.focus_points == 0
    n, points = ex.measure(cfg)
    assert n > 0 and points > 0
