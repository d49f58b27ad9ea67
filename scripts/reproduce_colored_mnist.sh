#!/usr/bin/env bash
# The headline experiment: the ColoredMNIST table of Arjovsky et al. (2019),
# every method with its published flags. Installs jirm into ./.venv first.
#   scripts/reproduce_colored_mnist.sh [OUTPUT_DIR] [extra absl flags...]
# About 6 CPU-minutes per IRMv1 restart on a 2-core machine.
set -euo pipefail
OUT="$(realpath -m "${1:-results/colored_mnist}")"
shift || true
source "$(dirname "$0")/_env.sh"
exec "$VENV/bin/python" -m experiments.colored_mnist --method=all \
  --preset=paper --restarts=10 --output_dir="$OUT" "$@"
