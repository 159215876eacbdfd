"""Benchmark stage 2: cached distillation vs a bare student step, and vs online distillation.

(a) distill images/s with cached targets (``run_distill``: real store, replay, DataLoader with
    ``--workers``) divided by the bare training step (student + compressor + loss + AdamW) on the same
    batch with no data loading. Target >= 0.8 with 1 worker at 64 px.
(b) cached distill divided by online distill: a training loop that runs the teacher every step. Its
    DataLoader (same workers, same rows and view indices as the cached run) draws each view like
    extraction does and replays it twice, at the teacher's size and the student's 64 px; the main
    process runs the teacher forward (inference, bf16 autocast, channels_last) and then the same
    training step. Target >= 2x.
Same teacher (default efficientnet_lite0 at 112 px), student (vit_tiny_patch16_224 at 64 px), batch,
precision and student attention kernel. ``--teacher vit_small_patch14_dinov2 --teacher-size 224
--random-teacher`` times what GPU users run (random weights: same cost, no download).

    python pipelines/bench/bench_distill.py --images 384 --steps 8 --out bench-distill.json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import random_teacher_weights  # noqa: E402

from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill.data import (  # noqa: E402
    BatchPlan,
    DistillBatches,
    StepSampler,
    _Lazy,
    collate_batch,
    key_index,
)
from cospress.distill.model import DistillModel, compute_losses, param_groups  # noqa: E402
from cospress.models.features import Features, resample_tokens  # noqa: E402
from cospress.models.timm_features import set_attention  # noqa: E402
from cospress.runtime import autocast, autocast_dtype, tune_malloc  # noqa: E402

TEACHER = {"name": "efficientnet_lite0", "size": 112, "weights": None}  # set from the flags in main()
LOSS_WEIGHTS = dict.fromkeys(("local", "global", "tokens", "cls"), 1.0)


def make_store(path: Path, images: int, views: int, workers: int) -> str:
    from cospress.extract import ExtractConfig, run_extract

    if not (path / "manifest.json").exists():
        cfg = ExtractConfig(
            data="fashion-mnist:train", teacher=TEACHER["name"], weights=TEACHER["weights"],
            image_size=TEACHER["size"], views=views,
            limit=images, workers=workers, batch_size=128, shard_size=128, out=str(path),
        )  # fmt: skip
        run_extract(cfg)
    return str(path)


class Trainer:
    """The student + compressor + AdamW of a run, and one training step on a batch in memory."""

    def __init__(self, cfg: DistillConfig, dt: int) -> None:
        from cospress.models.students import build_student

        self.cfg = cfg
        device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.student = build_student(cfg.student, cfg.student_size)
        set_attention(self.student, cfg.attention, device)
        self.model = DistillModel(self.student, cfg.method, dt)
        self.model.amp_dtype = autocast_dtype(cfg.precision, device)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)

    def step(self, images: torch.Tensor, teacher: Features) -> None:
        terms = compute_losses(
            self.model,
            images,
            teacher,
            method=self.cfg.method,
            temperatures=self.cfg.temperatures,
            weights=LOSS_WEIGHTS,
            use_tokens=True,
        )
        self.opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.opt.step()


def bare_step_rate(cfg: DistillConfig, dt: int, steps: int) -> float:
    """Views/s of the training step alone: random uint8 images and targets already in memory."""
    trainer = Trainer(cfg, dt)
    b = cfg.batch_size
    images = torch.randint(0, 255, (b, 3, cfg.student_size, cfg.student_size), dtype=torch.uint8)
    teacher = Features(cls=torch.randn(b, dt), tokens=torch.randn(b, trainer.student.num_tokens, dt))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.step(images, teacher)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return b / statistics.median(times)


class OnlineBatches(DistillBatches):
    """An online run's data: the cached run's rows and view indices, but no targets read. Each view
    is drawn from (seed, key, view) as extraction does and replayed at the teacher's and the
    student's resolution."""

    def __init__(
        self, lazy: _Lazy, plan: BatchPlan, source_index, student_size: int, policy, seed: int
    ) -> None:
        super().__init__(lazy, plan, source_index, student_size, tokens=False)
        self.policy, self.seed = policy, seed

    def __getitem__(self, step: int) -> dict:
        from cospress.data.views import replay_view, sample_view_params

        rows, views = self.plan.rows_views(int(step))
        student, teacher = [], []
        for row, vs in zip(rows, views, strict=True):
            sample = self.lazy.source.load(int(self.source_index[int(row)]))
            w, h = sample.image.size
            for v in vs:
                p = sample_view_params(self.policy, self.seed, sample.key, int(v), w, h)
                student.append(replay_view(sample.image, p, self.student_size))
                teacher.append(replay_view(sample.image, p, TEACHER["size"]))
        return {"images": torch.stack(student), "teacher_images": torch.stack(teacher), "step": int(step)}


def online_rate(cfg: DistillConfig, store: str, steps: int) -> tuple[float, float]:
    """(views/s of online distillation, median seconds of its teacher forward per batch)."""
    from cospress.data.views import ViewPolicy
    from cospress.models.teachers import build_teacher
    from cospress.store.reader import StoreReader

    reader = StoreReader(store)
    man = reader.manifest
    trainer = Trainer(cfg, reader.dim)
    teacher = build_teacher(TEACHER["name"], weights=TEACHER["weights"], image_size=TEACHER["size"]).eval()
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    spec = man["source"]["spec"]
    lazy = _Lazy(store, None, spec)
    rows = np.arange(reader.num_rows)
    source_index = key_index(reader.keys(), lazy.source.keys(), rows, spec)
    plan = BatchPlan(
        rows, seed=cfg.seed, epoch=0, batch_size=cfg.batch_size,
        views_per_image=cfg.views_per_image, stored_views=reader.stored_views,
    )  # fmt: skip
    data = OnlineBatches(
        lazy, plan, source_index, cfg.student_size, ViewPolicy.from_dict(man["view_policy"]), man["seed"]
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=1, sampler=StepSampler(0, min(len(plan), steps + 2)), collate_fn=collate_batch,
        num_workers=cfg.workers, persistent_workers=False, prefetch_factor=2 if cfg.workers else None,
    )  # fmt: skip
    amp = trainer.model.amp_dtype
    grid_s = tuple(trainer.student.grid)
    step_times, teacher_times = [], []
    t_prev = time.perf_counter()
    for i, batch in enumerate(loader):
        t1 = time.perf_counter()
        with torch.inference_mode(), autocast(torch.device("cpu"), amp):
            f = teacher(batch["teacher_images"])
        t_teacher = time.perf_counter() - t1
        grid_t = tuple(teacher.grid)
        tokens = f.tokens.float()
        if grid_t != grid_s:
            tokens = resample_tokens(tokens, grid_t, grid_s)
        trainer.step(batch["images"], Features(cls=f.cls.float().clone(), tokens=tokens.clone()))
        now = time.perf_counter()
        if i >= 2:  # the first steps warm up the workers and the allocator
            step_times.append(now - t_prev)
            teacher_times.append(t_teacher)
        t_prev = now
    return cfg.batch_size / statistics.median(step_times), statistics.median(teacher_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each measurement")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--teacher-size", type=int, default=112)
    ap.add_argument("--random-teacher", action="store_true", help="random-init teacher weights (timing only)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--work", default=None, help="folder for the store and run [default: a temp folder]")
    ap.add_argument("--out", default="bench-distill.json")
    args = ap.parse_args()
    tune_malloc()  # as every cospress stage does: both sides of the ratio run with it
    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-distill-"))
    TEACHER.update(name=args.teacher, size=args.teacher_size)
    if args.random_teacher:
        TEACHER["weights"] = random_teacher_weights(work, args.teacher, args.teacher_size)
    store = make_store(work / "store", args.images, args.views, args.workers)
    run = work / f"run-{int(time.time())}"
    cfg = DistillConfig(
        store=store, out=str(run), student="vit_tiny_patch16_224", student_size=64, batch_size=args.batch_size,
        epochs=1, workers=args.workers, precision=args.precision, val_fraction=0.0,
    )  # fmt: skip
    summary = run_distill(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["time_step_s"] for r in rows if r.get("phase") == "train"][1:] or [float("nan")]
    cached = args.batch_size / statistics.median(step_s)
    from cospress.store.reader import StoreReader

    reader = StoreReader(store)
    bare = bare_step_rate(cfg, reader.dim, args.steps)
    online, t_teacher = online_rate(cfg, store, args.steps)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "student": "vit_tiny_patch16_224@64",
        "teacher": f"{args.teacher}@{args.teacher_size}"
        + (" (random weights)" if args.random_teacher else ""),
        "cached_images_per_s": cached,
        "bare_step_images_per_s": bare,
        "online_images_per_s": online,
        "teacher_forward_s_per_batch": t_teacher,
        "ratio_cached_over_bare": cached / bare,
        "ratio_cached_over_online": cached / online,
        "targets": {"cached_over_bare": 0.8, "cached_over_online": 2.0},
        "steps_timed": len(step_s),
        "distill_summary_images_per_s": summary["images_per_second"],
        "attention": cfg.attention,
        "note": "online = a training loop that runs the teacher on every batch (views replayed at the teacher's and the student's size in the workers)",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached {cached:.1f} img/s, bare step {bare:.1f} img/s, online {online:.1f} img/s")
    print(f"cached/bare = {result['ratio_cached_over_bare']:.2f} (target >= 0.8)")
    print(f"cached/online = {result['ratio_cached_over_online']:.2f} (target >= 2)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
