"""Stage 2 model pieces: the trained modules, the loss terms, the optimizer groups + LR schedule, the compressor-only fit.

``DistillModel`` wraps the student and either the compressor h (cospress) or a linear head (baselines);
``compute_losses`` returns one step's named loss terms and ``train_step`` takes one optimizer step;
``teacher_features`` turns a batch's cached targets into fp32 ``Features`` on the teacher's own grid;
``param_groups`` / ``Schedule`` (``lr_at``) are the AdamW groups and the warm-up + cosine schedule;
``make_optimizer`` builds AdamW, after ``fit_compressor`` fits h from the store features alone when asked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cospress import runtime
from cospress.distill.data import BatchPlan, TrainData, read_targets
from cospress.models.features import Features
from cospress.runtime import autocast

__all__ = [
    "DistillModel",
    "Schedule",
    "compile_student",
    "compute_losses",
    "fit_compressor",
    "lr_at",
    "make_optimizer",
    "param_groups",
    "teacher_features",
    "train_step",
]

log = logging.getLogger(__name__)


# ============================================================================ model + losses
class DistillModel(nn.Module):
    """The trained modules: ``student`` and either ``compressor`` (cospress) or ``head`` (baselines:
    LayerNorm -> Linear Ds -> Dt, as Proteus).

    ``forward(images uint8 [B, 3, S, S], teacher Features(cls [B, Dt], tokens [B, T, Dt]) fp32)``
    returns (student Features [B, *, Ds] fp32, h(teacher) Features [B, *, Ds] or head(student)
    Features [B, *, Dt]), the student under autocast ``amp_dtype``.
    """

    def __init__(self, student: nn.Module, method: str, dt: int, compressor_kind: str = "linear") -> None:
        super().__init__()
        from cospress.models.compressor import Compressor

        self.student = student
        self.method = method
        self.amp_dtype: torch.dtype | None = None
        ds = int(student.dim)
        if method == "cospress":
            self.compressor = Compressor(dt, ds, compressor_kind)
        else:
            self.head = nn.Sequential(nn.LayerNorm(ds), nn.Linear(ds, dt))

    def forward(self, images: torch.Tensor, teacher: Features) -> tuple[Features, Features]:
        student = self.__dict__.get("compiled_student")  # set by compile_student (training only)
        if student is None:
            student = self.student
        with autocast(images.device, self.amp_dtype):
            s = student(images)
        s = s.float()
        if self.method == "cospress":
            frozen = not any(p.requires_grad for p in self.compressor.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                z = self.compressor(teacher)
            return s, z
        return s, Features(cls=self.head(s.cls), tokens=self.head(s.tokens))


def compile_student(model: DistillModel, backend: Any = "inductor") -> None:
    """Train ``model`` with a ``torch.compile``d student; ``model.student`` itself stays plain.

    The compiled student is kept outside the module tree (``model.compiled_student``, not a
    submodule): parameter names and checkpoints stay unwrapped (no ``_orig_mod.``), and validation,
    which embeds other batch sizes in eval mode under no_grad, runs the plain student instead of
    recompiling it for each of those (tests/test_distill_compile.py counts the compilations).
    """
    model.__dict__["compiled_student"] = torch.compile(model.student, backend=backend)


def compute_losses(
    model: nn.Module,
    images: torch.Tensor,
    teacher: Features,
    *,
    method: str,
    temperatures: list[float] | tuple[float, ...],
    weights: dict[str, float],
    use_tokens: bool,
    frozen_compressor: bool = False,
    grids: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """One step's named loss terms (fp32) for this rank's part of a global batch; "total" is weighted.

    images [b, 3, S, S] uint8; teacher Features(cls [b, Dt], tokens [b, T, Dt]) on the teacher's grid;
    ``grids`` = (teacher grid, student grid) when they differ. The local term is computed on the
    teacher's native tokens; only the student's token-cosine target (h(t) tokens, or the teacher's
    tokens for the baselines) is moved to the student's grid (area pooling down, bilinear up).
    For cospress the global term uses the CLS of all ranks (all-gathered with gradients), so after
    DDP's gradient mean every rank holds the single-process gradient of the global batch.
    With a frozen (pre-fitted) compressor only the cosine terms are computed.
    """
    from cospress import losses

    s, z = model(images, teacher)
    if method == "cospress" and frozen_compressor:
        terms = losses.feature_distill_loss("cosine", s, z, use_tokens=use_tokens, grids=grids)  # detached
        names = ("tokens", "cls")
    elif method == "cospress":
        gt = runtime.all_gather_no_grad(teacher.cls)
        gz = runtime.all_gather_with_grad(z.cls)
        terms = losses.cospress_loss(
            teacher,
            z,
            s,
            temperatures,
            global_teacher_cls=gt,
            global_compressed_cls=gz,
            use_tokens=use_tokens,
            grids=grids,
        )
        names = ("local", "global", "tokens", "cls")
    else:
        terms = losses.feature_distill_loss(method, z, teacher, use_tokens=use_tokens, grids=grids)
        names = ("tokens", "cls")
    out = {k: terms[k].float() for k in names}
    out["total"] = sum(weights[k] * out[k] for k in names)
    return out


def teacher_features(batch: dict[str, Any], device: torch.device) -> Features:
    """Cached targets of a batch as fp32 Features on ``device``, tokens on the teacher's own grid."""
    cls = batch["cls"].to(device, non_blocking=True).float()
    tok = batch.get("tokens")
    if tok is None:
        tokens = cls.new_zeros((cls.shape[0], 0, cls.shape[1]))
    else:
        tokens = tok.to(device, non_blocking=True).float()
        if batch.get("token_scale") is not None:  # an int8 store's tokens: q * scale per token
            tokens.mul_(batch["token_scale"].to(device, non_blocking=True).float().unsqueeze(-1))
    return Features(cls=cls, tokens=tokens)


# ============================================================================ optimizer + schedule
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "register_tokens", "pos_embed_cls")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on 1-d params (norms, biases) and pos/cls tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of a run: ``schedule(step)`` = :func:`lr_at` over ``total`` steps."""

    total: int
    warmup: int
    lr: float
    min_lr: float

    @classmethod
    def for_run(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        """``cfg.epochs`` epochs of ``steps_per_epoch`` steps, the first ``cfg.warmup_epochs`` warm-up."""
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        return cls(total=steps_per_epoch * cfg.epochs, warmup=warmup, lr=cfg.lr, min_lr=cfg.min_lr)

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.lr, self.min_lr)

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records of the schedule."""
        return {"name": "warmup_cosine", "step": step, "warmup": self.warmup, "total": self.total}


def make_optimizer(
    model: DistillModel, cfg: Any, data: TrainData, *, fit: bool, log_metric: Callable[[dict], None]
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model`` (``cfg``: the run's DistillConfig).

    With ``cfg.compressor_first`` the compressor is first fitted from the store features of the
    training rows (when ``fit``: not on resume, the checkpoint holds it) and frozen; read as the
    run reads the store (streamed: whole shard files; else at random access).
    """
    if cfg.compressor_first:
        if fit:
            log.info("fitting the compressor from the store features (%d epochs)", cfg.compressor_epochs)
            device = next(model.parameters()).device
            if data.stream is not None:
                from cospress.distill.streaming import stream_feature_batches

                features = stream_feature_batches(data, cfg)
            else:
                features = random_feature_batches(data, cfg)
            fit_compressor(model.compressor, features, cfg, device, data.use_tokens, log_metric)
        for p in model.compressor.parameters():
            p.requires_grad_(False)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    teacher: Features,
    lr: float,
    cfg: Any,
    use_tokens: bool,
    grids: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's part of a global batch; returns the loss terms averaged over ranks.

    The terms stay on the device (0-d float32 tensors): reading them waits for the step, so the caller
    reads them in batches (``MetricsLog.add_train``). ``model``: the DistillModel or its DDP wrapper;
    images / teacher / grids as :func:`compute_losses`.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    terms = compute_losses(
        model,
        images,
        teacher,
        method=cfg.method,
        temperatures=cfg.temperatures,
        weights={"local": cfg.w_local, "global": cfg.w_global, "tokens": cfg.w_tokens, "cls": cfg.w_cls},
        use_tokens=use_tokens,
        frozen_compressor=bool(cfg.compressor_first),
        grids=grids,
    )
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    names = sorted(terms)
    vals = runtime.all_reduce_mean(torch.stack([terms[k].detach().float() for k in names]))
    return dict(zip(names, vals.unbind(), strict=True))


# ============================================================================ compressor-first
def fit_compressor(
    compressor: nn.Module,
    features: FeatureBatches,
    cfg: Any,
    device: torch.device,
    use_tokens: bool,
    log_metric: Callable[[dict], None],
) -> None:
    """Fit h from the store features alone (local + global similarity KL), ``compressor_epochs`` epochs.

    ``cfg`` is a ``cospress.distill.DistillConfig`` (not imported here: this module sits below it).
    Every rank runs the same deterministic fit; rank 0's weights are then broadcast.
    """
    from cospress.losses import similarity_kl

    opt = torch.optim.AdamW(param_groups(compressor, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    batches_of, per_epoch = features
    steps = per_epoch * cfg.compressor_epochs
    step = 0
    for epoch in range(cfg.compressor_epochs):
        for batch in batches_of(epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, 0, cfg.lr, cfg.min_lr)
            cls = batch["cls"].to(device).float()
            zc = compressor(cls)
            glob = similarity_kl(cls[None], zc[None], cfg.temperatures)
            local = torch.zeros((), device=device)
            if use_tokens:
                t = torch.cat([cls[:, None], batch["tokens"].to(device).float()], dim=1)
                local = similarity_kl(t, compressor(t), cfg.temperatures)
            loss = cfg.w_global * glob + cfg.w_local * local
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            log_metric(
                {
                    "phase": "compressor",
                    "epoch": epoch,
                    "compressor_step": step,
                    "loss/local": float(local.detach()),
                    "loss/global": float(glob.detach()),
                    "loss/total": float(loss.detach()),
                }
            )
    runtime.broadcast_module(compressor)
    for p in compressor.parameters():
        p.requires_grad_(False)


FeatureBatches = tuple[Callable[[int], Iterator[dict[str, Any]]], int]  # (epoch -> batches, steps per epoch)


def random_feature_batches(data: TrainData, cfg: Any) -> FeatureBatches:
    """The compressor fit's batches read at random access from ``data.reader``."""
    rows = data.split.train

    def batches_of(epoch: int) -> Iterator[dict[str, Any]]:
        return feature_batches(data.reader, rows, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                               views_per_image=cfg.views_per_image, tokens=data.use_tokens)  # fmt: skip

    return batches_of, len(rows) // (cfg.batch_size // cfg.views_per_image)


def feature_batches(
    reader: Any,
    rows: np.ndarray,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    views_per_image: int,
    tokens: bool,
) -> Iterator[dict[str, Any]]:
    """Batches of cached features only (for fitting the compressor without images).

    Yields {"cls": f16 [n*R, Dt], "tokens": f16 [n*R, T, Dt] | None} for every full batch of the epoch.
    """
    plan = BatchPlan(
        rows,
        seed=seed,
        epoch=epoch,
        batch_size=batch_size,
        views_per_image=views_per_image,
        stored_views=reader.stored_views,
    )
    for step in range(len(plan)):
        rws, views = plan.rows_views(step)
        t = read_targets(reader, rws, views, tokens)
        yield {"cls": t["cls"], "tokens": t["tokens"]}
