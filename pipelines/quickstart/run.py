#!/usr/bin/env python
"""Quickstart: the whole cospress job on Fashion-MNIST, through the `cospress` command line only.

    .venv/bin/python pipelines/quickstart/run.py [--out runs/quickstart] [--fast] [--dry-run]

1. extract-teacher: the offline efficientnet_lite0 teacher at 112 px (a 4x4 map = 16 tokens + the
   pooled vector) over K augmented views of a Fashion-MNIST train subset, into a Zarr store;
2. distill: a ViT-Tiny/16 student cut to 6 blocks (2.82 M parameters, 0.095 GFLOPs per image,
   against the teacher's 3.37 M and 0.211) at 64 px (also 16 tokens + CLS), once with CosPress and once with
   plain cosine feature distillation, from the same store;
3. export both students; knn-eval the teacher and both students on a Fashion-MNIST test subset
   (kNN k=20, T=0.07; classes 5-9 held out as near-OOD; fidelity to the teacher);
4. print one comparison table and write it to OUT/results.md, beside the plots.

Rerunning the same command reuses what is finished: the store resumes shard by shard, a distill run
whose last epoch is validated is skipped (an interrupted one continues with --resume), and an
evaluation whose report.json exists is read back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cospress import checkpoint

TEACHER = "efficientnet_lite0"
TEACHER_SIZE = 112
STUDENT = "vit_tiny_patch16_224"
STUDENT_KWARGS = "depth=6"  # ViT-Ti/16 with 6 of its 12 blocks: fewer parameters and FLOPs than the teacher
STUDENT_SIZE = 64
METHODS = ("cospress", "cosine")
OOD_CLASSES = "5,6,7,8,9"

# Sized on the 2-core build machine: `full` took 5.2 minutes alone on 2 cores with AVX-512 BF16 (bf16
# autocast), 8 beside another training run (extract 1.5 min, each distill of the 6-block ViT-Ti 2.5-2.7,
# each evaluation 0.3-0.5); the 12-block ViT-Ti of earlier versions took 9.2 minutes on idle AMX
# cores. `fast` takes about 1 minute.
SIZES = {
    "full": {"train": 6000, "views": 4, "epochs": 4, "warmup": 0.5, "batch": 192, "test": 1000},
    "fast": {"train": 256, "views": 3, "epochs": 1, "warmup": 0.3, "batch": 96, "test": 200},
}


def cospress(*args: str) -> list[str]:
    """The command line of `cospress ARGS` in this interpreter's environment."""
    return [sys.executable, "-m", "cospress", *args]


def stage_commands(out: Path, size: dict, workers: int) -> dict[str, list[str]]:
    """Every CLI call of the quickstart, by name (extract, distill-*, export-*, eval-*)."""
    cmds = {
        "extract": cospress(
            "extract-teacher",
            "--data", "fashion-mnist:train",
            "--limit", str(size["train"]),
            "--teacher", TEACHER,
            "--image-size", str(TEACHER_SIZE),
            "--views", str(size["views"]),
            "--workers", str(workers),
            "--out", str(out / "store"),
        ),
    }  # fmt: skip
    for m in METHODS:
        cmds[f"distill-{m}"] = cospress(
            "distill",
            "--store", str(out / "store"),
            "--method", m,
            "--student", STUDENT,
            "--student-kwargs", STUDENT_KWARGS,
            "--student-size", str(STUDENT_SIZE),
            "--epochs", str(size["epochs"]),
            "--warmup-epochs", str(size["warmup"]),
            "--batch-size", str(size["batch"]),
            "--views-per-image", "3",
            "--workers", str(workers),
            "--out", str(out / f"distill-{m}"),
        )  # fmt: skip
        cmds[f"export-{m}"] = cospress(
            "export", str(out / f"distill-{m}"), "--out", str(out / f"student-{m}")
        )
    models = {"teacher": f"teacher:{TEACHER}@{TEACHER_SIZE}"}
    models.update({m: str(out / f"student-{m}") for m in METHODS})
    for name, spec in models.items():
        cmds[f"eval-{name}"] = cospress(
            "knn-eval",
            "--model", spec,
            "--train", "fashion-mnist:train",
            "--limit-train", str(size["train"]),
            "--test", "fashion-mnist:test",
            "--limit-test", str(size["test"]),
            "--ood-classes", OOD_CLASSES,
            "--protocol", "dino",
            "--k", "10,20,100,200",
            "--temperature", "0.07",
            "--crop-pct", "1.0",
            "--no-robustness",
            "--no-attack",
            "--linear",
            "--fidelity-teacher", "none" if name == "teacher" else models["teacher"],
            "--workers", str(workers),
            "--cache-dir", str(out / "embedding-cache"),
            "--out", str(out / f"eval-{name}"),
        )  # fmt: skip
    return cmds


def distill_finished(run: Path, epochs: int) -> bool:
    """True when the run's best checkpoint exists and its last epoch has been validated."""
    metrics = run / "metrics.jsonl"
    if not checkpoint.exists(run, "best") or not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("phase") == "val" and int(row.get("epoch", -1)) >= epochs - 1:
            return True
    return False


def run_stage(name: str, cmd: list[str], env: dict, log: list) -> None:
    print(f"\n== {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    seconds = time.perf_counter() - t0
    log.append((name, seconds))
    if rc != 0:
        sys.exit(f"quickstart: `{name}` failed (exit {rc}); fix the error above and rerun to resume")


def row_of(name: str, report: dict) -> dict:
    data = report.get("data") or {}
    embedded = [data[s] for s in ("train", "test") if s in data and not data[s].get("cache_hit")]
    secs = sum(d.get("embed_seconds") or 0.0 for d in embedded)
    count = sum(d.get("count") or 0 for d in embedded)
    fid = report.get("fidelity") or {}
    return {
        "features": name,
        "top1": report.get("top1"),
        "linear": (report.get("linear") or {}).get("top1"),
        "auroc": report.get("auroc"),
        "fpr95": 100 * report["fpr95"] if report.get("fpr95") is not None else None,
        "spearman": 1.0 if name.startswith("teacher") else fid.get("spearman"),
        "overlap": 1.0 if name.startswith("teacher") else fid.get("knn10_overlap"),
        "params": (report.get("model") or {}).get("params"),
        "gflops": (report.get("model") or {}).get("gflops_per_image"),
        "ips": count / secs if secs else None,
    }


COLUMNS = (
    ("features", "features", "{}"),
    ("top1", "kNN top-1 %", "{:.2f}"),
    ("linear", "linear top-1 %", "{:.2f}"),
    ("auroc", "OOD AUROC", "{:.3f}"),
    ("fpr95", "FPR95 %", "{:.1f}"),
    ("spearman", "Spearman ρ", "{:.3f}"),
    ("overlap", "10-NN overlap", "{:.3f}"),
    ("params", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs / image", "{:.3f}"),
    ("ips", "images/s", "{:.0f}"),
)


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "—"
    return fmt.format(value / 1e6 if key == "params" else value)


def table_text(rows: list[dict]) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(k, f, r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(k, f, r[k]) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=None, help="output folder [default: runs/quickstart, or runs/quickstart-fast]"
    )
    parser.add_argument("--fast", action="store_true", help="a ~2-minute smoke run (tiny subset, 1 epoch)")
    parser.add_argument("--workers", type=int, default=1, help="loader processes per stage [default: 1]")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sizing and the commands, run nothing"
    )
    args = parser.parse_args(argv)
    kind = "fast" if args.fast else "full"
    size = SIZES[kind]
    out = Path(args.out or ("runs/quickstart-fast" if args.fast else "runs/quickstart"))
    cmds = stage_commands(out, size, args.workers)
    runs = len(METHODS)
    print(
        f"quickstart ({kind}): {size['train']:,} Fashion-MNIST training images, {size['views']} views each "
        f"(teacher {TEACHER} @ {TEACHER_SIZE} px), {runs} students ({STUDENT} {STUDENT_KWARGS} @ {STUDENT_SIZE} px) x "
        f"{size['epochs']} epoch(s), batch {size['batch']}, evaluated on {size['test']:,} test images: "
        "a small run; see pipelines/fashion_mnist for the full recipe.\n"
        f"output: {out}",
        flush=True,
    )
    if args.dry_run:
        for name, cmd in cmds.items():
            print(f"{name}: {shlex.join(cmd)}")
        return 0

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    t_all = time.perf_counter()
    timings: list[tuple[str, float]] = []
    out.mkdir(parents=True, exist_ok=True)
    run_stage("extract", cmds["extract"], env, timings)  # resumes: committed shards are skipped
    for m in METHODS:
        run_dir = out / f"distill-{m}"
        if distill_finished(run_dir, size["epochs"]):
            print(f"\n== distill-{m}: finished run in {run_dir}, reused")
        else:
            run_stage(f"distill-{m}", cmds[f"distill-{m}"] + ["--resume"], env, timings)
        run_stage(f"export-{m}", cmds[f"export-{m}"], env, timings)
    reports: dict[str, dict] = {}
    for name in ("teacher", *METHODS):
        report_path = out / f"eval-{name}" / "report.json"
        if report_path.is_file() and (out / f"eval-{name}" / "config.yaml").is_file():
            print(f"\n== eval-{name}: {report_path} exists, reused")
        else:
            run_stage(f"eval-{name}", cmds[f"eval-{name}"], env, timings)
        reports[name] = json.loads(report_path.read_text())

    labels = {
        "teacher": f"teacher {TEACHER} @{TEACHER_SIZE}",
        "cospress": "CosPress student",
        "cosine": "cosine-FD student",
    }
    rows = [row_of(labels[n], reports[n]) for n in ("teacher", *METHODS)]

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_lines = []
    for name in ("teacher", *METHODS):
        for png in sorted((out / f"eval-{name}").glob("*.png")):
            dest = plots / f"{name}-{png.name}"
            shutil.copyfile(png, dest)
            plot_lines.append(f"![{name} {png.stem}](plots/{dest.name})")

    wall = time.perf_counter() - t_all
    text = table_text(rows)
    print(f"\n{text}\n")
    k_note = (
        f"kNN top-1 at k=20 (of 10, 20, 100, 200), T=0.07 (bank: the {size['train']:,} training images, classes 0-4); "
        "linear top-1: the best of a grid of linear probes on the bank's features (knn-eval --linear); OOD: test classes "
        f"{OOD_CLASSES} held out, score = max cosine; fidelity on the test images vs the teacher; "
        "params and GFLOPs per image (one forward at the model's input size, 2 FLOPs per multiply-add) from knn-eval's report; "
        "images/s: embedding the bank and the test set on this machine (decode + resize + forward, "
        "batch 256, one loader process)."
    )
    # stage times of earlier invocations are kept for the stages this one reused
    timings_path = out / "stage-seconds.json"
    recorded = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for n, secs in timings:  # a resumed extract only checks the shards: keep the time that wrote them
        recorded[n] = max(secs, recorded.get(n, 0.0)) if n == "extract" else round(secs, 1)
    timings_path.write_text(json.dumps(recorded, indent=1))
    order = [n for n in cmds if n in recorded]
    stage_lines = [f"| {n} | {recorded[n]:.0f} |" for n in order]
    stage_lines.append(f"| sum of stages | {sum(recorded[n] for n in order):.0f} |")
    md = "\n".join(
        [
            "# cospress quickstart",
            "",
            f"{size['train']:,} Fashion-MNIST training images x {size['views']} views, teacher `{TEACHER}` @ "
            f"{TEACHER_SIZE} px, students `{STUDENT}` ({STUDENT_KWARGS}) @ {STUDENT_SIZE} px, {size['epochs']} epoch(s), batch "
            f"{size['batch']}; {size['test']:,} test images. A small run: the reference setup and its numbers "
            "are in pipelines/fashion_mnist/README.md.",
            "",
            table_markdown(rows),
            "",
            k_note,
            "",
            "## Stage wall times (s; a reused stage keeps the time of the run that made it)",
            "",
            "| stage | seconds |",
            "|---|---|",
            *stage_lines,
            f"| total (this invocation) | {wall:.0f} |",
            "",
            "## Plots",
            "",
            *plot_lines,
            "",
        ]
    )
    (out / "results.md").write_text(md)
    print(k_note)
    print(f"wrote {out / 'results.md'} and {len(plot_lines)} plots in {plots} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
