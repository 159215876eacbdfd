#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU image lacks into .whl/ (git-ignored), so
# that they travel with the working tree to a GPU machine without network (64 MiB per call in all).
# The image has Python 3.12 with torch (+ numpy, torchvision, pillow), timm (+ pyyaml,
# huggingface_hub, requests, tqdm, packaging), typer (+ click, rich), fsspec, safetensors and
# tensorstore; it lacks zarr (+ donfig, google-crc32c), numcodecs, webdataset (+ braceexpand),
# faiss-cpu and pytest (+ iniconfig, pluggy). scipy (evaluate's robustness and rank fidelity) and
# matplotlib (report plots) are left out: ~45 MB more, and the GPU run needs neither.
#   pipelines/gpu/fetch_wheels.sh [DEST]        (default DEST: .whl; PYVER=3.12 PIP="python -m pip")
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-.whl}"
PYVER="${PYVER:-3.12}"
PIP="${PIP:-python3 -m pip}"
LIMIT=$((64 * 1024 * 1024))
# pinned to what the tests pass with here (the venv's versions)
PACKAGES=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 webdataset==1.0.2
          braceexpand==0.1.7 faiss-cpu==1.15.1 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0)
mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$DEST" "${PACKAGES[@]}"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
echo "fetch_wheels.sh: $(ls "$DEST"/*.whl | wc -l) wheels, $total bytes in $DEST (limit $LIMIT)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "fetch_wheels.sh: $DEST holds more than 64 MiB: a GPU call carries at most 64 MiB" >&2
  exit 1
fi
