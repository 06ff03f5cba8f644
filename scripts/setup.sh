#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it. Usage: bash scripts/setup.sh [EXTRAS]
# EXTRAS is a comma list of pyproject extras (e.g. "test"). Idempotent. Prints one "[setup] stage: ..."
# line per stage (venv, torch, extras, chromium); installs that run show pip's and apt's progress,
# stages already done say so and install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
say() { printf '[setup] %s\n' "$*"; }

if [ -x .venv/bin/python ]; then
    say "venv: .venv exists"
else
    say "venv: creating .venv"
    python3 -m venv .venv
fi
py=.venv/bin/python

# The CPU wheel of torch 2.13.0 is on local disk; a looser requirement would pull GBs of CUDA packages.
if version=$($py -c "import torch; print(torch.__version__)" 2>/dev/null); then
    say "torch: $version already installed"
else
    say "torch: installing torch==2.13.0 (CPU build, ~200 MB)"
    $py -m pip install --progress-bar on torch==2.13.0
fi

# The project (editable) and its extras. A stamp records what was installed from which pyproject.toml,
# so a rerun with nothing new skips pip (whose up-to-date check alone takes seconds and prints a page).
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=.venv/.looplm-installed
want="$(pwd) $(sha256sum pyproject.toml | cut -c1-16) ${spec}"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    say "extras: ${spec} up to date"
else
    say "extras: installing ${spec} (editable; the test extras take a few minutes on a fresh machine)"
    $py -m pip install --progress-bar on -e "$spec"
    echo "$want" >> "$stamp"
fi

# The demo's browser test drives Debian's chromium through Playwright (which never downloads a browser
# here). Installed once, as root, only when the test extras are asked for and chromium is absent.
if [[ ",${extras}," == *",test,"* ]]; then
    if command -v chromium >/dev/null 2>&1; then
        say "chromium: $(command -v chromium) present"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "chromium: installing Debian's chromium with apt-get (about a minute)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        say "chromium: absent and cannot be installed here (needs root and apt-get); the browser test will skip"
    fi
fi
