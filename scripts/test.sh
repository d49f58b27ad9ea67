#!/usr/bin/env bash
# Installs jirm with its test extra into ./.venv (if needed) and runs pytest.
# Uses TFDS_DATA_DIR if set, else ../shared/tensorflow_datasets when present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${JIRM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch (CPU build) is for the torchvision-converter parity test only.
"$VENV/bin/python" -m pip install -q -e ".[test,torch]"
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tensorflow_datasets ]; then
  export TFDS_DATA_DIR="$(cd ../shared/tensorflow_datasets && pwd)"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
