#!/usr/bin/env bash
# Installs the project and runs the main job: the end-to-end demo on the built-in corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "cpu,lm"
exec .venv/bin/lm-worker demo "$@"
