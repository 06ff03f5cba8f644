#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the unit tests (not the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
echo "[test] tests: .venv/bin/python -m pytest -q $* (10 to 20 minutes on 2 cores; a dot per passed test)"
exec .venv/bin/python -m pytest -q "$@"
