#!/usr/bin/env bash
# Every race program in every mode, N schedules each (seeds 1..N), JOBS cells at a time,
# each cell one `kmm explore --jobs 1 --keep-going`; resumable: a cell with a .done file
# in OUT is skipped, so a campaign stopped (or split over sessions on one tree) goes on
# where it was. One line per cell in OUT/summary.txt; a violation leaves its failure
# files in OUT (FAIL-<program>-<mode>*.jsonl, for kmm replay).
#
#   scripts/race_campaign.sh [N] [OUT]         (defaults: 10000, campaign/)
#   MODES="pct" PROGRAMS="race_fault_*" JOBS=2 scripts/race_campaign.sh 1000 /tmp/c
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
OUT=$(realpath -m "${2:-campaign}")
mkdir -p "$OUT"
KMM=${KMM:-kmm}
export N OUT KMM
cell() {
  local p=$1 m=$2 base
  base="$OUT/$p.$m.$N"
  [ -f "$base.done" ] && return 0
  local s=$SECONDS rc=0
  "$KMM" explore "workloads/$p.py" --mode "$m" --schedules "$N" --seed 1 --jobs 1 \
    --keep-going --quiet --out "$OUT/FAIL-$p-$m.jsonl" > "$base.log" 2>&1 || rc=$?
  # rc 1: violations found (listed in the log); anything else: the cell did not run
  echo "$p $m $N rc=$rc secs=$((SECONDS - s)) $(tail -n 1 "$base.log")" >> "$OUT/summary.txt"
  [ "$rc" -le 1 ] && touch "$base.done"
  return 0
}
export -f cell
for m in ${MODES:-random pct preempt}; do
  for f in workloads/${PROGRAMS:-race_*}.py; do
    echo "$(basename "$f" .py) $m"
  done
done | xargs -P "${JOBS:-2}" -L 1 bash -c 'cell "$0" "$1"'
echo "$OUT/summary.txt: $(grep -c ' rc=0 ' "$OUT/summary.txt" || true) clean cells," \
  "$(grep -c ' rc=1 ' "$OUT/summary.txt" || true) with violations"
