#!/usr/bin/env bash
# The runs of docs/sparse_irm.md's baseline finding (ColoredMNIST 50000,
# IRMv1 env_scale, H=390, paper flags, evaluation every epoch), one queue
# per CPU core, each run pinned to its core:
#
#   scripts/sparse_irm_baselines.sh OUT            # both cores
#   scripts/sparse_irm_baselines.sh OUT 1          # only the queue of core 1
#
# Queue: dense IRM with the released code's dense route (all weights Adam
# 6e-3, --config.baseline=released) seeds 0-4, SparseIRM seeds 2-4, dense
# IRM at the matched 6e-4 seeds 1-4 (SparseIRM 0-1 and matched 0 are in
# docs/results/sparse_irm/results.jsonl). Each configuration writes to its
# own directory OUT/<released|sparse|matched>; a rerun of this script skips
# finished restarts and resumes killed ones from their checkpoints (every
# 100 steps). Merge finished records into the committed file with
#   python -m experiments.sparse_irm --report_only --output_dir=...
# after appending OUT/*/results.jsonl to docs/results/sparse_irm/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/sparse_irm_baselines.sh OUT [CORE]}"
ONLY="${2:-}"
PY="${PYTHON:-.venv/bin/python}"
JOBS=(
  "released 0" "released 1" "released 2" "released 3" "released 4"
  "sparse 2" "sparse 3" "sparse 4"
  "matched 1" "matched 2" "matched 3" "matched 4"
)
run_job() {  # kind seed core
  local kind=$1 seed=$2 core=$3 args
  case "$kind" in
    released) args=(--methods=irmv1 --config.baseline=released) ;;
    sparse) args=(--methods=sparse_irm) ;;
    matched) args=(--methods=irmv1) ;;
  esac
  mkdir -p "$OUT/$kind"
  taskset -c "$core" "$PY" -m experiments.sparse_irm "${args[@]}" \
    --hidden=390 --restarts=1 --seed="$seed" --progress=false \
    --output_dir="$OUT/$kind" >> "$OUT/$kind/seed$seed.log" 2>&1
  echo "$(date -u +%FT%TZ) done $kind seed $seed (core $core)"
}
queue() {  # core: every job whose index is the core's parity
  local core=$1 i
  for i in "${!JOBS[@]}"; do
    if (( i % 2 == core )); then
      # shellcheck disable=SC2086
      run_job ${JOBS[$i]} "$core"
    fi
  done
}
if [ -n "$ONLY" ]; then
  queue "$ONLY"
else
  queue 0 & queue 1 & wait
fi
