#!/usr/bin/env bash
# Installs the project with its test tools, lints, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "faiss,lm,cluster,dev"  # faiss: the FAISS build installed, else the CPU one
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
