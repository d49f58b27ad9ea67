# Sourced by the scripts: creates ./.venv (or $JIRM_VENV) if needed, installs
# jirm with the extras in $JIRM_EXTRAS at the exact versions of
# constraints.txt (the ones the suite was last run with; set
# JIRM_CONSTRAINTS=none to resolve setup.cfg's ranges instead, e.g. on a
# platform without the CPU build of torch), and points TFDS_DATA_DIR at
# ../shared/tensorflow_datasets when it is unset and that folder exists.
# --no-compile: byte-compiling every installed file (torch, ray, jax) was
# more than half of the install time; Python compiles what it imports.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${JIRM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
CONSTRAINTS="${JIRM_CONSTRAINTS:-constraints.txt}"
if [ "$CONSTRAINTS" = none ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q --no-compile -e ".${JIRM_EXTRAS:-}"
else
  if [ ! -f "$CONSTRAINTS" ]; then
    echo "error: JIRM_CONSTRAINTS=$CONSTRAINTS: no such file; set it to a constraints file or to 'none'" >&2
    exit 2
  fi
  "$VENV/bin/python" -m pip install -q pip==26.3 >/dev/null
  "$VENV/bin/python" -m pip install -q --no-compile -c "$CONSTRAINTS" -e ".${JIRM_EXTRAS:-}"
fi
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tensorflow_datasets ]; then
  export TFDS_DATA_DIR="$(cd ../shared/tensorflow_datasets && pwd)"
fi
