"""Benchmark stage 2: cached distillation vs the bare student step, and vs online distillation.

Three phases, each the real code path, timed per step:

- **bare**: ``distill.model.train_step`` (student + compressor + losses + AdamW) on one batch of
  uint8 images and targets already in memory: no data loading at all;
- **cached**: ``run_distill`` from a store (store reads, view replay in ``--workers`` loader
  processes, the same step): what ``cospress distill --store`` does;
- **online**: ``run_distill`` with ``--teacher`` and no store (fresh views replayed at the
  teacher's and the student's size, the teacher in inference mode every step, the same step):
  what ``cospress distill --teacher`` does, on the same images.

The machine is shared and its speed drifts, so the phases are **interleaved**: ``--repeats``
rounds of (bare, cached, online), the order rotated every round, after one untimed warm-up
round. Each phase's rate is the median over its steps after the first two (a run's loader and
allocator warm up there). Each ratio (cached / bare, cached / online) is computed within a round,
so both sides saw the same load, and reported as the median and spread over the rounds.

    python pipelines/bench/bench_distill.py --images 768 --steps 8 [--repeats 5] --out bench-distill.json

``--teacher vit_small_patch14_dinov2 --teacher-size 224 --random-teacher`` times what GPU users
run (random weights: the same cost, no download).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cospress  # noqa: E402, F401  first: it sets the OpenMP wait policy before torch loads, as the CLI does

# isort: split

import torch  # noqa: E402
from bench_common import random_teacher_weights  # noqa: E402

from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill.model import make_optimizer, train_step  # noqa: E402
from cospress.distill.run import build_model, open_train_data, prepare  # noqa: E402
from cospress.models.features import Features  # noqa: E402
from cospress.runtime import autocast_dtype, tune_malloc  # noqa: E402

WARMUP_STEPS = 2  # steps of every phase left out of its median


def make_store(path: Path, a: argparse.Namespace, teacher: dict) -> str:
    from cospress.extract import ExtractConfig, run_extract
    from cospress.store import is_complete

    if not is_complete(path):
        cfg = ExtractConfig(
            data="fashion-mnist:train", teacher=teacher["name"], weights=teacher["weights"],
            image_size=teacher["size"], views=a.views, limit=a.images, workers=a.workers,
            batch_size=128, shard_size=128, out=str(path),
        )  # fmt: skip
        run_extract(cfg)
    return str(path)


class Bare:
    """The training step alone: one batch of random uint8 images and targets kept in memory; the model
    and optimizer are stage 2's own (`distill.run.build_model`, `distill.model.make_optimizer`)."""

    def __init__(self, cfg: DistillConfig) -> None:
        device = torch.device("cpu")
        cfg = prepare(cfg)
        data = open_train_data(cfg, 1, device)
        self.model = build_model(cfg, data, device)
        self.opt = make_optimizer(self.model, cfg, data, fit=True, log_metric=lambda row: None)
        b, s, dt, grid_t = cfg.batch_size, cfg.student_size, data.reader.dim, data.grid_t
        self.images = torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8)
        self.teacher = Features(cls=torch.randn(b, dt), tokens=torch.randn(b, grid_t[0] * grid_t[1], dt))
        self.cfg, self.grids = cfg, (grid_t, tuple(self.model.student.grid))

    def rates(self, steps: int) -> list[float]:
        out = []
        for i in range(steps + WARMUP_STEPS):
            t0 = time.perf_counter()
            losses = train_step(
                self.model, self.opt, self.images, self.teacher, self.cfg.lr, self.cfg, True, self.grids
            )
            float(losses["total"])  # the step is finished when its loss can be read
            if i >= WARMUP_STEPS:
                out.append(self.cfg.batch_size / (time.perf_counter() - t0))
        return out


def run_rates(cfg: DistillConfig, steps: int) -> list[float]:
    """Views/s of each step of one ``run_distill`` call (a fresh run folder, removed after), its
    warm-up steps left out."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    run_distill(cfg)
    rates = timed_rates(Path(cfg.out), steps)
    shutil.rmtree(cfg.out, ignore_errors=True)
    return rates


def timed_rates(out: Path, steps: int) -> list[float]:
    """Views/s of the first ``steps`` training steps after the warm-up in run folder ``out``'s metrics."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("phase") == "train"][WARMUP_STEPS:]
    if len(rates) < steps:
        raise SystemExit(f"a run has {len(rates)} timed steps, fewer than --steps {steps}: raise --images")
    return rates[:steps]


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q[0],
        "q3": q[2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--views", type=int, default=6, help="K of the store")
    ap.add_argument("--views-per-image", type=int, default=3, help="R of every phase")
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each phase in each round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of (bare, cached, online)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--teacher-size", type=int, default=112)
    ap.add_argument("--random-teacher", action="store_true", help="random-init teacher weights (timing only)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--work", default=None, help="folder for the store and runs [default: a temp folder]")
    ap.add_argument("--out", default="bench-distill.json")
    a = ap.parse_args()
    tune_malloc()  # as every cospress stage does: all phases run with it
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-distill-"))
    teacher = {"name": a.teacher, "size": a.teacher_size, "weights": None}
    if a.random_teacher:
        teacher["weights"] = random_teacher_weights(work, a.teacher, a.teacher_size)
    store = make_store(work / "store", a, teacher)
    common = dict(
        student="vit_tiny_patch16_224", student_size=64, batch_size=a.batch_size, views_per_image=a.views_per_image,
        epochs=1, workers=a.workers, precision=a.precision, val_fraction=0.0,
    )  # fmt: skip
    online_source = dict(
        teacher=a.teacher, weights=teacher["weights"], image_size=a.teacher_size,
        data="fashion-mnist:train", limit=a.images,
    )  # fmt: skip
    bare = Bare(DistillConfig(store=store, **common))
    phases = {
        "bare": lambda n, tag: bare.rates(n),
        "cached": lambda n, tag: run_rates(
            DistillConfig(store=store, out=str(work / f"cached-{tag}"), **common), n
        ),
        "online": lambda n, tag: run_rates(
            DistillConfig(out=str(work / f"online-{tag}"), **common, **online_source), n
        ),
    }
    names = list(phases)
    rounds: list[dict[str, float]] = []
    for r in range(a.repeats + 1):  # round 0 warms up (imports, page cache, allocator) and is not kept
        order = names[r % 3 :] + names[: r % 3]
        rates = {name: statistics.median(phases[name](a.steps, f"r{r}")) for name in order}
        print(
            f"round {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()),
            flush=True,
        )
        if r:
            rounds.append(rates)
    ratio_bare = [x["cached"] / x["bare"] for x in rounds]
    ratio_online = [x["cached"] / x["online"] for x in rounds]
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": a.batch_size,
        "views_per_image": a.views_per_image,
        "workers": a.workers,
        "student": "vit_tiny_patch16_224@64",
        "teacher": f"{a.teacher}@{a.teacher_size}" + (" (random weights)" if a.random_teacher else ""),
        "precision": str(autocast_dtype(a.precision, torch.device("cpu")) or "fp32"),
        "rounds": rounds,
        "views_per_s": {name: spread([x[name] for x in rounds]) for name in names},
        "cached_over_bare": spread(ratio_bare),
        "cached_over_online": spread(ratio_online),
        "note": "phases interleaved, order rotated per round; ratios within a round; median and spread over rounds",
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for name in names:
        s = result["views_per_s"][name]
        print(f"{name:7s} {s['median']:7.1f} views/s (rounds {s['min']:.1f}-{s['max']:.1f})")
    for key in ("cached_over_bare", "cached_over_online"):
        s = result[key]
        print(
            f"{key} = {s['median']:.2f} (rounds {s['min']:.2f}-{s['max']:.2f}, IQR {s['q1']:.2f}-{s['q3']:.2f})"
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
