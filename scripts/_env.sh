# Sourced by the scripts: creates ./.venv (or $JIRM_VENV) if needed, installs
# jirm with the extras in $JIRM_EXTRAS, and points TFDS_DATA_DIR at
# ../shared/tensorflow_datasets when it is unset and that folder exists.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${JIRM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".${JIRM_EXTRAS:-}"
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tensorflow_datasets ]; then
  export TFDS_DATA_DIR="$(cd ../shared/tensorflow_datasets && pwd)"
fi
