#!/usr/bin/env bash
# CIFAR-MNIST seed study (docs/reproduction.md): all ten Table-1 rows of the
# cpu preset (ResNet-18, 2 envs), seeds 0..N-1 in seed-major order, so that
# an interrupted study has every row at the same seeds. Resumable: finished
# (method, seed) records are skipped, an unfinished restart resumes from its
# orbax checkpoint.
#   scripts/cifar_mnist_seeds.sh OUTPUT_DIR [N=5] [extra flags...]
set -euo pipefail
OUT="${1:?usage: scripts/cifar_mnist_seeds.sh OUTPUT_DIR [N] [flags...]}"
N="${2:-5}"
shift $(( $# > 1 ? 2 : 1 ))
source "$(dirname "$0")/_env.sh"
for ((s = 0; s < N; s++)); do
  "$VENV/bin/python" -m experiments.cifar_mnist --method=all --preset=cpu \
      --model=resnet18 --envs=2 --seed="$s" --restarts=1 --progress=false \
      --output_dir="$OUT" "$@"
done
