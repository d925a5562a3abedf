#!/usr/bin/env bash
# Installs the project and runs the main job: the end-to-end demo on the built-in corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "faiss,lm"  # faiss: the FAISS build installed, else the CPU one
exec .venv/bin/lm-worker demo "$@"
