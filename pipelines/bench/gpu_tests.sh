#!/usr/bin/env bash
# The CUDA-marked tests, skipped on a CPU (issue 15): nvjpeg on a mixed JPEG batch against the CPU path,
# the decoder's stream race, --decode gpu end to end, the distill prefetcher's side stream, extraction's
# pinned double buffer, the fused loss on CUDA. A few minutes on one GPU; run it beside gpu.sh.
#   pipelines/bench/gpu_tests.sh [PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_tests.sh: no Python at $PY: create the venv (.venv, see docs/getting-started.md) or set PYTHON=/path/to/python" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_tests.sh: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)" >&2
  exit 3
fi
# every test of the suite whose name says cuda, so a new CUDA test is never left out of the GPU pass
timeout 300 "$PY" -m pytest -q -rs -k cuda tests "$@"
