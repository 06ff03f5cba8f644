#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the unit tests (not the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
