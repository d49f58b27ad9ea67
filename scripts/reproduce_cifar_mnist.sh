#!/usr/bin/env bash
# IRMBed's Table 1 (CIFAR-MNIST, ResNet-18, 2 envs), all ten methods, with the
# CPU protocol (native 64x32, from scratch, 4 epochs; about 8-10 CPU-minutes
# per restart on a 2-core machine). Installs jirm into ./.venv first.
#   scripts/reproduce_cifar_mnist.sh [OUTPUT_DIR] [extra absl flags...]
# e.g. --envs=4, --model=resnet50, --preset=irmbed --config.pretrained=R18.pth
set -euo pipefail
OUT="$(realpath -m "${1:-results/cifar_mnist}")"
shift || true
source "$(dirname "$0")/_env.sh"
exec "$VENV/bin/python" -m experiments.cifar_mnist --method=all \
  --preset=cpu --model=resnet18 --envs=2 --restarts=2 --output_dir="$OUT" "$@"
