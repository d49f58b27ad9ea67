#!/usr/bin/env bash
# Rewrites constraints.txt from the test venv (./.venv or $JIRM_VENV): run it
# after the suite passed on new dependency versions, and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${JIRM_VENV:-.venv}"
{
  echo "# Exact versions the test suite was last run with (pip freeze of scripts/test.sh's"
  echo "# venv, Python 3.11, x86_64 Linux). scripts/_env.sh installs with"
  echo "# '-c constraints.txt'; setup.cfg keeps ranges for users. Regenerate with"
  echo "# scripts/lock.sh after a green run on new versions."
  "$VENV/bin/python" -m pip freeze --exclude-editable
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
