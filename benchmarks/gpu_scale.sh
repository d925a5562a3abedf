#!/usr/bin/env bash
# The scale benchmark and a kNN-LM evaluation on a GPU machine (16 cores and one NVIDIA GPU: about
# 8 minutes), printing the same tables as on CPU and saying which parts ran on the GPU.
#
#   bash benchmarks/gpu_scale.sh [OUT]          # default OUT: bench_out/gpu
#
# Needs the project installed with the GPU build of FAISS instead of the CPU one (never both) and a
# CUDA build of torch:  pip install -e ".[gpu,lm,cluster]"  (scripts/setup.sh "gpu,lm,cluster,dev").
# Without faiss-gpu the datastore is built and served on CPU and only the LM runs on CUDA; without
# CUDA torch the LM runs on CPU. SIZES (default 1000000,3000000) sets the scale benchmark's rows.
set -euo pipefail
cd "$(dirname "$0")/.."
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

echo "== scale benchmark: rows ${SIZES:-1000000,3000000}, build on $(nproc) CPUs ${gpu:+with --gpu}" | tee -a "$report"
"$python" benchmarks/scale.py --sizes "${SIZES:-1000000,3000000}" --build-cpus "$(nproc)" $gpu \
    --out "$out/scale" | tee -a "$report"

echo "== kNN-LM evaluation, LM on $device" | tee -a "$report"
lm-worker demo --quick --run "$out/demo" --workers 4 > "$out/demo.log" 2>&1 \
    || { echo "lm-worker demo --quick failed; see $out/demo.log" | tee -a "$report"; exit 1; }
"$python" benchmarks/knnlm_eval.py --run "$out/demo" --device "$device" --tokens 4096 --repeats 2 \
    --out "$out" | tee -a "$report"
echo "wrote $report, $out/scale/scale.json, $out/knnlm_eval.json"
