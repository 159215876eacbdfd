#!/usr/bin/env python
"""The reuse study: how often can a stored view be shown before a cached student falls behind online?

    .venv/bin/python pipelines/reuse_study/run.py --out runs/reuse-study [--ks 1,10,3] [--passes 100]
        [--seeds 0] [--extra-seeds k1:1,online:1] [--refresh 0.25 --refresh-seeds 0,1] [--write-doc FILE]

Reuse = epochs x R / K: how many times each stored view is shown over a run. The views study
(pipelines/views_study/) held it at <= 12; the paper's ImageNet recipe over a K = 10 store is ~90.
Here every arm trains the same steps with the same R on few images for many epochs:

- data: Fashion-MNIST, ``--train-per-class`` (40) training images of each class (400), exactly
  stratified (``pipelines/fashion_mnist/make_stratified.py``), all of them trained on
  (``--val-fraction 0``); the kNN bank is ``--bank`` (2,000) of the views study's 10,000 training
  images (``knn-eval --limit-train``), the queries its 2,000 test images;
- teacher efficientnet_lite0 at 112 px (16 tokens + CLS); student ViT-Ti/16 with 6 blocks at 64 px,
  random init;
- ``k{K}``: ``cospress extract-teacher --views K`` (view seed 0 for every store), then ``cospress
  distill --store`` with R (1) views of each image per batch: reuse = passes / K;
- ``online``: ``cospress distill --teacher`` with the same R: every epoch draws R fresh views;
- ``k{K}r{F}`` (``--refresh F``, K = the first of ``--ks``): the K store with ``distill --refresh F``:
  a fraction F of every batch's views drawn fresh and run through the store's teacher, the rest read
  from the store (stored views shown passes x (1 - F) / K times, passes x F fresh views per image);
- every arm: ``--passes`` (100) views of every image in all (epochs = passes / R), batch 200, 20%
  warm-up, cosine, AdamW 5e-4; then ``cospress knn-eval`` (kNN k = 20, T = 0.07 over classes 0-4,
  classes 5-9 held out as near-OOD, Spearman rho and 10-NN overlap to the teacher on the test images).

CLI calls only, each in its own process; a step whose output exists is skipped, so rerunning
continues where it stopped. Wall times per step in ``OUT/times.json``; the table in
``OUT/results.md``; the plot in ``OUT/reuse_study.png``.
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
DEPTH = 6  # the 6-block ViT-Ti/16 of the one-hour recipe: half the student's cost


class Study:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.out = a, Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "commands.log"
        self.times_path = self.out / a.times  # a second lane running beside the first writes its own file
        self.times = {}
        for path in sorted(self.out.glob("times*.json")):  # every lane's wall times
            self.times.update(json.loads(path.read_text()))
        self.times = {
            **self.times,
            **(json.loads(self.times_path.read_text()) if self.times_path.exists() else {}),
        }
        self.train_data, self.eval_data = Path(a.data).resolve(), Path(a.eval_data).resolve()
        self.train_src = f"folder:{self.train_data / 'train'}"
        self.bank_src, self.test_src = (
            f"folder:{self.eval_data / 'train'}",
            f"folder:{self.eval_data / 'test'}",
        )

    def timed(self, name: str, *args: str) -> float:
        if name not in self.times:
            self.times[name] = cli(*args, log=self.log)
            self.times_path.write_text(json.dumps(self.times, indent=1))
        return self.times[name]

    def make_data(self) -> None:
        script = ROOT / "pipelines" / "fashion_mnist" / "make_stratified.py"
        if not (self.eval_data / "test").is_dir():
            subprocess.run([sys.executable, str(script), "--out", str(self.eval_data)], check=True)
        if not (self.train_data / "test").is_dir():
            subprocess.run(
                [sys.executable, str(script), "--out", str(self.train_data),
                 "--train-per-class", str(self.a.train_per_class), "--test-per-class", "1"],
                check=True,
            )  # fmt: skip

    def store(self, k: int) -> Path:
        store = self.out / f"store-k{k}"
        self.timed(
            f"extract-k{k}", "extract-teacher", "--data", self.train_src, "--teacher", TEACHER,
            "--image-size", str(TEACHER_SIZE), "--views", str(k), "--seed", "0", "--shard-size", "1000",
            "--workers", "1", "--out", str(store), "--no-progress",
        )  # fmt: skip
        return store

    def distill(self, arm: str, seed: int) -> Path:
        run, r, (k, refresh) = self.out / f"{arm}-s{seed}", self.a.r, arm_parts(arm)
        epochs = self.a.passes // r
        common = [
            "--student", STUDENT, "--student-size", str(STUDENT_SIZE), "--student-kwargs", f"depth={DEPTH}",
            "--batch-size", str(self.a.batch),
            "--views-per-image", str(r), "--epochs", str(epochs), "--warmup-epochs", f"{0.2 * epochs:g}",
            "--val-fraction", "0", "--workers", "1", "--seed", str(seed), "--out", str(run), "--no-progress",
        ]  # fmt: skip
        if arm == "online":
            source = ["--teacher", TEACHER, "--image-size", str(TEACHER_SIZE), "--data", self.train_src]
        else:
            source = ["--store", str(self.store(k))] + (["--refresh", f"{refresh:g}"] if refresh else [])
        if not (run / "export" / "student.json").exists():
            resume = ["--resume"] if (run / "last.json").exists() else []
            self.timed(f"distill-{arm}-s{seed}", "distill", *source, *common, *resume)
            cli("export", str(run), "--out", str(run / "export"), log=self.log)
        return run / "export"

    def evaluate(self, name: str, model: str) -> dict:
        out = self.out / f"eval-{name}"
        if not (out / "report.json").exists():
            fidelity = "none" if name == "teacher" else f"teacher:{TEACHER}@{TEACHER_SIZE}"
            self.timed(
                f"eval-{name}", "knn-eval", "--model", model, "--train", self.bank_src, "--test", self.test_src,
                "--ood-classes", "5,6,7,8,9", "--protocol", "dino", "--k", "10,20,100,200",
                "--temperature", "0.07", "--crop-pct", "1.0", "--no-robustness", "--fidelity-teacher", fidelity,
                "--limit-train", str(self.a.bank), "--workers", "1", "--cache-dir", str(self.out / "embedding-cache"),
                "--out", str(out),
            )  # fmt: skip
        return json.loads((out / "report.json").read_text())

    def steps(self, arm: str, seed: int) -> int:
        metrics = self.out / f"{arm}-s{seed}" / "metrics.jsonl"
        rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
        return sum(1 for r in rows if r.get("phase") == "train")


def arm_parts(arm: str) -> tuple[int | None, float]:
    """(K, refresh F) of an arm name: ``online`` -> (None, 0), ``k3`` -> (3, 0), ``k1r0.25`` -> (1, 0.25)."""
    if arm == "online":
        return None, 0.0
    k, _, f = arm[1:].partition("r")
    return int(k), float(f or 0.0)


def row(study: Study, arm: str, seed: int, report: dict) -> dict:
    t, a = study.times, study.a
    k, refresh = arm_parts(arm)
    return {
        "arm": arm,
        "seed": seed,
        "reuse": None if k is None else a.passes * (1.0 - refresh) / k,
        "refresh": refresh,
        "fresh_per_image": a.passes * (1.0 if k is None else refresh),
        **metrics(report),
        "steps": study.steps(arm, seed),
        "distill_s": t.get(f"distill-{arm}-s{seed}"),
        "extract_s": t.get(f"extract-k{k}", 0.0),
        "eval_s": t.get(f"eval-{arm}-s{seed}"),
    }


def plan(a: argparse.Namespace) -> list[tuple[str, int]]:
    """(arm, seed) in run order: every arm at the first seed (the first K, online, the other Ks), then the extra seeds."""
    arms = [f"k{k}" for k in a.ks.split(",")]
    arms[1:1] = [] if a.no_online else ["online"]  # online right after the highest-reuse arm
    first = [(arm, s) for s in (int(x) for x in a.seeds.split(",")) for arm in arms]
    extra = [(arm, int(s)) for arm, s in (e.split(":") for e in a.extra_seeds.split(",") if e)]
    if a.refresh:  # the hybrid arm on the highest-reuse store
        extra += [(f"k{a.ks.split(',')[0]}r{a.refresh:g}", int(s)) for s in a.refresh_seeds.split(",") if s]
    return first + [e for e in extra if e not in first]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reuse-study")
    p.add_argument("--data", default="data/fashion-mnist-400", help="training images (made if absent)")
    p.add_argument(
        "--eval-data", default="data/fashion-mnist-10k", help="kNN bank + queries (made if absent)"
    )
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--ks", default="1,10,3", help="cached arms: K views per image (run in this order)")
    p.add_argument("--r", type=int, default=1, help="R: views of each image per batch, every arm")
    p.add_argument("--passes", type=int, default=100, help="views of every image over the run (epochs x R)")
    p.add_argument(
        "--batch", type=int, default=200, help="views per batch (200 = half the 400 images at R = 1)"
    )
    p.add_argument("--bank", type=int, default=2000, help="kNN bank: this many of the eval training images")
    p.add_argument("--seeds", default="0")
    p.add_argument("--extra-seeds", default="k1:1,online:1", help="arm:seed pairs run after the first seed")
    p.add_argument("--no-online", action="store_true")
    p.add_argument(
        "--refresh",
        type=float,
        default=None,
        help="also the hybrid arm: the first K's store with distill --refresh F",
    )
    p.add_argument("--refresh-seeds", default="0,1", help="seeds of the --refresh arm")
    p.add_argument("--write-doc", default=None)
    p.add_argument("--times", default="times.json", help="wall-time file in OUT (all times*.json are read)")
    a = p.parse_args()
    study = Study(a)
    study.make_data()
    teacher = study.evaluate("teacher", f"teacher:{TEACHER}@{TEACHER_SIZE}")
    rows = []
    for arm, seed in plan(a):
        report = study.evaluate(f"{arm}-s{seed}", str(study.distill(arm, seed)))
        rows.append(row(study, arm, seed, report))
        save_rows(study.out, teacher, rows)
    text = table(rows, teacher, a)
    write_results(study.out, text, lambda path: plot(rows, teacher, path), "reuse_study.png", a.write_doc)


def _reuse(r: dict) -> str:
    if r["reuse"] is None:
        return "fresh"
    fresh = r.get("fresh_per_image") if r.get("refresh") else None
    return f"{r['reuse']:.3g}" + (f" + {fresh:g} fresh" if fresh else "")


def table(rows: list[dict], teacher: dict, a: argparse.Namespace) -> str:
    lines = [
        f"| arm | reuse | seed | steps | {METRIC_COLUMNS} | distill min | store min | eval min |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        times = f"{r['distill_s'] / 60:.1f} | {r['extract_s'] / 60:.1f} | {(r['eval_s'] or 0) / 60:.1f}"
        lines.append(f"| {r['arm']} | {_reuse(r)} | {r['seed']} | {r['steps']} | {row_cells(r)} | {times} |")
    lines += ["", f"| arm | reuse | seeds | {METRIC_COLUMNS} |", "|" + "---|" * 8]
    lines.append(f"| teacher @112 | — | — | {teacher_cells(teacher)} |")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {_reuse(rs[0])} | {len(rs)} | {summary_cells(rs)} |")
    setup = (
        f"Reuse study: {a.passes} views of every training image per run ({a.passes // a.r} epochs at R = {a.r}, "
        f"batch {a.batch}), {a.train_per_class} training images per class, student ViT-Ti/16 depth {DEPTH} @64; "
        f"kNN bank {a.bank} images; reuse = epochs x R / K."
    )
    return setup + "\n\n" + "\n".join(lines) + "\n"


def plot(rows: list[dict], teacher: dict, path: Path) -> None:
    cached = [r for r in rows if r["reuse"] is not None and not r.get("refresh")]
    hybrid = [r for r in rows if r.get("refresh")]
    reuses = sorted({r["reuse"] for r in cached})

    def draw(ax, key: str) -> None:
        ax.scatter([r["reuse"] for r in cached], [r[key] for r in cached], color="tab:blue", s=14)
        means = [statistics.mean(r[key] for r in cached if r["reuse"] == u) for u in reuses]
        ax.plot(reuses, means, "-o", color="tab:blue", label="cached (K views)")
        for f, color in zip(
            sorted({r["refresh"] for r in hybrid}), ("tab:green", "tab:purple", "tab:red"), strict=False
        ):
            rs = [r for r in hybrid if r["refresh"] == f]
            ax.scatter([r["reuse"] for r in rs], [r[key] for r in rs], color=color, marker="^", s=30,
                       label=f"K = {rs[0]['arm'][1:].partition('r')[0]} + --refresh {f:g} (stored reuse)")  # fmt: skip
        online = [r[key] for r in rows if r["reuse"] is None]
        if online:
            lo, hi, mid = min(online), max(online), statistics.mean(online)
            ax.axhspan(lo, hi if hi > lo else lo + 1e-9, color="tab:orange", alpha=0.25)
            label = f"online, fresh views ({len(online)} seeds: band = range)"
            ax.axhline(mid, color="tab:orange", ls="--", label=label)
        ax.set_xscale("log")
        ax.set_xticks(reuses, [f"{u:.3g}" for u in reuses])
        ax.set_xlabel("reuse = epochs x R / K (times each stored view is shown)")

    plot_metrics(path, teacher, draw, legend_size=7)


if __name__ == "__main__":
    main()
