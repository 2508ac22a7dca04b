#!/usr/bin/env bash
# Every race program in every mode, N schedules each (seeds 1..N), JOBS runs at a time,
# each run one `kmm explore --jobs 1 --keep-going`; resumable: a run with a .done file
# in OUT is skipped, so a campaign stopped (or split over sessions on one tree) goes on
# where it was. CHUNK splits each cell into runs of that many schedules (`--start`:
# the same schedules as one run of the cell), so a stop loses at most one chunk per job.
# One line per run in OUT/summary.txt; a violation leaves its failure files in OUT
# (FAIL-<program>-<mode>[-<start>]*.jsonl, for kmm replay).
#
#   scripts/race_campaign.sh [N] [OUT]         (defaults: 10000, campaign/)
#   MODES="pct" PROGRAMS="race_fault_*" JOBS=2 CHUNK=1000 scripts/race_campaign.sh 1000 /tmp/c
#   CELLS=cells.txt scripts/race_campaign.sh    (the cells to run, "program mode" a line,
#                                                in that order, instead of MODES x PROGRAMS)
#   EXPLORE_ARGS="--inject BUG" ...              (more `kmm explore` options, every run)
# scripts/race_campaign_table.py OUT N prints the campaign's table.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
OUT=$(realpath -m "${2:-campaign}")
CHUNK=${CHUNK:-$N}
mkdir -p "$OUT"
KMM=${KMM:-kmm}
EXPLORE_ARGS=${EXPLORE_ARGS:-}
export N OUT KMM CHUNK EXPLORE_ARGS
run() {  # program mode start: schedules start .. start+CHUNK-1 of the cell
  local p=$1 m=$2 i=$3 base tag="" fail
  base="$OUT/$p.$m.$N"
  [ -f "$base.done" ] && return 0  # the whole cell, run in one piece
  if [ "$CHUNK" -lt "$N" ]; then tag=".$i"; fi
  [ -f "$base$tag.done" ] && return 0
  fail="$OUT/FAIL-$p-$m${tag:+-$i}.jsonl"
  local s=$SECONDS rc=0 count=$((N - i < CHUNK ? N - i : CHUNK))
  "$KMM" explore "workloads/$p.py" --mode "$m" --schedules "$count" --start "$i" \
    --seed 1 --jobs 1 --keep-going --quiet --out "$fail" $EXPLORE_ARGS \
    > "$base$tag.log" 2>&1 || rc=$?
  # rc 1: violations found (listed in the log); anything else: the run did not finish
  echo "$p $m $N rc=$rc secs=$((SECONDS - s)) $(tail -n 1 "$base$tag.log")" \
    >> "$OUT/summary.txt"
  [ "$rc" -le 1 ] && touch "$base$tag.done"
  return 0
}
export -f run
if [ -n "${CELLS:-}" ]; then
  cat "$CELLS"
else
  for m in ${MODES:-random pct preempt}; do
    for f in workloads/${PROGRAMS:-race_*}.py; do
      echo "$(basename "$f" .py) $m"
    done
  done
fi | while read -r p m; do
  for ((i = 0; i < N; i += CHUNK)); do echo "$p $m $i"; done
done | xargs -P "${JOBS:-2}" -L 1 bash -c 'run "$0" "$1" "$2"'
echo "$OUT/summary.txt: $(grep -c ' rc=0 ' "$OUT/summary.txt" || true) clean runs," \
  "$(grep -c ' rc=1 ' "$OUT/summary.txt" || true) with violations"
