"""kmm mutate (kmm/tools/mutate.py): the catalogue applies to this tree, a mutant is
applied to a copy only, and one exploration kills a removed recheck."""

from __future__ import annotations

import pathlib

import pytest

from kmm.tools import cli
from kmm.tools import mutate as mt
from kmm.tools.mutate_catalogue import BY_NAME, MUTANTS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_catalogue_has_every_class_and_applies_to_this_tree():
    assert len(MUTANTS) >= 15
    assert {m.kind for m in MUTANTS} >= {"recheck", "tlb-flush", "lock", "reference",
                                        "revalidate", "lock-order"}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    assert mt.check_catalogue() == []
    for mu in MUTANTS:
        for prog in mu.programs:
            assert (ROOT / "workloads" / prog).exists(), (mu.name, prog)
        for t in mu.tests:
            assert (ROOT / t).exists(), (mu.name, t)


def test_mutant_edits_only_its_function():
    mu = BY_NAME["wp_copy_no_pte_same"]
    before = (ROOT / mu.file).read_text()
    after = mt.mutate_source(before, mu)
    assert after != before
    changed = [i for i, (a, b) in enumerate(zip(before.splitlines(), after.splitlines()))
               if a != b]
    start, end = mt._function_span(__import__("ast").parse(before), mu.function)
    assert changed and all(start - 1 <= i < end for i in changed)


def test_an_edit_that_does_not_match_is_refused():
    mu = mt.Mutant("x", "recheck", "kmm/memory.py", "do_anonymous_page",
                   (("no such text", ""),), "")
    with pytest.raises(mt.MutateError, match="occurs 0 times"):
        mt.mutate_source((ROOT / mu.file).read_text(), mu)
    with pytest.raises(mt.MutateError, match="refusing"):
        mt.apply(BY_NAME["wp_copy_no_pte_same"], ROOT)


def test_a_removed_recheck_is_killed_and_the_tree_is_untouched(capsys):
    """One mutant, a tiny budget: the write-vs-write PTE race kills it by exploration."""
    before = (ROOT / "kmm" / "memory.py").read_text()
    rc = cli.main(["mutate", "anon_write_no_pte_none_recheck", "--budget", "5",
                   "--no-tests", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "explore race_pte_fault.py random, schedule" in out
    assert "killed 1/1 (100%)" in out
    assert (ROOT / "kmm" / "memory.py").read_text() == before


def test_a_survivor_is_reported_as_such():
    kill = mt.Kill("m", "lock", explored=10)
    assert not kill.killed and kill.describe().startswith("survived (10 schedules")
    table = mt.format_table([kill, mt.Kill("n", "recheck", by="explore", program="p.py",
                                           mode="pct", schedules=3, violation="data",
                                           explored=23)])
    assert "killed 1/2 (50%)" in table
    assert "explore p.py pct, schedule 3 (23 run in all): data" in table


def test_the_removed_migration_refcount_freeze_is_killed(capsys):
    """migrate_no_ref_freeze (folio_ref_freeze in __folio_migrate_mapping): moving a
    folio the deferred-split shrinker holds leaves its destination off the queue, which
    race_migrate_shrinker.py sees (a 64 KiB folio is left after a quiet reclaim)."""
    rc = cli.main(["mutate", "migrate_no_ref_freeze", "--budget", "10", "--no-tests",
                   "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "explore race_migrate_shrinker.py random, schedule" in out
    assert "killed 1/1 (100%)" in out


@pytest.mark.parametrize("name, program, mode, budget", [
    ("mthp_no_pte_range_none_recheck", "race_mthp_fault.py", "pct", 10),
    ("numa_page_no_pte_same", "race_numa_fault_dontneed.py", "random", 12),
    ("finish_fault_no_pte_none_recheck", "race_shmem_fault_fault.py", "random", 5),
    ("collapse_file_no_filled_recheck", "race_shmem_punch_collapse.py", "pct", 30),
    ("huge_pmd_share_no_pud_recheck", "race_hugetlb_share_fault_fault.py", "random", 15),
    ("lazyfree_no_dirty_recheck", "race_lazyfree_reclaim.py", "random", 3),
    ("shmem_swapin_no_confirm_swap", "race_shmem_swapin_punch.py", "pct", 260),
    ("mremap_no_rmap_locks", "race_mremap_migrate.py", "pct", 12),
    ("mthp_swapin_no_pte_batch_recheck", "race_mthp_swapin_dontneed.py", "random", 10),
    ("huge_zero_wp_no_pmd_same", "race_huge_zero_write.py", "random", 3),
    ("shmem_free_swap_whole_entry", "race_shmem_thp_swapin_punch.py", "random", 3),
])
def test_the_safeguards_of_mthp_numa_shmem_and_hugetlb_are_killed(name, program, mode,
                                                                   budget, capsys):
    """A mutant of each path added after the first catalogue (mTHP, NUMA balancing on
    PTEs, shmem faults, collapse_file, hugetlb PMD sharing, lazyfree reclaim, shmem
    swap-in, mremap's rmap locks, mTHP swap-in, the huge zero page's COW, a shmem THP's
    swap entry) dies in its race program, within the schedules measured when it joined
    the catalogue."""
    rc = cli.main(["mutate", name, "--budget", str(budget), "--mode", mode,
                   "--no-tests", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"explore {program} {mode}, schedule" in out
    assert "killed 1/1 (100%)" in out
