#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it. Usage: bash scripts/setup.sh [EXTRAS]
# EXTRAS is a comma list of pyproject extras (e.g. "test"). Idempotent and quiet when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
# The CPU wheel of torch 2.13.0 is on local disk; a looser requirement would pull GBs of CUDA packages.
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
$py -m pip install -q -e "$spec"
