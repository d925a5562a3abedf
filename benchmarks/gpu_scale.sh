#!/usr/bin/env bash
# The scale benchmark and a kNN-LM evaluation on a GPU machine (16 cores and one NVIDIA GPU: about
# 8 minutes), printing the same tables as on CPU and saying which parts ran on the GPU.
#
#   bash benchmarks/gpu_scale.sh [OUT]          # default OUT: bench_out/gpu
#
# Needs the project installed with the GPU build of FAISS instead of the CPU one (never both) and a
# CUDA build of torch:  pip install -e ".[gpu,lm,cluster]"  (not scripts/setup.sh, which pins CPU torch).
# Without faiss-gpu the datastore is built and served on CPU and only the LM runs on CUDA; without
# CUDA torch the LM runs on CPU. SIZES (default 1000000,3000000) sets the scale benchmark's rows, or
# `none` to skip it; RUN names a run directory to evaluate instead of making `lm-worker demo --quick`.
# With CUDA, the evaluation runs twice, the LM on CUDA and on CPU, and their perplexities are compared.
#
# The lent GPU machine (Python 3.12, CUDA torch, no registry, no Ray, no MiniLM encoder, 64 MiB
# carried) can run the evaluation only. Here, once, with the registry:
#
#   bash benchmarks/gpu_scale.sh --fetch        # .device/gpu (ignored by git): wheels and a quick run
#
# puts there the wheels that machine lacks and the parts of the quick demo run the evaluation reads
# (`lm-worker demo --quick` first makes it); there, with `.device/gpu` carried (not `.device`: it
# also holds device_speed.sh's `.device/speed`, and the two together pass the 64 MiB limit):
#
#   bash benchmarks/gpu_scale.sh --carried [OUT]  # OUT default: $OUT, else .device/gpu/out
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_wheels.sh
CARRIED=${DEVICE:-.device}/gpu
QUICK_RUN=runs/demo-quick

fetch() {
    local python=${PYTHON:-.venv/bin/python}
    fetch_device_wheels "$CARRIED/wheels"
    [ -f "$QUICK_RUN/knnlm-datastore/manifest.json" ] || "$(dirname "$python")/lm-worker" demo --quick --run "$QUICK_RUN"
    rm -rf "$CARRIED/run" && mkdir -p "$CARRIED/run/lm"
    cp -r "$QUICK_RUN/data" "$QUICK_RUN/knnlm-datastore" "$CARRIED/run/"
    cp "$QUICK_RUN/lm/checkpoint.pt" "$CARRIED/run/lm/"
    du -sh "$CARRIED"
}

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --fetch|--carried) ;;
    -*) echo "gpu_scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
if [ "${1:-}" = "--fetch" ]; then
    fetch
    exit 0
fi
if [ "${1:-}" = "--carried" ]; then
    shift
    install_device_wheels "$CARRIED/wheels" /tmp/gpu-site
    export PYTHONPATH PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
    PYTHONPATH=$(device_pythonpath /tmp/gpu-site)
    set -- "${1:-${OUT:-$CARRIED/out}}"
    SIZES=${SIZES:-none}
    RUN=${RUN:-$CARRIED/run}
fi
out=${1:-bench_out/gpu}
python=${PYTHON:-python}
mkdir -p "$out"
report="$out/gpu_scale.txt"

"$python" - <<'EOF' | tee "$report"
import os
import faiss
import torch
faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
cuda = torch.cuda.is_available()
print(f"{os.cpu_count()} CPUs; torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}; "
      f"faiss {faiss.__version__}, {faiss_gpus} GPU(s) visible to FAISS")
print("on the GPU:", ", ".join(
    (["the build's k-means and each row's list assignment", "the shards' searches"] if faiss_gpus else [])
    + (["the LM's forward passes (kNN-LM evaluation)"] if cuda else [])) or "nothing")
EOF

gpu=$("$python" -c 'import faiss; print("--gpu" if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() else "")')
device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')

if [ "${SIZES:-}" = none ]; then
    echo "== scale benchmark: skipped (SIZES=none)" | tee -a "$report"
else
    echo "== scale benchmark: rows ${SIZES:-1000000,3000000}, build on $(nproc) CPUs ${gpu:+with --gpu}" | tee -a "$report"
    "$python" benchmarks/scale.py --sizes "${SIZES:-1000000,3000000}" --build-cpus "$(nproc)" $gpu \
        --out "$out/scale" | tee -a "$report"
fi

run=${RUN:-$out/demo}
if [ -z "${RUN:-}" ]; then
    "$python" -m lm_worker.cli demo --quick --run "$run" --workers 4 > "$out/demo.log" 2>&1 \
        || { echo "lm-worker demo --quick failed; see $out/demo.log" | tee -a "$report"; exit 1; }
fi
devices=("$device")
[ "$device" = cuda ] && devices+=(cpu)
for d in "${devices[@]}"; do
    echo "== kNN-LM evaluation of $run, LM on $d" | tee -a "$report"
    "$python" benchmarks/knnlm_eval.py --run "$run" --device "$d" --tokens 4096 --repeats 2 \
        --out "$out/$d" | tee -a "$report"
done
if [ "$device" = cuda ]; then
    "$python" - "$out" <<'EOF' | tee -a "$report"
import json, sys
from pathlib import Path

sides = {d: {s["side"]: s for s in json.loads((Path(sys.argv[1]) / d / "knnlm_eval.json").read_text())["sides"]}
         for d in ("cuda", "cpu")}
print("| side | tokens/s, LM on CUDA | tokens/s, LM on CPU | CUDA / CPU | best ppl CUDA | best ppl CPU | relative difference |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, g in sides["cuda"].items():
    c = sides["cpu"][name]
    key = "best_perplexity" if "best_perplexity" in g else "base_perplexity"
    print(f"| {name} | {g['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | {g['tokens_per_s'] / c['tokens_per_s']:.2f} | "
          f"{g[key]:.4f} | {c[key]:.4f} | {abs(g[key] - c[key]) / c[key]:.1e} |")
EOF
fi
echo "wrote $report and the JSON under $out"
