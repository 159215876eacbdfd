"""Benchmark knn-eval's peak resident memory, with and without --robustness (issue 16, point 6).

    python pipelines/bench/bench_eval_memory.py --work /tmp/evalmem --out bench_eval_memory.json

Writes Fashion-MNIST images as PNG into class folders (--train-images from the train split, the
bank; --test-images from the test split, the queries), then runs, each in a child process,

    cospress knn-eval --model teacher:efficientnet_lite0 --train folder:A --test folder:B
                      --ood-classes 5,6,7,8,9 --out R [--robustness]

and reads the child's peak resident set size with os.wait4 (resource usage of that child and
its waited-for descendants: the largest one, not a sum; DataLoader workers are smaller than the
main process). The teacher runs at its default 224 px. The embedding cache is off (--cache-dir
none), so every run embeds: a cache hit would hide the forward passes.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cospress.data.sources import open_source
from cospress.utils import atomic_write_json


def write_folder(spec: str, count: int, out: Path) -> Path:
    """The first `count` images of a source as PNGs in class folders named by the class number."""
    if out.is_dir() and sum(1 for _ in out.rglob("*.png")) == count:
        return out
    src = open_source(spec)
    for i in range(count):
        sample = src.load(i)
        folder = out / str(sample.label)
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{i:05d}.png")
    return out


def run_child(argv: list[str], log_path: Path) -> dict:
    """Run argv; (exit code, seconds, peak RSS in MB of the child) via os.wait4."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {  # ru_maxrss is in kilobytes on Linux
        "rc": os.waitstatus_to_exitcode(status),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "log": str(log_path),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/cospress-eval-memory", help="folder for images, reports, logs")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--model", default="teacher:efficientnet_lite0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="default,robustness", help="default and/or robustness")
    p.add_argument("--extra", default="", help="more knn-eval flags, space separated")
    p.add_argument("--out", default="bench_eval_memory.json")
    args = p.parse_args(argv)

    work = Path(args.work)
    train = write_folder("fashion-mnist:train", args.train_images, work / "A")
    test = write_folder("fashion-mnist:test", args.test_images, work / "B")
    base = [sys.executable, "-m", "cospress", "knn-eval", "--model", args.model]
    base += ["--train", f"folder:{train}", "--test", f"folder:{test}", "--ood-classes", "5,6,7,8,9"]
    base += ["--device", args.device, "--cache-dir", "none", "--no-progress", *args.extra.split()]
    runs = {}
    for mode in args.modes.split(","):
        flags = ["--robustness"] if mode == "robustness" else []
        runs[mode] = run_child([*base, "--out", str(work / f"report-{mode}"), *flags], work / f"{mode}.log")
        print(f"{mode}: {runs[mode]}", flush=True)
    result = {
        "command": " ".join(base[2:]),
        "train_images": args.train_images,
        "test_images": args.test_images,
        "runs": runs,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
