"""Benchmark: end-to-end extraction speed vs the bare teacher forward, measured side by side.

Both sides see the same images (the same replayed views), the same batch and the same dtype. The
ratio (end-to-end images/s / bare forward images/s) says how much of the teacher's speed the
pipeline keeps: decoding, view replay, float16 conversion, compression and writing all overlap
with the teacher or cost time here.

    python pipelines/bench/bench_extract.py --limit 2048 --workers 1 --out bench-extract.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cospress  # noqa: E402, F401  first: it sets the OpenMP wait policy before torch loads, as the CLI does

# isort: split

import torch  # noqa: E402
from bench_common import random_teacher_weights  # noqa: E402

from cospress.data.sources import open_source  # noqa: E402
from cospress.extract import ExtractConfig, run_extract  # noqa: E402
from cospress.extract.reader import ViewDataset  # noqa: E402
from cospress.models.teachers import build_teacher  # noqa: E402
from cospress.runtime import autocast, autocast_dtype, pick_device, tune_malloc  # noqa: E402


def bare_forward(teacher, batches: list[torch.Tensor], device, amp) -> float:
    """Images/s of the teacher alone over pre-made uint8 batches (no data loading)."""
    n = sum(b.shape[0] for b in batches)
    with torch.inference_mode(), autocast(device, amp):
        teacher(batches[0].to(device))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            feats = teacher(b.to(device))
            feats.cls.float().cpu()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist:train")
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument(
        "--random-teacher", action="store_true", help="random-init teacher weights (timing only, no download)"
    )
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--limit", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    tune_malloc()  # as every cospress stage does: both sides of the ratio run with it

    device = pick_device("auto")
    weights = None
    if args.random_teacher:
        weights = random_teacher_weights(
            Path(tempfile.mkdtemp(prefix="bench-teacher-")), args.teacher, args.image_size
        )
    cfg = ExtractConfig(
        weights=weights,
        data=args.data,
        teacher=args.teacher,
        image_size=args.image_size,
        views=args.views,
        limit=args.limit,
        workers=args.workers,
        batch_size=args.batch_size,
        shard_size=512,
    )
    amp = autocast_dtype(cfg.precision, device)
    teacher = build_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size).to(device)
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    source = open_source(cfg.data, limit=cfg.limit)
    ds = ViewDataset(source, cfg.policy(), cfg.seed, cfg.views, False, teacher.input_size, cfg.max_pixels)
    views = torch.cat([ds[i]["images"] for i in range(len(ds))])
    per = max(1, cfg.batch_size // cfg.views) * cfg.views
    batches = list(views.split(per))

    bare, e2e = [], []
    for r in range(args.repeats):
        bare.append(bare_forward(teacher, batches, device, amp))
        with tempfile.TemporaryDirectory() as tmp:
            cfg.out = os.path.join(tmp, "store")
            summary = run_extract(cfg)
        e2e.append(summary["images"] * cfg.views / summary["seconds"])
        print(
            f"repeat {r}: bare forward {bare[-1]:.0f} views/s, extract end to end {e2e[-1]:.0f} views/s "
            f"(reading {summary['seconds_reading']:.1f}s, teacher {summary['seconds_teacher']:.1f}s, "
            f"writing {summary['seconds_writing']:.1f}s)"
        )
    result = {
        "teacher": cfg.teacher + (" (random weights)" if args.random_teacher else ""),
        "image_size": cfg.image_size,
        "views": cfg.views,
        "images": len(ds),
        "batch_views": per,
        "workers": cfg.workers,
        "device": str(device),
        "dtype": str(amp),
        "bare_views_per_s": statistics.median(bare),
        "extract_views_per_s": statistics.median(e2e),
        "ratio": statistics.median(e2e) / statistics.median(bare),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
