#!/usr/bin/env python
"""A small near / far OOD suite on Fashion-MNIST, built from data that installs offline, and
knn-eval (with the linear probe) of the teacher and any students on it, through the CLI only.

    .venv/bin/python pipelines/ood_suite/run.py [--out runs/ood-suite] [--student PATH ...]
        [--limit-train 2000] [--limit-test 1000] [--workers 1] [--dry-run]

In-distribution: Fashion-MNIST classes 0-4 (Debian's dataset-fashion-mnist), bank from the train
split, queries from the test split.
  near  heldout_classes: the test images of classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot),
        held out of the bank with --ood-classes;
  far   digits: scikit-learn's bundled handwritten digits (sklearn.datasets.load_digits, 1,797 8x8
        images, 0-16 ink levels), upscaled to 28 px as white-on-black PNGs like Fashion-MNIST;
  far   photos: 28 px grey crops of scikit-learn's two bundled photos (load_sample_images).
Both far sets ship inside scikit-learn (the test extra); nothing is downloaded. Each model gets one
report (eval-NAME/report.md: a row per set, the mean of near and of far, the linear probe beside kNN)
and OUT/results.md gets one table across the models.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

TEACHER = "teacher:efficientnet_lite0@112"
OOD_CLASSES = "5,6,7,8,9"
SIZE = 28
PHOTO_CROPS = 500


def write_digits(folder: Path, limit: int) -> None:
    """sklearn's 8x8 digits, upscaled to SIZE px (nearest), as folder/digit_N/i.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images[:limit], digits.target[:limit], strict=True)):
        d = folder / f"digit_{label}"
        d.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        image.resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(d / f"{i:04d}.png")


def write_photo_crops(folder: Path, count: int, seed: int = 0) -> None:
    """`count` random grey crops (56-160 px, resized to SIZE) of sklearn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p).convert("L") for p in load_sample_images().images]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(56, 161))
        x, y = (int(rng.integers(0, n - side)) for n in photo.size)
        crop = photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        crop.save(folder / f"{i:04d}.png")


def build_suite(out: Path, limit: int) -> dict[str, Path]:
    """The far sets as PNG folders under OUT/suite (kept when already there)."""
    sets = {"digits": out / "suite" / "digits", "photos": out / "suite" / "photos"}
    if not sets["digits"].is_dir():
        write_digits(sets["digits"], limit)
    if not sets["photos"].is_dir():
        write_photo_crops(sets["photos"], min(limit, PHOTO_CROPS))
    return sets


def eval_command(args: argparse.Namespace, name: str, model: str, sets: dict[str, Path]) -> list[str]:
    return [
        sys.executable, "-m", "cospress", "knn-eval",
        "--model", model,
        "--train", "fashion-mnist:train", "--limit-train", str(args.limit_train),
        "--test", "fashion-mnist:test", "--limit-test", str(args.limit_test),
        "--ood-classes", OOD_CLASSES,
        *(a for n, p in sets.items() for a in ("--ood", f"far:{n}=folder:{p}")),
        "--ood-k", "50", "--linear",
        "--k", "10,20,100,200", "--temperature", "0.07", "--crop-pct", "1.0",
        "--no-robustness", "--fidelity-teacher", "none",
        "--workers", str(args.workers),
        "--cache-dir", str(args.out / "embedding-cache"),
        "--out", str(args.out / f"eval-{name}"),
    ]  # fmt: skip


def table(reports: dict[str, dict]) -> str:
    """One row per model: kNN and linear top-1, then AUROC (k-th-NN score) per set and per group."""
    first = next(iter(reports.values()))
    kth = next(s for s in first["ood"] if s != "max_cos")
    sets, groups = list(first["ood_sets"]), list(first.get("ood_groups", {}))
    head = ["model", "kNN top-1 %", "linear top-1 %", *sets, *(f"{g} mean" for g in groups)]
    lines = [
        f"AUROC of the {kth} score (max_cos in each report.md)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for name, r in reports.items():
        cells = [name, f"{r['top1']:.1f}", f"{r['linear']['top1']:.1f}"]
        cells += [f"{r['ood_sets'][s][kth]['auroc']:.3f}" for s in sets]
        cells += [f"{r['ood_groups'][g]['mean'][kth]['auroc']:.3f}" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ood-suite"))
    parser.add_argument("--student", action="append", default=[], help="exported student or run folder")
    parser.add_argument("--limit-train", type=int, default=2000)
    parser.add_argument("--limit-test", type=int, default=1000, help="test images, and images per far set")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, write nothing")
    args = parser.parse_args(argv)
    models = {"teacher": TEACHER, **{Path(s).name: s for s in args.student}}
    far = {"digits": args.out / "suite" / "digits", "photos": args.out / "suite" / "photos"}
    cmds = {name: eval_command(args, name, spec, far) for name, spec in models.items()}
    if args.dry_run:
        for name, cmd in cmds.items():
            print(f"eval-{name}: {shlex.join(cmd)}")
        return
    build_suite(args.out, args.limit_test)
    reports = {}
    for name, cmd in cmds.items():
        report_path = args.out / f"eval-{name}" / "report.json"
        if not report_path.is_file():
            subprocess.run(cmd, check=True)
        reports[name] = json.loads(report_path.read_text())
    text = table(reports)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
