#!/usr/bin/env bash
# Installs the project with its test tools, lints, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "cpu,lm,cluster,dev"
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
