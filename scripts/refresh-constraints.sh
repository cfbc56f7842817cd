#!/usr/bin/env bash
# Refresh constraints.txt deliberately: a fresh virtual environment, the newest releases the declared
# ranges in pyproject.toml allow (no constraints), then the tested set written by scripts/lock.py.
#   bash scripts/refresh-constraints.sh          # resolve and write constraints.txt
#   bash scripts/refresh-constraints.sh --test   # also run the test suite first; the file changes only if it passes
# Review `git diff constraints.txt` and commit it with the test result.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DIFFTRAIN_LOCK_VENV:-.venv-lock}
rm -rf "$VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
DIFFTRAIN_CONSTRAINTS=none bash scripts/install.sh --test
if [ "${1:-}" = "--test" ]; then
  python -m pytest
fi
python scripts/lock.py --out constraints.txt
