#!/usr/bin/env bash
# Create .venv (if needed) and install lift-serve with the training, CPU serving and dev extras.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[train,serve,dev]"
echo "lift-serve installed in .venv (run: .venv/bin/lift --help)"
