#!/usr/bin/env bash
# The headline experiment: the ColoredMNIST table of Arjovsky et al. (2019),
# every method with its published flags. Installs jirm into ./.venv first.
#   scripts/reproduce_colored_mnist.sh [OUTPUT_DIR] [extra absl flags...]
# About 6 CPU-minutes per IRMv1 restart on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/colored_mnist}"
shift || true
VENV="${JIRM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e .
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tensorflow_datasets ]; then
  export TFDS_DATA_DIR="$(cd ../shared/tensorflow_datasets && pwd)"
fi
exec "$VENV/bin/python" -m experiments.colored_mnist --method=all \
  --preset=paper --restarts=10 --output_dir="$OUT" "$@"
