#!/usr/bin/env bash
# Installs jirm with its test extras into ./.venv (if needed) and runs pytest.
# torch (CPU build, extra 'torch') is for the torchvision-converter parity
# test. Uses TFDS_DATA_DIR if set, else ../shared/tensorflow_datasets.
set -euo pipefail
JIRM_EXTRAS="[test,torch]" source "$(dirname "$0")/_env.sh"
# One pytest-xdist worker per core, whole files per worker (module fixtures
# run once); later arguments override, e.g. 'scripts/test.sh -n 0 -k ipg'.
exec "$VENV/bin/python" -m pytest -q -n auto --dist loadfile "$@"
