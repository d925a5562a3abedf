#!/usr/bin/env bash
# Regenerates the Python stubs next to proto/retrieval/v1/retriever.proto with the project's own
# grpcio-tools (the dev extra, pinned: tests/test_proto.py compares the stubs with what it writes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh faiss,dev
.venv/bin/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
    retrieval/v1/retriever.proto
