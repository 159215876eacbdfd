#!/usr/bin/env bash
# The GPU entry point: on a GPU machine of the fixed image (Python 3.12, torch, timm, typer, fsspec,
# safetensors, tensorstore; no network), install the wheels that travel in .whl/ (fetch_wheels.sh),
# run the CUDA tests (only the test files that hold them), then the one-GPU benchmark sized to ~6
# minutes, which rewrites OUT/bench_gpu.json and OUT/bench_gpu.md after every section.
#   pipelines/gpu/run.sh [OUT]              (default OUT: $OUT if set, else bench-gpu)
#   pipelines/gpu/run.sh --cpu-smoke [OUT]  the same path on a CPU: CUDA tests skip, tiny models
# Settings: PYTHON (default python3), WHEELS (default .whl), SITE (default /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/../.."
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
OUTDIR="${1:-${OUT:-bench-gpu}}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/site}"
say() { echo "run.sh: $*" >&2; }
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "no wheels in $WHEELS: run pipelines/gpu/fetch_wheels.sh on a machine with network first"
  exit 2
fi
t0=$(date +%s)
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 COSPRESS_LOG="${COSPRESS_LOG:-WARNING}"
"$PY" -c "import cospress, zarr, numcodecs, webdataset, faiss; print('run.sh: cospress', cospress.__version__, 'from', cospress.__file__, '| zarr', zarr.__version__)"
say "wheels installed and imported in $(( $(date +%s) - t0 )) s"
mkdir -p "$OUTDIR"
if [ "$SMOKE" = 0 ]; then
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    say "pre-flight failed: nvidia-smi cannot talk to the driver"
    exit 3
  fi
fi
# 1. the CUDA tests: only the files that define one (a test whose name says cuda)
mapfile -t FILES < <(grep -l -E "def test[a-z0-9_]*cuda" tests/test_*.py)
say "CUDA tests in ${FILES[*]}"
set +e
timeout "${TESTS_TIMEOUT:-200}" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda "${FILES[@]}" 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
set -e
say "CUDA tests exit $tests_rc after $(( $(date +%s) - t0 )) s"
# 2. the benchmark: its JSON and markdown are rewritten after every section
if [ "$SMOKE" = 1 ]; then
  timeout 300 "$PY" pipelines/bench/bench_gpu.py --cpu-smoke --out "$OUTDIR"
else
  timeout "${BENCH_TIMEOUT:-380}" "$PY" pipelines/bench/bench_gpu.py --out "$OUTDIR" || say "bench_gpu exit $?"
  timeout 90 "$PY" pipelines/bench/bench_writer.py --out "$OUTDIR/bench_writer.json" --shards 8 --rounds 2 \
    --tiny-shards 2000 --note "GPU node, after bench_gpu" || say "bench_writer exit $?"
fi
say "done in $(( $(date +%s) - t0 )) s; CUDA tests exit $tests_rc"
exit "$tests_rc"
