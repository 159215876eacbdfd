"""Stage 2 runner: train a student from a feature store (CosPress or a feature-distillation baseline).

Reads cached teacher targets and the recorded view parameters from a store, replays each view
of the source image at the student's size, and trains. Methods:

- ``cospress``: compressor h (LayerNorm + Linear) and the student trained jointly in one AdamW; h
  learns only from the local + global similarity KL, the student only from the cosine terms against
  stop-grad h(t). With ``compressor_first`` h is fitted on the store features alone (no images)
  first, then frozen.
- ``cosine`` / ``mse`` / ``smooth-l1``: the student + a linear head Ds -> Dt regressing the teacher.

Teacher tokens are resampled bilinearly to the student's grid when the grids differ (in the
teacher space, before h). The global term is computed on the CLS vectors of the whole global batch,
all-gathered across DDP ranks with gradients.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cospress import checkpoint as ckpt
from cospress import runtime
from cospress.config import save_config, to_dict
from cospress.distill.config import DistillConfig, parse_kwargs, validate
from cospress.distill.data import (
    BatchPlan,
    DistillBatches,
    RowSplit,
    StepSampler,
    _Lazy,
    check_batch,
    collate_batch,
    device_images,
    key_index,
    split_rows,
)
from cospress.distill.model import (
    DistillModel,
    compute_losses,
    fit_compressor,
    lr_at,
    param_groups,
    teacher_features,
)
from cospress.distill.val import embed_images, knn_accuracy
from cospress.errors import ConfigError
from cospress.runtime import autocast_dtype, seed_everything, tune_malloc
from cospress.utils import atomic_write_json

log = logging.getLogger(__name__)

def run_header(cfg: DistillConfig) -> dict[str, Any]:
    """Config, git sha (when the package sits in a git checkout) and package versions."""
    import timm
    import zarr

    import cospress

    sha = None
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "config": to_dict(cfg),
        "git_sha": sha,
        "versions": {
            "cospress": cospress.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
    }


def run_distill(cfg: DistillConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train a student from a store; returns a summary (steps, best/last kNN accuracy, paths, speed).

    ``progress(done_views, total_views)`` is called after every step on rank 0. Under torchrun every
    rank calls this; torch.distributed is initialised (and torn down) here unless already initialised.
    """
    tune_malloc()
    validate(cfg)
    was_init = torch.distributed.is_available() and torch.distributed.is_initialized()
    ctx = runtime.init_distributed(cfg.device)
    try:
        return _Run(cfg, ctx, progress).run()
    finally:
        if ctx.enabled and not was_init:
            runtime.teardown_distributed()


class _Run:
    """One distillation run: set-up, optional compressor fit, epochs, validation, checkpoints."""

    def __init__(self, cfg: DistillConfig, ctx: runtime.DistContext, progress: Callable | None) -> None:
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.device = ctx.device
        self.out = Path(cfg.out)
        self.amp = autocast_dtype(cfg.precision, self.device)
        from cospress.data.device_decode import resolve_decode

        self.decode = resolve_decode(cfg.decode, self.device)
        log.info("image decode: %s (%s)", self.decode, self.device)

    # ------------------------------------------------------------------ set-up
    def _setup_data(self) -> None:
        from cospress.data.sources import open_source
        from cospress.store.reader import StoreReader

        cfg = self.cfg
        self.reader = reader = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
        reader.check_identity(expect_teacher=cfg.expect_teacher)
        man = reader.manifest
        teacher = man.get("teacher") or {}
        side = max(int(math.isqrt(max(reader.num_tokens, 1))), 1)
        self.grid_t = tuple(teacher.get("grid") or (side, reader.num_tokens // side))
        spec = cfg.data or (man.get("source") or {}).get("spec")
        if not spec:
            raise ConfigError(
                "the store manifest names no image source; pass --data with the source it was made from"
            )
        self.use_tokens = bool(cfg.use_tokens and reader.has_tokens)
        if cfg.use_tokens and not reader.has_tokens:
            log.warning("the store keeps no tokens: the local and token terms are off (CLS only)")
        check_batch(cfg.batch_size, cfg.views_per_image, reader.num_views, self.ctx.world)
        keys = reader.keys()
        self.split: RowSplit = split_rows(keys, reader.valid(), cfg.val_fraction)
        ipb = cfg.batch_size // cfg.views_per_image
        if len(self.split.train) < ipb:
            raise ConfigError(
                f"{len(self.split.train)} training images cannot fill one batch of {ipb} images; "
                "lower batch_size or val_fraction, or use a larger store"
            )
        source = open_source(spec)
        need = np.concatenate([self.split.train, self.split.val])
        self.source_index = key_index(keys, source.keys(), need, spec)
        self.lazy = _Lazy(cfg.store, cfg.cache_dir, spec)
        self.lazy._source = source
        labels = reader.labels()
        val = self.split.val[labels[self.split.val] >= 0]
        rng = np.random.default_rng([cfg.seed, 0xBA2C])
        bank = rng.permutation(self.split.train)
        bank = np.sort(bank[labels[bank] >= 0][: cfg.val_bank])
        self.knn = len(val) > 0 and len(bank) > 0
        self.val_rows, self.bank_rows, self.labels = val, bank, labels
        if not self.knn:
            log.info("no labelled validation rows: kNN validation is off, best = last")
        self.steps_per_epoch = len(self.split.train) // ipb
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        log.info(
            "store %s: %d rows (%d train, %d val), K=%d, Dt=%d, tokens=%s; source %s",
            reader.display,
            reader.num_rows,
            len(self.split.train),
            len(self.split.val),
            reader.num_views,
            reader.dim,
            self.use_tokens,
            spec,
        )

    def _setup_model(self) -> None:
        from cospress.models.students import build_student
        from cospress.models.timm_features import set_attention

        cfg = self.cfg
        seed_everything(cfg.seed)  # the same init on every rank
        student = build_student(
            cfg.student, cfg.student_size, cfg.pretrained, **parse_kwargs(cfg.student_kwargs)
        )
        self.grid_s = tuple(student.grid)
        self.model = DistillModel(student, cfg.method, self.reader.dim, cfg.compressor).to(self.device)
        self.model.amp_dtype = self.amp
        kernel = set_attention(student, cfg.attention, self.device)
        if kernel != "n/a":
            log.info("student attention: %s (--attention %s)", kernel, cfg.attention)
        if cfg.compile:
            student.compile()  # in place: parameter names (and checkpoints) stay unwrapped
            log.info("the student is compiled with torch.compile (the first steps are slow)")
        if self.use_tokens and self.grid_s != self.grid_t:
            log.info(
                "teacher tokens %s are resampled bilinearly to the student's grid %s",
                self.grid_t,
                self.grid_s,
            )

    def student_info(self) -> dict[str, Any]:
        """What `cospress.export` needs to rebuild the bare timm student."""
        st = self.model.student
        return {
            "timm_name": self.cfg.student,
            "timm_kwargs": parse_kwargs(self.cfg.student_kwargs),
            "input_size": int(st.input_size),
            "mean": list(st.mean),
            "std": list(st.std),
            "dim": int(st.dim),
            "grid": list(st.grid),
            "method": self.cfg.method,
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        m = self.model
        w = ckpt.clean_state_dict(m.student.model.state_dict(), "student.")
        other = "compressor" if m.method == "cospress" else "head"
        w.update(ckpt.clean_state_dict(getattr(m, other).state_dict(), f"{other}."))
        return w

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        parts = ckpt.split_weights(weights)
        m = self.model
        m.student.model.load_state_dict(parts.get("student", {}))
        other = "compressor" if m.method == "cospress" else "head"
        getattr(m, other).load_state_dict(parts.get(other, {}))

    def _state(self, step: int, epoch: int, pos: int) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            "position": pos,
            "optimizer": self.opt.state_dict(),
            "scheduler": {
                "name": "warmup_cosine",
                "step": step,
                "warmup": self.warmup,
                "total": self.total_steps,
            },
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
            "compressor_fitted": bool(self.cfg.compressor_first),
            "best": {"metric": self.best_metric, "epoch": self.best_epoch},
            "history": list(self.history),
        }

    def _save(self, name: str, step: int, epoch: int, pos: int) -> None:
        if self.ctx.is_main:
            ckpt.save_checkpoint(self.out, name, self._weights(), self._state(step, epoch, pos))

    def _log_metric(self, row: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def _trim_metrics(self, step: int, epoch: int) -> None:
        """On resume, drop metric lines written after the checkpoint (they are recomputed)."""
        path = self.out / "metrics.jsonl"
        if not (self.ctx.is_main and path.is_file()):
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("phase") == "val" and row.get("epoch", 0) >= epoch:
                continue
            if row.get("phase") == "train" and row.get("step", 0) > step:
                continue
            keep.append(line)
        atomic_write_json_lines(path, keep)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        self._setup_data()
        self._setup_model()
        self.best_metric: float | None = None
        self.best_epoch = -1
        self.history: list[dict[str, Any]] = []
        step = epoch = pos = 0
        state = None
        if ckpt.exists(self.out, "last"):
            if not cfg.resume:
                raise ConfigError(
                    f"{self.out} already holds a run (last.safetensors); pass --resume to continue it "
                    "or choose another --out"
                )
            weights, state = ckpt.load_checkpoint(self.out, "last")
            self._load_weights(weights)
            step, epoch, pos = int(state["step"]), int(state["epoch"]), int(state["position"])
            self.best_metric = state["best"]["metric"]
            self.best_epoch = int(state["best"]["epoch"])
            self.history = list(state.get("history", []))
            diff = sorted(
                k
                for k, v in state["config"].items()
                if k not in ("resume", "workers", "out", "decode", "compile", "attention")
                and to_dict(cfg).get(k) != v
            )
            if diff:
                log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(diff))
            log.info("resuming from %s at step %d (epoch %d, batch %d)", self.out / "last", step, epoch, pos)
        elif cfg.resume:
            log.info("no checkpoint in %s: starting a new run", self.out)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            header = run_header(cfg)
            header["teacher"] = self.reader.manifest.get("teacher")
            header["store"] = {
                "url": self.reader.display,
                "keys_sha256": self.reader.manifest.get("keys_sha256"),
            }
            header["student"] = self.student_info()
            atomic_write_json(self.out / "run.json", header)
            log.info("run header: %s", json.dumps(header))
            if state is not None:
                self._trim_metrics(step, epoch)
        self._metrics = open(self.out / "metrics.jsonl", "a") if ctx.is_main else None  # noqa: SIM115
        try:
            return self._train(step, epoch, pos, state)
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def _setup_optimizer(self, state: dict | None) -> bool:
        """Fit and freeze the compressor first when asked; build AdamW (restored on resume).
        Returns whether the compressor is frozen."""
        cfg, model = self.cfg, self.model
        frozen = False
        if cfg.compressor_first:
            if state is None:
                log.info("fitting the compressor from the store features (%d epochs)", cfg.compressor_epochs)
                fit_compressor(
                    model.compressor,
                    self.reader,
                    self.split.train,
                    cfg,
                    self.device,
                    self.use_tokens,
                    lambda row: self._log_metric(row),
                )
            for p in model.compressor.parameters():
                p.requires_grad_(False)
            frozen = True
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            ckpt.set_rng_state(state["rng"])
        elif cfg.compressor_first:
            self._save("last", 0, 0, 0)  # the fitted compressor survives a kill
        return frozen

    def _epoch_loader(self, epoch: int, pos: int) -> tuple[BatchPlan, torch.utils.data.DataLoader]:
        """This rank's batch plan for ``epoch`` and a loader starting at batch ``pos``."""
        cfg, ctx = self.cfg, self.ctx
        plan = BatchPlan(
            self.split.train,
            seed=cfg.seed,
            epoch=epoch,
            batch_size=cfg.batch_size,
            views_per_image=cfg.views_per_image,
            num_views=self.reader.num_views,
            rank=ctx.rank,
            world=ctx.world,
        )
        loader = torch.utils.data.DataLoader(
            DistillBatches(
                self.lazy, plan, self.source_index, cfg.student_size, self.use_tokens, self.decode
            ),
            batch_size=1,
            sampler=StepSampler(pos, len(plan)),
            collate_fn=collate_batch,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
        )
        return plan, loader

    def _step(self, dmodel: nn.Module, batch: dict[str, Any], lr: float, frozen: bool) -> dict[str, float]:
        """One optimizer step on a batch; returns the loss terms averaged over ranks."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr
        teacher = teacher_features(batch, self.device, self.grid_t, self.grid_s)
        images = device_images(batch, cfg.student_size, self.device)
        terms = compute_losses(
            dmodel,
            images,
            teacher,
            method=cfg.method,
            temperatures=cfg.temperatures,
            weights={"local": cfg.w_local, "global": cfg.w_global, "tokens": cfg.w_tokens, "cls": cfg.w_cls},
            use_tokens=self.use_tokens,
            frozen_compressor=frozen,
        )
        self.opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        names = sorted(terms)
        vals = runtime.all_reduce_mean(torch.stack([terms[k].detach().float() for k in names])).tolist()
        return dict(zip(names, vals, strict=True))

    def _train(self, step: int, epoch: int, pos: int, state: dict | None) -> dict[str, Any]:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        frozen = self._setup_optimizer(state)
        dmodel: nn.Module = model
        if ctx.enabled:
            dmodel = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        total_views = self.total_steps * cfg.batch_size
        t_start, views_done, last_row = time.perf_counter(), 0, {}
        while epoch < cfg.epochs:
            plan, loader = self._epoch_loader(epoch, pos)
            t0 = time.perf_counter()
            for batch in loader:
                t_data = time.perf_counter() - t0
                lr = lr_at(step, self.total_steps, self.warmup, cfg.lr, cfg.min_lr)
                losses = self._step(dmodel, batch, lr, frozen)
                step += 1
                pos = int(batch["step"]) + 1
                dt = time.perf_counter() - t0
                views_done += cfg.batch_size
                last_row = {
                    "phase": "train",
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    **{f"loss/{k}": v for k, v in losses.items()},
                    "images_per_s": cfg.batch_size / max(dt, 1e-9),
                    "time_data_s": t_data,
                    "time_step_s": dt,
                }
                self._log_metric(last_row)
                if self.progress is not None and ctx.is_main:
                    self.progress(step * cfg.batch_size, total_views)
                if cfg.save_every and step % cfg.save_every == 0 and pos < len(plan):
                    self._save("last", step, epoch, pos)
                t0 = time.perf_counter()
            epoch, pos = epoch + 1, 0
            self._end_epoch(epoch - 1, step)
            self._save("last", step, epoch, 0)
            runtime.barrier()
        elapsed = time.perf_counter() - t_start
        return {
            "out": str(self.out),
            "rank": ctx.rank,
            "world": ctx.world,
            "steps": step,
            "epochs": cfg.epochs,
            "method": cfg.method,
            "use_tokens": self.use_tokens,
            "best_epoch": self.best_epoch,
            "best_knn_accuracy": self.best_metric,
            "history": self.history,
            "last": last_row,
            "images_per_second": views_done / elapsed if views_done else 0.0,
            "checkpoints": {
                "last": str(ckpt.paths(self.out, "last")[0]),
                "best": str(ckpt.paths(self.out, "best")[0]),
            },
        }

    def _end_epoch(self, epoch: int, step: int) -> None:
        """kNN validation on rank 0 and the `best` checkpoint (best = last when there are no labels)."""
        if not self.ctx.is_main:
            return
        row: dict[str, Any] = {"phase": "val", "epoch": epoch, "step": step}
        better = True
        if self.knn:
            t0 = time.perf_counter()
            emb = {}
            for name, rows in (("bank", self.bank_rows), ("val", self.val_rows)):
                emb[name] = embed_images(
                    self.model.student,
                    self.lazy,
                    self.source_index[rows],
                    self.cfg.student_size,
                    device=self.device,
                    amp_dtype=self.amp,
                    workers=self.cfg.workers,
                    decode=self.decode,
                )
            acc = knn_accuracy(
                emb["bank"],
                torch.as_tensor(self.labels[self.bank_rows]),
                emb["val"],
                torch.as_tensor(self.labels[self.val_rows]),
                self.cfg.val_k,
                self.cfg.val_temperature,
            )
            row.update(
                {
                    "knn_accuracy": acc,
                    "val_images": len(self.val_rows),
                    "bank_images": len(self.bank_rows),
                    "time_val_s": time.perf_counter() - t0,
                }
            )
            better = self.best_metric is None or acc > self.best_metric
            log.info("epoch %d: kNN accuracy %.4f on %d held-out images", epoch, acc, len(self.val_rows))
        if better:
            self.best_metric, self.best_epoch = row.get("knn_accuracy"), epoch
        row["best_epoch"] = self.best_epoch
        self.history.append(row)
        self._log_metric(row)
        if better:
            self._save("best", step, epoch + 1, 0)


def atomic_write_json_lines(path: Path, lines: list[str]) -> None:
    from cospress.utils import atomic_write_bytes

    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
