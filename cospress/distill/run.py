"""Stage 2 runner: train a student from a feature store (CosPress or a feature-distillation baseline).

Reads cached teacher targets and the recorded view parameters from a store, replays each view
of the source image at the student's size, and trains. Online mode (``--teacher``, no store): the same
loop, with fresh views each step and the teacher run on them (:mod:`cospress.distill.online`). Methods:

- ``cospress``: compressor h (LayerNorm + Linear) and the student trained jointly in one AdamW; h
  learns only from the local + global similarity KL, the student only from the cosine terms against
  stop-grad h(t). With ``compressor_first`` h is fitted on the store features alone (no images)
  first, then frozen.
- ``cosine`` / ``mse`` / ``smooth-l1``: the student + a linear head Ds -> Dt regressing the teacher.

When the teacher's token grid differs from the student's, the local term still runs on the teacher's
native tokens; only the student's token-cosine target (h(t), or the teacher for the baselines) is
moved to the student's grid (area pooling down, bilinear up). The global term is computed on the CLS vectors of the whole global batch,
all-gathered across DDP ranks with gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cospress import checkpoint as ckpt
from cospress import runtime
from cospress.data.device_decode import resolve_decode
from cospress.distill.config import DistillConfig, parse_kwargs
from cospress.distill.data import (
    TrainData,
    _Lazy,
    check_batch,
    epoch_loader,
    key_index,
    split_rows,
)
from cospress.distill.model import DistillModel, Schedule, compile_student, make_optimizer, train_step
from cospress.distill.online import load_refresh_teacher
from cospress.distill.prefetch import prefetch, prepare_batch
from cospress.distill.refresh import check_refresh
from cospress.distill.reuse import ReuseLog
from cospress.distill.state import (
    MetricsLog,
    RunState,
    restore_optimizer,
    resume,
    save_run,
    start_run_folder,
    store_entry,
    train_row,
)
from cospress.distill.streaming import attach_stream, check_stream_resume, stream_loader
from cospress.distill.val import validate_epoch
from cospress.errors import ConfigError
from cospress.loggers import open_loggers

log = logging.getLogger(__name__)


def run_distill(cfg: DistillConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train a student from a store (or online); returns a summary (steps, best/last kNN accuracy, paths, speed).

    ``progress(done_views, total_views)`` is called after every step on rank 0. Under torchrun every
    rank calls this; torch.distributed is initialised (and torn down) here unless already initialised.
    """
    cfg = prepare(cfg)  # the settings, once, before anything loads
    runtime.tune_malloc()
    was_init = torch.distributed.is_available() and torch.distributed.is_initialized()
    ctx = runtime.init_distributed(cfg.device)
    try:
        return train(cfg, ctx, progress)
    finally:
        if ctx.enabled and not was_init:
            runtime.teardown_distributed()


def train(
    cfg: DistillConfig, ctx: runtime.DistContext, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """The stage 2 loop on this rank, top to bottom; returns :func:`run_distill`'s summary."""
    out, device, decode = Path(cfg.out), ctx.device, resolve_decode(cfg.decode, ctx.device)
    log.info("image decode: %s (%s)", decode, device)
    # set-up data
    data = open_train_data(cfg, ctx.world, device)
    prep = functools.partial(prepare_batch, size=cfg.student_size, device=device, targets=not data.online)
    fresh = data.online or data.refresh  # the teacher of the fresh views (online: all; --refresh: F of them)
    schedule = Schedule.for_run(cfg, data.steps_per_epoch)
    # set-up model (the same init on every rank; then seed + rank, so drop-path masks differ per rank)
    model = build_model(cfg, data, device, rank=ctx.rank)
    # resume
    at, state = _resume(cfg, out, model, data)
    reuse = start_run(cfg, out, data, model, at, resumed=state is not None, ctx=ctx)
    with MetricsLog(out / "metrics.jsonl", ctx.is_main, sinks=open_loggers(cfg, ctx.is_main)) as metrics:
        # optimizer (with compressor_first: the compressor is fitted and frozen first)
        opt = make_optimizer(model, cfg, data, fit=state is None, log_metric=metrics.write)
        save = functools.partial(
            save_run, out=out, model=model, opt=opt, cfg=cfg, at=at, schedule=schedule, enabled=ctx.is_main
        )
        if state is not None:
            restore_optimizer(opt, state, rank=ctx.rank)
        elif cfg.compressor_first:
            save("last")  # the fitted compressor survives a kill
        dmodel, grids = _ddp(model, ctx), (data.grid_t, tuple(model.student.grid))
        # the loop
        t_start, views_done, last = time.perf_counter(), 0, {}
        while at.epoch < cfg.epochs:
            loader_of = stream_loader if data.stream is not None else epoch_loader
            plan, loader = loader_of(data, cfg, ctx, at.epoch, at.position, decode)
            t0 = time.perf_counter()
            for ready in prefetch(loader, prep, device):  # k+1 is decoded + sent up while k trains
                batch, t_data, lr = ready.batch, time.perf_counter() - t0, schedule(at.step)
                teacher = ready.teacher if fresh is None else fresh.features(batch, device, ready.teacher)
                losses = train_step(dmodel, opt, ready.images, teacher, lr, cfg, data.use_tokens, grids)
                at.step, at.position = at.step + 1, int(batch["step"]) + 1
                views_done += cfg.batch_size
                metrics.add_train(train_row(at, lr, cfg.batch_size, t_data, time.perf_counter() - t0), losses)
                if progress is not None and ctx.is_main:
                    progress(at.step * cfg.batch_size, schedule.total * cfg.batch_size)
                if cfg.save_every and at.step % cfg.save_every == 0 and at.position < len(plan):
                    metrics.flush()  # the rows up to the checkpoint are on disk before it
                    save("last")
                t0 = time.perf_counter()
            at.epoch, at.position, last = at.epoch + 1, 0, metrics.flush()
            reuse.epoch_done(at.epoch - 1, at.step, metrics.write)
            # validation + best (rank 0)
            if ctx.is_main:
                row = validate_epoch(model, data, cfg, device, decode, epoch=at.epoch - 1, step=at.step)
                better = at.record(row)
                metrics.write(row)
                if better:
                    save("best")
            # save
            save("last")
            runtime.barrier()
    speed = views_done / (time.perf_counter() - t_start) if views_done else 0.0
    return summary(cfg, ctx, data, at, last, speed)


def _resume(cfg: DistillConfig, out: Path, model: DistillModel, data: TrainData) -> tuple[RunState, Any]:
    """:func:`~cospress.distill.state.resume`, then refuse settings that would reshape a streamed epoch."""
    at, state = resume(cfg, out, model, targets_header(data)["store"])
    check_stream_resume(data, cfg, state)
    return at, state


# --------------------------------------------------------------------------- set-up
def start_run(
    cfg: DistillConfig,
    out: Path,
    data: TrainData,
    model: DistillModel,
    at: RunState,
    *,
    resumed: bool,
    ctx: runtime.DistContext,
) -> ReuseLog:
    """The run folder's header (rank 0), then the reuse accounting: its start-up line, a row per epoch."""
    if ctx.is_main:
        start_run_folder(cfg, out, targets_header(data), model.student, at if resumed else None)
    return ReuseLog(cfg, data, out, at.epoch, ctx.is_main)


def prepare(cfg: DistillConfig) -> DistillConfig:
    """The settings checked once, before anything loads: alone (``cfg.validate()``), then the batch
    against the store (or online: ``--data``); :func:`run_distill` calls it first. Returns ``cfg`` with
    ``views_per_image`` resolved (None: min(3, stored views); 3 online, each view fresh).

    A store read from a URL needs ``--data``: the image source recorded in a published store is not
    opened (it could point a reader anywhere).
    """
    cfg.validate()
    if cfg.teacher is not None and not cfg.refresh:  # online (with --refresh, --teacher names the store's)
        views = stored = _online_views(cfg)
    else:
        views, stored = cfg.views_per_image, _stored_views(cfg)
        if views is None:
            views = min(3, stored)
            log.info(
                "views per image (R): %d = min(3, the store's %d stored views); set --views-per-image to change it",
                views, stored,
            )  # fmt: skip
    check_batch(cfg.batch_size, views, stored, runtime.dist_info()[1])  # the one check of the batch shape
    return dataclasses.replace(cfg, views_per_image=views)


def _stored_views(cfg: DistillConfig) -> int:
    """The store's stored views (a URL store needs --data); ``--refresh`` checked against the store."""
    from cospress.store.reader import StoreReader
    from cospress.store.remote import is_local

    if not cfg.data and not is_local(str(cfg.store)):
        raise ConfigError(
            "the store is read from a URL: pass --data with its image source "
            "(the source recorded in a published store is not opened)"
        )
    reader = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
    if cfg.refresh:
        check_refresh(cfg, reader)
    return reader.stored_views


def _online_views(cfg: DistillConfig) -> int:
    """R of online mode (default 3): --data needed, no --store."""
    if not cfg.data:
        raise ConfigError("online mode (--teacher) reads its images from --data: pass --data")
    if cfg.store != DistillConfig.store:
        raise ConfigError("--teacher trains online and reads no store: drop --store (or --teacher)")
    return 3 if cfg.views_per_image is None else cfg.views_per_image


def open_train_data(cfg: DistillConfig, world: int, device: torch.device | None = None) -> TrainData:
    """Open the store and its image source, split the rows, pick the kNN rows (``cfg``: :func:`prepare`'s).

    Online mode (``cfg.teacher``): the source of ``--data`` and the teacher (on ``device``) instead.
    """
    from cospress.data.policy import stored_policy
    from cospress.data.sources import open_source
    from cospress.store.reader import StoreReader

    if cfg.teacher is not None and not cfg.refresh:
        return _open_online(cfg, device or torch.device("cpu"))

    reader = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
    reader.check_identity(expect_teacher=cfg.expect_teacher)
    stored_policy(reader.manifest.get("view_policy"), reader.num_params, reader.display)  # replayable?
    spec = cfg.data or (reader.manifest.get("source") or {}).get("spec")
    if not spec:
        raise ConfigError(
            "the store manifest names no image source; pass --data with the source it was made from"
        )
    use_tokens = bool(cfg.use_tokens and reader.has_tokens)
    if cfg.use_tokens and not reader.has_tokens:
        log.warning("the store keeps no tokens: the local and token terms are off (CLS only)")
    keys = reader.keys()
    rows = _rows(cfg, keys, reader.valid(), reader.labels())
    source = open_source(spec)
    split = rows["split"]
    source_index = key_index(keys, source.keys(), np.concatenate([split.train, split.val]), source.shown)
    data = TrainData(
        reader=reader,
        lazy=_Lazy(cfg.store, cfg.cache_dir, spec, source=source),
        source_index=source_index,
        grid_t=_teacher_grid(reader),
        use_tokens=use_tokens,
        **rows,
    )
    if not data.knn:
        log.info("no labelled validation rows: kNN validation is off, best = last")
    attach_stream(data, cfg, world)
    if cfg.refresh:  # the store's teacher, for the fresh views (prepare refused the stream reader)
        data.refresh = load_refresh_teacher(cfg, reader, use_tokens, device or torch.device("cpu"))
    log.info(
        "store %s: %d rows (%d train, %d val), stored views=%d, Dt=%d, tokens=%s; source %s",
        reader.display, reader.num_rows, len(split.train), len(split.val),
        reader.stored_views, reader.dim, use_tokens, source.shown,
    )  # fmt: skip
    return data


def _rows(cfg: DistillConfig, keys: list[str], valid: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The row split, the kNN bank and query rows and the steps per epoch (TrainData fields)."""
    split = split_rows(keys, valid, cfg.val_fraction)
    images_per_batch = cfg.batch_size // cfg.views_per_image
    if len(split.train) < images_per_batch:
        raise ConfigError(
            f"{len(split.train)} training images cannot fill one batch of {images_per_batch} images; "
            "lower batch_size or val_fraction, or use more images"
        )
    bank = np.random.default_rng([cfg.seed, 0xBA2C]).permutation(split.train)
    return {
        "split": split,
        "labels": labels,
        "bank_rows": np.sort(bank[labels[bank] >= 0][: cfg.val_bank]),
        "val_rows": split.val[labels[split.val] >= 0],
        "steps_per_epoch": len(split.train) // images_per_batch,
    }


def _open_online(cfg: DistillConfig, device: torch.device) -> TrainData:
    """Online mode's TrainData: rows are the source positions of --data, targets from the teacher."""
    from cospress.data.sources import open_source
    from cospress.distill.online import load_online_teacher

    source = open_source(cfg.data, limit=cfg.limit)
    keys = source.keys()
    rows = _rows(cfg, keys, np.ones(len(keys), bool), np.asarray(source.labels(), dtype=np.int64))
    teacher = load_online_teacher(cfg, keys, device)
    data = TrainData(
        reader=None,
        lazy=_Lazy(None, None, cfg.data, source=source, limit=cfg.limit),
        source_index=np.arange(len(keys), dtype=np.int64),
        grid_t=teacher.grid,
        use_tokens=teacher.tokens,
        online=teacher,
        **rows,
    )
    log.info(
        "online: teacher %s at %d px, %d images (%d train, %d val) of %s, R=%d fresh views per image",
        cfg.teacher, teacher.views.teacher_size, len(keys), len(rows["split"].train), len(rows["split"].val),
        source.shown, cfg.views_per_image,
    )  # fmt: skip
    return data


def targets_header(data: TrainData) -> dict[str, Any]:
    """The run header's "teacher" and "store" entries (store None online)."""
    if data.online is not None:
        return {"teacher": data.online.describe(), "store": None}
    teacher = data.reader.manifest.get("teacher")
    if data.refresh is not None:  # --refresh: how the fresh views are drawn
        v = data.refresh.views
        teacher = {**teacher, "refresh": {"fraction": v.fraction, "seed": v.seed, "first_view": v.offset}}
    return {"teacher": teacher, "store": store_entry(data.reader)}


def _teacher_grid(reader: Any) -> tuple[int, int]:
    """The teacher's token grid (h, w): from the manifest, else the squarest one of num_tokens."""
    side = max(int(math.isqrt(max(reader.num_tokens, 1))), 1)
    grid = (reader.manifest.get("teacher") or {}).get("grid") or (side, reader.num_tokens // side)
    return (int(grid[0]), int(grid[1]))


def build_model(cfg: DistillConfig, data: TrainData, device: torch.device, rank: int = 0) -> DistillModel:
    """The student + compressor (or head), seeded with ``cfg.seed`` so every rank builds the same init;
    the RNGs are then seeded with ``cfg.seed + rank`` for the rest (drop-path masks, any other draw)."""
    from cospress.models.students import build_student
    from cospress.models.timm_features import set_attention

    runtime.seed_everything(cfg.seed)
    student = build_student(cfg.student, cfg.student_size, cfg.pretrained, **parse_kwargs(cfg.student_kwargs))
    dt = data.online.dim if data.online else data.reader.dim
    model = DistillModel(student, cfg.method, dt, cfg.compressor).to(device)
    runtime.seed_everything(cfg.seed + rank)
    model.amp_dtype = runtime.autocast_dtype(cfg.precision, device)
    kernel = set_attention(student, cfg.attention, device)
    if kernel != "n/a":
        log.info("student attention: %s (--attention %s)", kernel, cfg.attention)
    if cfg.compile:
        compile_student(model)  # training only: validation runs the plain module (no recompiles)
        log.info("the student is compiled with torch.compile for training (the first steps are slow)")
    if data.use_tokens and tuple(student.grid) != data.grid_t:
        log.info(
            "teacher grid %s, student grid %s: the local term runs on the teacher's grid, the token target "
            "is pooled (area) or interpolated (bilinear) to the student's",
            data.grid_t,
            tuple(student.grid),
        )
    return model


def _ddp(model: nn.Module, ctx: runtime.DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else as it is."""
    if not ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
    )


def summary(
    cfg: DistillConfig, ctx: runtime.DistContext, data: TrainData, at: RunState, last: dict, speed: float
) -> dict[str, Any]:
    """What :func:`run_distill` returns: steps, best / last validation, the last train row, views/s, paths."""
    out = Path(cfg.out)
    return {
        "out": str(out),
        "rank": ctx.rank,
        "world": ctx.world,
        "steps": at.step,
        "epochs": cfg.epochs,
        "method": cfg.method,
        "use_tokens": data.use_tokens,
        "best_epoch": at.best_epoch,
        "best_knn_accuracy": at.best_metric,
        "history": at.history,
        "last": last,
        "images_per_second": speed,
        "checkpoints": {
            "last": str(ckpt.paths(out, "last")[0]),
            "best": str(ckpt.paths(out, "best")[0]),
        },
    }
