#!/usr/bin/env bash
# Set up both environments (if needed) and run everything: lint, the whole suite on
# axolotl 0.19 / Python 3.11, and the whole suite again on axolotl 0.21 / Python 3.12.
#   scripts/test.sh            everything
#   scripts/test.sh -k exact   extra arguments go to both pytest runs
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# The 3.12 environment builds in the background while the 3.11 one builds and tests.
mkdir -p .ci-logs
( ensure_env312 ) > .ci-logs/env312.log 2>&1 &
env312_pid=$!

ensure_env311
echo "[lint] ruff check + ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "[test] axolotl 0.19.0 / Python 3.11"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

if ! wait "$env312_pid"; then
  cat .ci-logs/env312.log
  echo "[env] building the Python 3.12 / axolotl 0.21 environment failed (log above)" >&2
  exit 1
fi
cat .ci-logs/env312.log
echo "[test] axolotl 0.21.0 / Python 3.12"
.venv312/bin/python -m pytest -q -p no:cacheprovider "$@"
