#!/usr/bin/env bash
# One-GPU benchmark of cospress (random-init models, no hub): bare models vs extract / distill end
# to end with CPU and GPU decode, the loss plain vs fused, torch.compile. Under 8 minutes on one H100.
#   pipelines/bench/gpu.sh [OUT]      -> OUT/bench_gpu.json + OUT/bench_gpu.md (default OUT: bench-gpu/)
set -euo pipefail
OUT="${1:-bench-gpu}"
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1
export COSPRESS_LOG="${COSPRESS_LOG:-WARNING}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$PY" pipelines/bench/bench_gpu.py --out "$OUT"
