#!/usr/bin/env bash
# Fashion-MNIST recipe, the best student in an hour: 10k stratified train / 2k test, efficientnet_lite0
# @ 112 (K = 8 views) -> ViT-Ti/16 @ 64, 45 epochs; CosPress, then cosine feature distillation at the
# same budget. About 2 minutes for the store and 45 per distill run on 2 CPU cores (bf16), ~1.7 hours
# in all with the evaluations. Rerun to resume. Wall time of every stage goes to runs/fmnist/times.tsv.
#   bash pipelines/fashion_mnist/run.sh            (from the repository root; SEEDS="0 1" for two seeds)
# Variants: RUNS=DIR for another results folder, DISTILL_ARGS="..." for distill flags of both arms, e.g.
#   RUNS=runs/fmnist6 DISTILL_ARGS="--student-kwargs depth=6 --epochs 55 --warmup-epochs 5.5" bash pipelines/fashion_mnist/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
HERE=pipelines/fashion_mnist
STORE=stores/fmnist-10k-lite0-112-k8
RUNS=${RUNS:-runs/fmnist}
DISTILL_ARGS=${DISTILL_ARGS:-}
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
    timed "distill-$method-seed$seed" "$PY" -m cospress distill --config $HERE/distill-$method.yaml --store $STORE --seed "$seed" --out "$run" --resume $DISTILL_ARGS
    "$PY" -m cospress export "$run" --out "$run/export"
    timed "eval-$method-seed$seed" "$PY" -m cospress knn-eval --config $HERE/eval.yaml --model "$run/export" \
      --fidelity-teacher $TEACHER_SPEC --out "$RUNS/eval-$method-seed$seed"
  done
done

# 4. one row per model, printed and written to $RUNS/results.md (with the wall time of every stage)
"$PY" - "$RUNS" <<'PYEOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
rows = ["| model | kNN top-1 % | OOD AUROC | FPR95 % | Spearman ρ | 10-NN overlap | corruptions top-1 % | params M | GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|"]
for rep in sorted(runs.glob("eval-*/report.json")):
    r = json.loads(rep.read_text()); f = r.get("fidelity") or {}; m = r["model"]
    corr = (r.get("robustness") or {}).get("mean_corruption_top1")
    cost = [m.get("params", 0) / 1e6, m.get("gflops_per_image")]
    rows.append(f"| {rep.parent.name[5:]} | {r['top1']:.1f} | {r['auroc']:.3f} | {100 * r['fpr95']:.1f} | "
                f"{f.get('spearman', 1.0):.3f} | {f.get('knn10_overlap', 1.0):.3f} | "
                + (f"{corr:.1f}" if corr is not None else "—") + " | "
                + (f"{cost[0]:.2f} | {cost[1]:.3f} |" if cost[1] else "— | — |"))
times = runs / "times.tsv"
if times.is_file():
    rows += ["", "| stage | wall time (min) |", "|---|---|"]
    rows += [f"| {n} | {float(t) / 60:.1f} |" for n, t in (l.split("\t") for l in times.read_text().split("\n") if l)]
text = "\n".join(rows) + "\n"
(runs / "results.md").write_text(text)
print(text, end="")
PYEOF
