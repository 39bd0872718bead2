#!/usr/bin/env bash
# The GPU benchmark in one call, on the GPU machine, from anywhere in the checkout:
#   bash benchmarks/gpu.sh [gpu.py options]      (table and log in $OUT, else ./gpu-bench)
# .gpu-carry/ must travel with the tree: `python benchmarks/gpu.py --prepare-carry` fills it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-gpu-bench}"
mkdir -p "$out"
"${PYTHON:-python3}" benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu-bench.log"
