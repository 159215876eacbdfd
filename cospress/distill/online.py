"""Stage 2 online targets: fresh views every step and the teacher run on them (``--teacher``, no store).

The second source of targets of the one training loop (the first: the store, ``model.teacher_features``).
View ``j`` of image ``key`` in epoch ``e`` is view number ``e * R + j`` of stage 1's keyed RNG,
``sample_view_params(policy, seed, key, e * R + j, width, height)`` (R = ``views_per_image``): every
view of a run is new (an image is seen once per epoch), the views are a pure function of (seed, key,
epoch, j), so a killed run resumes to the same weights, and epoch 0's views ``0 .. R-1`` are the
views ``0 .. R-1`` of a store extracted with the same seed and policy. The teacher runs in inference
mode on the views replayed at its size, under the run's precision, and its outputs are rounded to
float16 as a store keeps them, so online and cached targets of the same view are the same numbers.

The hybrid mode (``--refresh F``, :mod:`cospress.distill.refresh`) uses the same machinery on a store
run: :func:`load_refresh_teacher` builds the store's teacher from its record, ``OnlineViews`` draws
the fresh views of the slots :func:`~cospress.distill.refresh.fresh_mask` picks (from the store's
view policy, numbered after its stored views) and ``OnlineTeacher.features(batch, device, stored)``
puts the teacher's targets of those views in place of the store's.
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
from cospress.distill.refresh import fresh_mask
from cospress.errors import StoreError
from cospress.models.features import Features
from cospress.precision import DTYPE_NAMES
from cospress.runtime import autocast, autocast_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineViews:
    """What a DataLoader worker needs to draw the fresh views of a batch (picklable: no teacher)."""

    policy: ViewPolicy
    seed: int
    keys: list[str]  # by row: source keys (online: row = source position), or the store's keys (--refresh)
    views_per_image: int
    teacher_size: int
    fraction: float = 1.0  # of each batch's views drawn fresh: 1 online, --refresh F
    offset: int = 0  # view numbers start here: 0 online, the store's stored views with --refresh

    def params(self, row: int, epoch: int, views: np.ndarray, width: int, height: int) -> np.ndarray:
        """float32 [len(views), P]: views ``offset + epoch * R + j`` (j in ``views``) of the image of ``row``."""
        r, key = self.views_per_image, self.keys[int(row)]
        return np.stack(
            [
                sample_view_params(
                    self.policy, self.seed, key, self.offset + epoch * r + int(j), width, height
                )
                for j in views
            ]
        ).astype(np.float32)

    def fresh(self, plan: Any, step: int) -> np.ndarray:
        """bool [n, R]: which of this rank's views of ``plan``'s global batch ``step`` are fresh (online: all)."""
        mask = fresh_mask(
            plan.seed, plan.epoch, step, plan.images_per_batch, plan.views_per_image, self.fraction
        )
        return mask[plan.rank * plan.local_images : (plan.rank + 1) * plan.local_images]


class OnlineTeacher:
    """The teacher of an online run: ``features(batch, device)`` gives the batch's targets as the
    store path does (fp32 Features from float16-rounded teacher outputs, tokens on the teacher's grid)."""

    def __init__(self, teacher: Any, views: OnlineViews, amp: torch.dtype | None, tokens: bool) -> None:
        self.teacher, self.views, self.amp, self.tokens = teacher, views, amp, tokens
        self.dim, self.grid = int(teacher.dim), tuple(int(g) for g in teacher.grid)

    def features(
        self, batch: dict[str, Any], device: torch.device, stored: Features | None = None
    ) -> Features:
        """The teacher's targets of the batch's fresh views (``batch["fresh"]``, bool [n*R]; all online);
        ``stored`` (--refresh): the store's targets of the batch, returned with its fresh views replaced."""
        fresh = batch.get("fresh")
        if stored is not None and (fresh is None or not bool(fresh.any())):
            return stored
        images = batch.get("teacher_images")
        if images is None:  # bytes mode: decode + replay at the teacher's size on the device
            enc = batch["encoded"]
            params = batch["params"].reshape(len(enc), -1, batch["params"].shape[-1])
            images, _ = decode_replay(enc, list(params), self.views.teacher_size, device)
            images = images if stored is None else images[fresh.to(images.device)]
        images = images.to(device, non_blocking=True)
        with torch.inference_mode(), autocast(device, self.amp):
            f = self.teacher(images)
            cls, tok = f.cls.to(torch.float16), f.tokens.to(torch.float16) if self.tokens else None
        # float16 as the store keeps them; teacher_features copies them out of inference mode (fp32)
        got = teacher_features({"cls": cls, "tokens": tok}, device)
        if stored is None:
            return got
        at = fresh.to(device)
        stored.cls[at] = got.cls
        if stored.tokens.shape[1]:
            stored.tokens[at] = got.tokens
        return stored

    def describe(self) -> dict[str, Any]:
        """The run header's teacher entry, with the online view policy."""
        return {
            **self.teacher.describe(),
            "online": {"policy": self.views.policy.to_dict(), "seed": self.views.seed},
        }


def load_online_teacher(cfg: Any, keys: list[str], device: torch.device) -> OnlineTeacher:
    """The teacher of ``cfg`` (the run's DistillConfig) on ``device``, frozen, with the run's view policy."""
    from cospress.models.teachers import build_teacher

    teacher = _on(build_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size), device)
    policy = ViewPolicy.from_settings(cfg)  # crop, flip, RandAugment, erasing (no colour options online)
    views = OnlineViews(policy, int(cfg.seed), keys, int(cfg.views_per_image), int(teacher.input_size))
    tokens = bool(cfg.use_tokens and teacher.num_tokens > 0)
    return OnlineTeacher(teacher, views, autocast_dtype(cfg.precision, device), tokens)


def load_refresh_teacher(cfg: Any, reader: Any, tokens: bool, device: torch.device) -> OnlineTeacher:
    """``--refresh``: the store's teacher on ``device``, built from its record (name, input size; ``--weights``
    for a teacher extracted from a file) and refused in one line unless its fingerprint is the store's;
    fresh views from the store's view policy, the teacher run under the store's precision."""
    from cospress.data.policy import stored_policy
    from cospress.models.teachers import build_teacher

    rec = reader.manifest.get("teacher") or {}
    teacher = build_teacher(str(rec.get("name")), weights=cfg.weights, image_size=rec.get("input_size"))
    if teacher.fingerprint() != rec.get("fingerprint"):
        raise StoreError(
            f"--refresh: teacher {rec.get('name')} at {rec.get('input_size')} px built "
            f"{'from --weights' if cfg.weights else 'with its default weights'} has fingerprint "
            f"{teacher.fingerprint()[:12]}, {reader.display} was made by {str(rec.get('fingerprint'))[:12]}: "
            "pass --weights with the file the store was extracted with"
        )
    policy = stored_policy(reader.manifest.get("view_policy"), reader.num_params, reader.display)
    r, stored = int(cfg.views_per_image), int(reader.stored_views)
    views = OnlineViews(
        policy, int(cfg.seed), reader.keys(), r, int(teacher.input_size), float(cfg.refresh), stored
    )
    named = {v: k for k, v in DTYPE_NAMES.items()}.get(reader.manifest.get("precision"), cfg.precision)
    log.info(
        "--refresh %g: that fraction of each batch's views drawn fresh and run through the store's teacher "
        "(%s at %d px, %s)", cfg.refresh, rec.get("name"), teacher.input_size, named,
    )  # fmt: skip
    return OnlineTeacher(_on(teacher, device), views, autocast_dtype(named, device), tokens)


def _on(teacher: Any, device: torch.device) -> Any:
    """The frozen teacher on ``device`` (channels-last where it has that layout)."""
    teacher = teacher.to(device)
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    return teacher
