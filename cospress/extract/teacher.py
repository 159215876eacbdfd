"""Stage 1 teacher: features of every view of a batch, written into the rows of its shard's buffer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cospress.data.device_decode import decode_view_items
from cospress.extract.config import ExtractConfig
from cospress.extract.writer import ShardBuffer, ShardSink
from cospress.models.teachers import build_teacher
from cospress.runtime import autocast

log = logging.getLogger(__name__)


def load_teacher(cfg: ExtractConfig, device: torch.device) -> Any:
    """The teacher of ``cfg`` on ``device`` (channels-last when it supports it)."""
    teacher = build_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size).to(device)
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    return teacher


@dataclass
class TeacherPass:
    """What one rank's pass over its pending shards did (seconds spent reading and in the teacher)."""

    done: int = 0
    skipped: int = 0
    reading: float = 0.0
    teacher: float = 0.0


def _features(
    teacher: Any, images: list[torch.Tensor], tokens: bool, device: torch.device, amp: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's float16 cls [n, V, D] and tokens [n, V, T, D] (None unless ``tokens``) of
    n images' views, each uint8 [V, 3, S, S]."""
    n, v = len(images), len(images[0])
    x = torch.cat(images).to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, amp):
        feats = teacher(x)
    cls = feats.cls.to(torch.float16).reshape(n, v, -1).cpu().numpy()
    if not tokens:
        return cls, None
    tok = feats.tokens.to(torch.float16).reshape(n, v, teacher.num_tokens, -1)
    return cls, tok.cpu().numpy()


def _fill(buf: ShardBuffer, items: list[dict], cls: np.ndarray | None, tok: np.ndarray | None) -> int:
    """Write a batch's rows into their shard's buffer; returns how many were skipped."""
    g = skipped = 0
    for it in items:
        i = it["row"] - buf.start
        buf.views[i] = it["params"]
        if it["images"] is None:
            buf.skipped.append({"key": buf.keys[i], "reason": it["reason"]})
            skipped += 1
            log.warning("skipped %s: %s", buf.keys[i], it["reason"])
            continue
        buf.cls[i] = cls[g]
        if tok is not None:
            buf.tokens[i] = tok[g]
        buf.valid[i] = 1
        g += 1
    return skipped


def run_teacher(
    batches: Iterable[list[dict]],
    teacher: Any,
    sink: ShardSink,
    cfg: ExtractConfig,
    device: torch.device,
    amp: torch.dtype | None,
    progress: Callable[[int], None] | None = None,
) -> TeacherPass:
    """Run the teacher over ``batches`` (of `ViewDataset` items, one shard each) into ``sink``.

    ``progress(done_images)`` is called after every batch.
    """
    res = TeacherPass()
    t0 = time.perf_counter()
    for items in batches:
        res.reading += time.perf_counter() - t0
        shard = items[0]["row"] // cfg.shard_size
        buf = sink.buffer(shard)
        decode_view_items(items, teacher.input_size, device)  # bytes mode: decode + replay here
        good = [it["images"] for it in items if it["images"] is not None]
        t1 = time.perf_counter()
        cls, tok = _features(teacher, good, cfg.tokens, device, amp) if good else (None, None)
        res.teacher += time.perf_counter() - t1
        res.skipped += _fill(buf, items, cls, tok)
        sink.filled(shard, len(items))
        res.done += len(items)
        if progress is not None:
            progress(res.done)
        t0 = time.perf_counter()
    return res
