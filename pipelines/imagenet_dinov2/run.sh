#!/usr/bin/env bash
# ImageNet-1k: DINOv2 ViT-S/14 -> ViT-Ti/14, CosPress and the cosine baseline, on one node of 8 GPUs.
#   bash pipelines/imagenet_dinov2/run.sh                  (from the repository root)
#   NPROC=4 bash pipelines/imagenet_dinov2/run.sh          (fewer GPUs: the global batch stays 1032 views)
# Every step resumes when rerun: extraction skips committed shards, distill continues from `last`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-8}
HERE=pipelines/imagenet_dinov2
STORE=${STORE:-/data/stores/imagenet-dinov2-vits14-k10}
RUNS=${RUNS:-runs/imagenet}
TEACHER_SPEC=teacher:vit_small_patch14_dinov2.lvd142m@224
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")

# 1. the teacher store (each rank owns the shards s with s % world == rank)
"${TORCHRUN[@]}" -m cospress extract-teacher --config $HERE/extract.yaml --out "$STORE"
"$PY" -m cospress verify "$STORE"
"$PY" -m cospress inspect "$STORE"

# 2. students (DDP; the CosPress global term runs on the all-gathered batch of 1024 CLS vectors)
for method in cospress cosine; do
  run=$RUNS/$method-vits14-to-vitti14
  "${TORCHRUN[@]}" -m cospress distill --config $HERE/distill-$method.yaml --store "$STORE" --out "$run" --resume
  "$PY" -m cospress export "$run" --out "$run/export"
done

# 3. kNN evaluation (one GPU): the teacher, then both students with fidelity to the teacher
"$PY" -m cospress knn-eval --config $HERE/eval.yaml --model $TEACHER_SPEC --fidelity-teacher none \
  --out $RUNS/eval-teacher
for method in cospress cosine; do
  "$PY" -m cospress knn-eval --config $HERE/eval.yaml --model "$RUNS/$method-vits14-to-vitti14/export" \
    --fidelity-teacher $TEACHER_SPEC --out "$RUNS/eval-$method"
done
