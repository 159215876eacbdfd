#!/usr/bin/env bash
# Fashion-MNIST recipe, the best student in an hour: 10k stratified train / 2k test, efficientnet_lite0
# @ 112 (K = 8 views) -> ViT-Ti/16 @ 64, 45 epochs; CosPress, then cosine feature distillation at the
# same budget. About 3 minutes for the store and 50 per distill run on 2 CPU cores, ~2 hours in all
# with the evaluations. Rerun to resume. Wall time of every stage goes to runs/fmnist/times.tsv.
#   bash pipelines/fashion_mnist/run.sh            (from the repository root; SEEDS="0 1" for two seeds)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
HERE=pipelines/fashion_mnist
STORE=stores/fmnist-10k-lite0-112-k8
RUNS=runs/fmnist
SEEDS=${SEEDS:-"0"}
TEACHER_SPEC=teacher:efficientnet_lite0@112
mkdir -p $RUNS

# timed NAME CMD...: run CMD, append "NAME<TAB>seconds" to $RUNS/times.tsv
timed() {
  local name=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  printf '%s\t%.1f\n' "$name" "$(echo "$t1 - $t0" | bc)" | tee -a $RUNS/times.tsv
}

# 0. the stratified image folders (1,000 / 200 per class), once
"$PY" $HERE/make_stratified.py --out data/fashion-mnist-10k

# 1. the teacher store: resumes shard by shard if interrupted
timed extract "$PY" -m cospress extract-teacher --config $HERE/extract.yaml --out $STORE
"$PY" -m cospress verify $STORE
timed eval-teacher "$PY" -m cospress knn-eval --config $HERE/eval.yaml --model $TEACHER_SPEC --fidelity-teacher none --out $RUNS/eval-teacher

# 2. students, CosPress first and then the cosine baseline at the same budget; a finished run (its last
#    epoch validated) is exported again, an interrupted one resumed; each is evaluated against the teacher
for method in cospress cosine; do
  for seed in $SEEDS; do
    run=$RUNS/$method-seed$seed
    timed "distill-$method-seed$seed" "$PY" -m cospress distill --config $HERE/distill-$method.yaml --store $STORE --seed "$seed" --out "$run" --resume
    "$PY" -m cospress export "$run" --out "$run/export"
    timed "eval-$method-seed$seed" "$PY" -m cospress knn-eval --config $HERE/eval.yaml --model "$run/export" \
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
