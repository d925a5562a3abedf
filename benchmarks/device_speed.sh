#!/usr/bin/env bash
# Wall-clock speed of the search service on a machine with enough cores (the GPU machine: 16 cores,
# CUDA torch, Python 3.12, no package registry), each process on 2 cores of its own:
# `benchmarks/cpu_cost.py --pin`, which prints the CPU table and the wall-clock ratios.
#
# Here, with the registry, once (needs the 20000-key MiniLM cache and bench_out/ds-cpu-cost, which
# `python benchmarks/cpu_cost.py --quick` makes):
#
#     bash benchmarks/device_speed.sh --fetch
#
# puts into .device/speed/ (ignored by git, about 50 MiB): the wheels that machine lacks for its Python
# (faiss-cpu, grpcio and its health and reflection services, protobuf, cryptography), the datastore,
# and the MiniLM vectors as float16 (their token arrays, which the benchmark does not read, as
# placeholders). There, with `.device/speed` carried (that folder alone: not `.device`, which also
# holds gpu_scale.sh's `.device/gpu`, and the two together pass the 64 MiB that may be carried):
#
#     bash benchmarks/device_speed.sh [--quick]
#
# installs the wheels into a folder over the machine's own packages, restores the vectors, runs the
# benchmark under /tmp and copies its table and figure (cpu_cost.json, cpu_cost.png) into $OUT (or
# .device/speed/out): the vectors and datastore stay behind, too big and too many to come back.
# --quick: about 0.5 s per side and cell, under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-.device}/speed  # carried alone; gpu_scale.sh's is ${DEVICE:-.device}/gpu
N_KEYS=20000
N_QUERIES=1000
source benchmarks/device_wheels.sh

fetch() {
    local python=${PYTHON:-.venv/bin/python}
    fetch_device_wheels "$DEVICE/wheels"
    [ -f bench_out/ds-cpu-cost/manifest.json ] || { echo "no bench_out/ds-cpu-cost: run python benchmarks/cpu_cost.py --quick first" >&2; exit 1; }
    rm -rf "$DEVICE/ds-cpu-cost" && cp -r bench_out/ds-cpu-cost "$DEVICE/ds-cpu-cost"
    "$python" - "$DEVICE/vectors" "$N_KEYS" "$N_QUERIES" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

from lm_worker.encoders.stdlib_vectors import cache_stem, stdlib_vectors

out, n_keys, n_queries = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vectors = stdlib_vectors(n_keys, n_queries)  # the cache, or encoded now
out.mkdir(parents=True, exist_ok=True)
np.save(out / "keys.npy", np.asarray(vectors.keys, dtype=np.float16))
np.save(out / "queries.npy", np.asarray(vectors.queries, dtype=np.float16))
np.save(out / "doc_ids.npy", np.asarray(vectors.doc_ids))
np.save(out / "tokens.npy", np.zeros((n_keys, 1), np.int32))  # placeholders: the benchmark reads no tokens
np.save(out / "query_tokens.npy", np.zeros((n_queries, 1), np.int32))
(out / "docs.json").write_text(json.dumps(vectors.documents))
print(f"{out}: {n_keys} keys and {n_queries} queries of {cache_stem(64, 16)} as float16")
EOF
    du -sh "$DEVICE"
}

run_there() {
    local out=${OUT:-$DEVICE/out} work=/tmp/device-speed quick=()
    [ "${1:-}" = "--quick" ] && quick=(--quick)
    echo "machine: $(nproc) cores; $(python3 --version)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi"
    install_device_wheels "$DEVICE/wheels" /tmp/device-site
    export PYTHONPATH
    PYTHONPATH=$(device_pythonpath /tmp/device-site)
    mkdir -p "$out" "$work"
    python3 - "$DEVICE/vectors" "$work/vectors" <<'EOF'
import shutil, sys
from pathlib import Path

import numpy as np

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for path in src.iterdir():
    if path.name in ("keys.npy", "queries.npy"):
        np.save(dst / path.name, np.load(path).astype(np.float32))
    else:
        shutil.copy(path, dst / path.name)
EOF
    rm -rf "$work/ds-cpu-cost" && cp -r "$DEVICE/ds-cpu-cost" "$work/ds-cpu-cost"
    BENCH_VECTORS="$work/vectors" PYTHONUNBUFFERED=1 python3 benchmarks/cpu_cost.py --pin --out "$work" "${quick[@]}"
    cp "$work/cpu_cost.json" "$work/cpu_cost.png" "$out/"
}

case "${1:-}" in
    --fetch) fetch ;;
    ""|--quick) run_there "${1:-}" ;;
    *) echo "usage: $0 [--fetch | --quick]" >&2; exit 2 ;;
esac
