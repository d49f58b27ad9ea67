#!/usr/bin/env bash
# SparseIRM's MLP table (Zhou et al. ICML 2022, ColoredMNIST 50000, IRMv1
# penalty): six methods x six hidden widths, then the colour probe and the
# colour-flip heatmap at hidden 640. The paper protocol is 1500 full-batch
# epochs: about 25 CPU-minutes per restart at hidden 390 and 80 at hidden 640
# on one core of a 2-core machine, seconds on a GPU. Installs jirm into
# ./.venv first.
#   scripts/reproduce_sparse_irm.sh [OUTPUT_DIR] [RESTARTS] [extra flags...]
# e.g. --penalty=rex, --data_num=20000, --dataset=fullcmnist
set -euo pipefail
OUT="$(realpath -m "${1:-results/sparse_irm}")"
RESTARTS="${2:-5}"
shift 2 || shift || true
source "$(dirname "$0")/_env.sh"
PY="$VENV/bin/python"
"$PY" -m experiments.sparse_irm \
  --methods=erm,oracle,irmv1,mrm,sparse_irm,sparse_erm \
  --hidden=64,160,256,390,512,640 --restarts="$RESTARTS" \
  --output_dir="$OUT" "$@"
for ablation in probe flip; do
  "$PY" -m experiments.sparse_irm --ablation="$ablation" \
    --methods=irmv1,mrm,sparse_irm --hidden=640 --output_dir="$OUT" "$@"
done
