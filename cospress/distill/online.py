"""Stage 2 online targets: fresh views every step and the teacher run on them (``--teacher``, no store).

The second source of targets of the one training loop (the first: the store, ``model.teacher_features``).
View ``j`` of image ``key`` in epoch ``e`` is view number ``e * R + j`` of stage 1's keyed RNG,
``sample_view_params(policy, seed, key, e * R + j, width, height)`` (R = ``views_per_image``): every
view of a run is new (an image is seen once per epoch), the views are a pure function of (seed, key,
epoch, j), so a killed run resumes to the same weights, and epoch 0's views ``0 .. R-1`` are the
views ``0 .. R-1`` of a store extracted with the same seed and policy. The teacher runs in inference
mode on the views replayed at its size, under the run's precision, and its outputs are rounded to
float16 as a store keeps them, so online and cached targets of the same view are the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cospress.data.device_decode import decode_replay
from cospress.data.policy import ViewPolicy
from cospress.data.views import sample_view_params
from cospress.distill.model import teacher_features
from cospress.models.features import Features
from cospress.runtime import autocast, autocast_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineViews:
    """What a DataLoader worker needs to draw the fresh views of a batch (picklable: no teacher)."""

    policy: ViewPolicy
    seed: int
    keys: list[str]  # source keys, by source position (= row in online mode)
    views_per_image: int
    teacher_size: int

    def params(self, row: int, epoch: int, views: np.ndarray, width: int, height: int) -> np.ndarray:
        """float32 [R, P]: views ``epoch * R + j`` (j in ``views``) of the image of ``row``."""
        r = self.views_per_image
        key = self.keys[int(row)]
        return np.stack(
            [
                sample_view_params(self.policy, self.seed, key, epoch * r + int(j), width, height)
                for j in views
            ]
        ).astype(np.float32)


class OnlineTeacher:
    """The teacher of an online run: ``features(batch, device)`` gives the batch's targets as the
    store path does (fp32 Features from float16-rounded teacher outputs, tokens on the teacher's grid)."""

    def __init__(self, teacher: Any, views: OnlineViews, amp: torch.dtype | None, tokens: bool) -> None:
        self.teacher, self.views, self.amp, self.tokens = teacher, views, amp, tokens
        self.dim, self.grid = int(teacher.dim), tuple(int(g) for g in teacher.grid)

    def features(self, batch: dict[str, Any], device: torch.device) -> Features:
        images = batch.get("teacher_images")
        if images is None:  # bytes mode: decode + replay at the teacher's size on the device
            enc = batch["encoded"]
            params = batch["params"].reshape(len(enc), -1, batch["params"].shape[-1])
            images, _ = decode_replay(enc, list(params), self.views.teacher_size, device)
        images = images.to(device, non_blocking=True)
        with torch.inference_mode(), autocast(device, self.amp):
            f = self.teacher(images)
            cls, tok = f.cls.to(torch.float16), f.tokens.to(torch.float16) if self.tokens else None
        # float16 as the store keeps them; teacher_features copies them out of inference mode (fp32)
        return teacher_features({"cls": cls, "tokens": tok}, device)

    def describe(self) -> dict[str, Any]:
        """The run header's teacher entry, with the online view policy."""
        return {
            **self.teacher.describe(),
            "online": {"policy": self.views.policy.to_dict(), "seed": self.views.seed},
        }


def load_online_teacher(cfg: Any, keys: list[str], device: torch.device) -> OnlineTeacher:
    """The teacher of ``cfg`` (the run's DistillConfig) on ``device``, frozen, with the run's view policy."""
    from cospress.models.teachers import build_teacher

    teacher = build_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size).to(device)
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    policy = ViewPolicy.from_settings(cfg)  # crop, flip, RandAugment, erasing (no colour options online)
    views = OnlineViews(policy, int(cfg.seed), keys, int(cfg.views_per_image), int(teacher.input_size))
    tokens = bool(cfg.use_tokens and teacher.num_tokens > 0)
    return OnlineTeacher(teacher, views, autocast_dtype(cfg.precision, device), tokens)
