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
# The demo's browser test drives Debian's chromium through Playwright (which never downloads a browser
# here). Installed once, as root, only when the test extras are asked for and chromium is absent.
if [[ ",${extras}," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
