#!/usr/bin/env bash
# Installs jirm with its test extras into ./.venv (if needed) and runs pytest.
# torch (CPU build, extra 'torch') is for the torchvision-converter parity
# test. Uses TFDS_DATA_DIR if set, else ../shared/tensorflow_datasets.
set -euo pipefail
JIRM_EXTRAS="[test,torch]" source "$(dirname "$0")/_env.sh"
exec "$VENV/bin/python" -m pytest -q "$@"
