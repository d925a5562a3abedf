#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, CPU PyTorch pinned.
# Usage: scripts/setup.sh "cpu,lm,dev"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,lm}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
