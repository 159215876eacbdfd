#!/usr/bin/env bash
# Fashion-MNIST reference recipe: 10k stratified train / 2k test, efficientnet_lite0 @ 112 -> ViT-Ti/16 @ 64,
# CosPress vs cosine feature distillation, 2 seeds each. About 8 minutes per distill run (and ~6 for
# the store) on 2 CPU cores; ~1.5 hours in all with the evaluations. Rerun to resume.
#   bash pipelines/fashion_mnist/run.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
HERE=pipelines/fashion_mnist
STORE=stores/fmnist-10k-lite0-112
RUNS=runs/fmnist
SEEDS=${SEEDS:-"0 1"}
TEACHER_SPEC=teacher:efficientnet_lite0@112


# 0. the stratified image folders (1,000 / 200 per class), once
"$PY" $HERE/make_stratified.py --out data/fashion-mnist-10k

# 1. the teacher store: resumes shard by shard if interrupted
"$PY" -m cospress extract-teacher --config $HERE/extract.yaml --out $STORE
"$PY" -m cospress verify $STORE

# 2. students; a finished run (its last epoch validated) is exported again, an interrupted one resumed
for method in cospress cosine; do
  for seed in $SEEDS; do
    run=$RUNS/$method-seed$seed
    "$PY" -m cospress distill --config $HERE/distill-$method.yaml --store $STORE --seed "$seed" --out "$run" --resume
    "$PY" -m cospress export "$run" --out "$run/export"
  done
done

# 3. evaluations: the teacher, then each student (fidelity measured against the teacher)
"$PY" -m cospress knn-eval --config $HERE/eval.yaml --model $TEACHER_SPEC --fidelity-teacher none --out $RUNS/eval-teacher
for method in cospress cosine; do
  for seed in $SEEDS; do
    "$PY" -m cospress knn-eval --config $HERE/eval.yaml --model "$RUNS/$method-seed$seed/export" \
      --fidelity-teacher $TEACHER_SPEC --out "$RUNS/eval-$method-seed$seed"
  done
done

# 4. one line per model
"$PY" - "$RUNS" <<'PYEOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
print(f"{'model':28s} {'top-1 %':>8s} {'AUROC':>7s} {'FPR95 %':>8s} {'Spearman':>9s} {'10-NN':>6s}")
for rep in sorted(runs.glob("eval-*/report.json")):
    r = json.loads(rep.read_text()); f = r.get("fidelity") or {}
    sp, ov = f.get("spearman", 1.0), f.get("knn10_overlap", 1.0)
    print(f"{rep.parent.name:28s} {r['top1']:8.2f} {r['auroc']:7.3f} {100 * r['fpr95']:8.1f} {sp:9.3f} {ov:6.3f}")
PYEOF
