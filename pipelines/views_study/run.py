#!/usr/bin/env python
"""The views study: does a student trained from K cached views per image match online distillation?

    .venv/bin/python pipelines/views_study/run.py --out runs/views-study [--ks 1,2,4,8] [--seeds 0,1]
        [--passes 12] [--write-doc docs/results-views.md]

Fashion-MNIST, 10,000 training images (1,000 per class) and 2,000 test images (200 per class),
exactly stratified by ``pipelines/fashion_mnist/make_stratified.py``; teacher efficientnet_lite0 at
112 px (16 tokens + CLS); student ViT-Ti/16 at 64 px. Arms:

- ``k{K}``: ``cospress extract-teacher --views K`` once per K (view seed 0, the same for every
  arm, so the K = 4 store holds the first 4 views of the K = 8 one), then ``cospress distill
  --store`` with R = min(3, K) views of each image per batch;
- ``online``: ``cospress distill --teacher`` with R = 3: every epoch draws R fresh views of every
  image (the views of epoch 0 are views 0..R-1 of the stores).

Every arm trains the same number of steps of 192 views: ``--passes`` views of every training image
in all (12 = 4 epochs at R = 3, 6 at R = 2, 12 at R = 1), with the first 20% of the steps as
warm-up. Then ``cospress knn-eval``: kNN k = 20, T = 0.07 over classes 0-4 (5-9 held out as the
near-OOD set, score = max cosine), fidelity (Spearman ρ, 10-NN overlap) to the teacher on the
test images. Only the command line is called; each step is skipped when its output exists, so
rerunning continues where it stopped. Wall times are per step; a store's extraction is charged to
its arm once and shared by its seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from study import (  # noqa: E402  (pipelines/tools/study.py: what the studies share)
    METRIC_COLUMNS,
    ROOT,
    cli,
    metrics,
    plot_metrics,
    row_cells,
    save_rows,
    summary_cells,
    teacher_cells,
    write_results,
)  # fmt: skip

TEACHER, TEACHER_SIZE = "efficientnet_lite0", 112
STUDENT, STUDENT_SIZE = "vit_tiny_patch16_224", 64
BATCH, MAX_R = 192, 3


class Study:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.out = a, Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "commands.log"
        self.times_path = self.out / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
        self.data = Path(a.data).resolve()
        self.train_src, self.test_src = f"folder:{self.data / 'train'}", f"folder:{self.data / 'test'}"

    def timed(self, name: str, *args: str) -> float:
        """Run a CLI step once; its wall time is kept in times.json (a rerun reads it back)."""
        if name not in self.times:
            self.times[name] = cli(*args, log=self.log)
            self.times_path.write_text(json.dumps(self.times, indent=1))
        return self.times[name]

    def make_data(self) -> None:
        if not (self.data / "test").is_dir():
            script = ROOT / "pipelines" / "fashion_mnist" / "make_stratified.py"
            subprocess.run([sys.executable, str(script), "--out", str(self.data)], check=True)

    def store(self, k: int) -> Path:
        store = self.out / f"store-k{k}"
        self.timed(
            f"extract-k{k}", "extract-teacher", "--data", self.train_src, "--teacher", TEACHER,
            "--image-size", str(TEACHER_SIZE), "--views", str(k), "--seed", "0", "--shard-size", "1000",
            "--workers", "1", "--out", str(store), "--no-progress", *self.a.extract_args,
        )  # fmt: skip
        return store

    def schedule(self, r: int) -> list[str]:
        epochs = self.a.passes // r
        return ["--views-per-image", str(r), "--epochs", str(epochs), "--warmup-epochs", f"{0.2 * epochs:g}"]

    def distill(self, arm: str, seed: int) -> Path:
        run = self.out / f"{arm}-s{seed}"
        common = [
            "--student", STUDENT, "--student-size", str(STUDENT_SIZE), "--batch-size", str(BATCH),
            "--val-bank", "2000", "--workers", "1", "--seed", str(seed), "--out", str(run), "--no-progress",
        ]  # fmt: skip
        if arm == "online":
            source = ["--teacher", TEACHER, "--image-size", str(TEACHER_SIZE), "--data", self.train_src]
            r = MAX_R
        else:
            k = int(arm[1:])
            source, r = ["--store", str(self.store(k))], min(MAX_R, k)
        if not (run / "export" / "student.json").exists():
            resume = ["--resume"] if (run / "last.json").exists() else []
            self.timed(f"distill-{arm}-s{seed}", "distill", *source, *common, *self.schedule(r), *resume,
                       *self.a.distill_args)  # fmt: skip
            cli("export", str(run), "--out", str(run / "export"), log=self.log)
        return run / "export"

    def evaluate(self, name: str, model: str) -> dict:
        out = self.out / f"eval-{name}"
        if not (out / "report.json").exists():
            fidelity = "none" if name == "teacher" else f"teacher:{TEACHER}@{TEACHER_SIZE}"
            self.timed(
                f"eval-{name}", "knn-eval", "--model", model, "--train", self.train_src, "--test", self.test_src,
                "--ood-classes", "5,6,7,8,9", "--protocol", "dino", "--k", "10,20,100,200",
                "--temperature", "0.07", "--crop-pct", "1.0", "--no-robustness", "--fidelity-teacher", fidelity,
                "--workers", "1", "--cache-dir", str(self.out / "embedding-cache"), "--out", str(out),
            )  # fmt: skip
        return json.loads((out / "report.json").read_text())

    def steps(self, arm: str, seed: int) -> int:
        metrics = self.out / f"{arm}-s{seed}" / "metrics.jsonl"
        rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
        return sum(1 for r in rows if r.get("phase") == "train")


def row(study: Study, arm: str, seed: int, report: dict) -> dict:
    t = study.times
    extract = t.get(f"extract-{arm}", 0.0) / len(study.a.seeds)
    return {"arm": arm, "seed": seed, **metrics(report), "steps": study.steps(arm, seed),
            "distill_s": t.get(f"distill-{arm}-s{seed}"), "extract_share_s": extract}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/views-study")
    p.add_argument("--data", default="data/fashion-mnist-10k", help="stratified folders (made if absent)")
    p.add_argument("--ks", default="1,2,4,8", help="cached arms: K views per image")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--no-online", action="store_true", help="leave out the online arm")
    p.add_argument("--passes", type=int, default=12, help="views of every training image over the run")
    p.add_argument(
        "--extract-args", default="", help="extra extract-teacher flags, e.g. '--token-codec int8'"
    )
    p.add_argument("--distill-args", default="", help="extra distill flags for every arm")
    p.add_argument("--write-doc", default=None, help="also write the markdown section to this file")
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.extract_args, a.distill_args = a.extract_args.split(), a.distill_args.split()
    arms = [f"k{k}" for k in a.ks.split(",")] + ([] if a.no_online else ["online"])
    study = Study(a)
    study.make_data()
    teacher = study.evaluate("teacher", f"teacher:{TEACHER}@{TEACHER_SIZE}")
    rows = []
    for seed in a.seeds:  # every arm of seed 0 first: a partial study already compares the arms
        for arm in arms:
            report = study.evaluate(f"{arm}-s{seed}", str(study.distill(arm, seed)))
            rows.append(row(study, arm, seed, report))
            save_rows(study.out, teacher, rows)
    text = table(rows, teacher, a)
    write_results(study.out, text, lambda path: plot(rows, teacher, path), "views_study.png", a.write_doc)


def table(rows: list[dict], teacher: dict, a: argparse.Namespace) -> str:
    lines = [
        f"| arm | seed | steps | {METRIC_COLUMNS} | distill min | + store share min |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        times = f"{r['distill_s'] / 60:.1f} | {r['extract_share_s'] / 60:.1f}"
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {row_cells(r)} | {times} |")
    lines += ["", f"| arm | seeds | {METRIC_COLUMNS} |", "|" + "---|" * 7]
    lines.append(f"| teacher @112 | — | {teacher_cells(teacher)} |")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {len(rs)} | {summary_cells(rs)} |")
    setup = (
        f"Views study: {a.passes} views of every training image per run (batch {BATCH}, R = min(3, K)), "
        f"seeds {','.join(map(str, a.seeds))}; extra extract flags {' '.join(a.extract_args) or 'none'}, "
        f"extra distill flags {' '.join(a.distill_args) or 'none'}."
    )
    return setup + "\n\n" + "\n".join(lines) + "\n"


def plot(rows: list[dict], teacher: dict, path: Path) -> None:
    cached = sorted({int(r["arm"][1:]) for r in rows if r["arm"] != "online"})

    def draw(ax, key: str) -> None:
        for k in cached:
            vals = [r[key] for r in rows if r["arm"] == f"k{k}"]
            ax.scatter([k] * len(vals), vals, color="tab:blue", s=14)
        means = [statistics.mean(r[key] for r in rows if r["arm"] == f"k{k}") for k in cached]
        ax.plot(cached, means, "-o", color="tab:blue", label="cached K views")
        online = [r[key] for r in rows if r["arm"] == "online"]
        if online:
            ax.axhline(statistics.mean(online), color="tab:orange", ls="--", label="online (fresh views)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cached, [str(k) for k in cached])
        ax.set_xlabel("K (cached views per image)")

    plot_metrics(path, teacher, draw)


if __name__ == "__main__":
    main()
