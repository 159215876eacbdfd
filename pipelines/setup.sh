#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (Fashion-MNIST data, nginx for the HTTP store test),
# a virtual environment in .venv with cospress and its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
need_apt=""
[ -d /usr/share/datasets/fashion-mnist ] || need_apt="$need_apt dataset-fashion-mnist"
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt="$need_apt nginx-light"
if [ -n "$need_apt" ]; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need_apt >/dev/null
  else
    echo "warning: no apt-get; install$need_apt yourself (tests that need them are skipped)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# timm imports torchvision: a torch / torchvision mismatch shows up here, not in the middle of a run.
.venv/bin/python -c "import timm, torch, torchvision, zarr, faiss; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, zarr {zarr.__version__}')"
