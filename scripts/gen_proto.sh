#!/usr/bin/env bash
# Regenerates the Python stubs next to proto/retrieval/v1/retriever.proto (needs the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
    retrieval/v1/retriever.proto
