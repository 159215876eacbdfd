"""Students: any timm model, trained from scratch (or from hub weights), without a head."""

from __future__ import annotations

import logging
from typing import Any

from cospress.models.timm_features import FeatureModel, create_timm_model

log = logging.getLogger(__name__)

__all__ = ["build_student"]


def build_student(
    name: str,
    image_size: int,
    pretrained: bool = False,
    *,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    **timm_kwargs: Any,
) -> FeatureModel:
    """A trainable student (train mode) giving `Features(cls [B, Ds], tokens [B, h*w, Ds])`.

    ViTs give CLS + patch tokens (e.g. `vit_tiny_patch16_224` at 64 px: 4x4 = 16 tokens, Ds = 192);
    CNNs give the pooled vector + the last spatial map. Ds is the model's width.
    `timm_kwargs` go to `timm.create_model` (e.g. `embed_dim`, `depth`, `num_heads` for tiny tests).
    mean/std: pixel normalisation; default the timm model's.
    """
    model = create_timm_model(name, pretrained, image_size, **timm_kwargs)
    cfg = model.pretrained_cfg
    student = FeatureModel(
        model,
        name=name,
        input_size=image_size,
        mean=tuple(mean or cfg.get("mean", (0.5,) * 3)),
        std=tuple(std or cfg.get("std", (0.5,) * 3)),
        source=f"hub:{name}" if pretrained else "random",
    )
    student.train()
    log.info("student %s: %d px, grid %s, dim %d", name, image_size, student.grid, student.dim)
    return student
