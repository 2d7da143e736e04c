#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build llama-cpp-python with CUDA into .venv, run the
# GPU-marked tests, then measure decode tokens/s with every layer on the GPU against the CPU at
# c=1 and c=8 (benchmarks/results/gpu-offload-<model>.json and .md, for docs/benchmarks.md).
#
#   scripts/gpu_check.sh [MODEL ...]      (default: smollm2)
#
# Needs the CUDA toolkit (nvcc) for the build. CUDA_ARCHITECTURES narrows the build to one
# card (e.g. 90 for an H100) and makes it several times faster; unset, llama.cpp's list.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="-DGGML_CUDA=ON"
if [ -n "${CUDA_ARCHITECTURES:-}" ]; then ARGS="$ARGS -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES"; fi
LMSERVE_CMAKE_ARGS="$ARGS ${LMSERVE_CMAKE_ARGS:-}" make install
.venv/bin/python - <<'PY'
from lmserve.service import gpu_facts
build, devices = gpu_facts()
print("llama.cpp GPU backend:", build, "devices:", devices)
raise SystemExit(0 if build and devices else "no GPU backend or no GPU seen: see the build log")
PY
.venv/bin/python -m pytest -q -m gpu tests/model
THREADS="${THREADS:-$(nproc)}"
for model in "${@:-smollm2}"; do
  .venv/bin/python -m benchmarks.server_variants --model "$model" --threads "$THREADS" \
    --variant "cpu=--gpu-layers 0" --variant "gpu=--gpu-layers all" \
    --concurrency 1,8 --rounds 3 --tag "gpu-offload-$model"
done
