#!/usr/bin/env bash
# One-GPU benchmark of cospress (random-init models, no hub): bare models vs extract / distill end
# to end with CPU and GPU decode, the loss plain vs fused, torch.compile. Under 8 minutes on one H100.
#   pipelines/bench/gpu.sh [OUT]      -> OUT/bench_gpu.json + OUT/bench_gpu.md (default OUT: bench-gpu/)
# A pre-flight (driver, CUDA, a Triton kernel, nvjpeg on one image) fails fast with one line; the JSON
# is rewritten after every section, so a run stopped by the timeout keeps what it measured.
set -euo pipefail
OUT="${1:-bench-gpu}"
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu.sh: no Python at $PY: create the venv (.venv, see docs/getting-started.md) or set PYTHON=/path/to/python" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1
export COSPRESS_LOG="${COSPRESS_LOG:-WARNING}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh: pre-flight failed: nvidia-smi not found (no NVIDIA driver on this machine)" >&2
  exit 3
fi
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  echo "gpu.sh: pre-flight failed: nvidia-smi cannot talk to the driver" >&2
  exit 3
fi
timeout 470 "$PY" pipelines/bench/bench_gpu.py --out "$OUT"
