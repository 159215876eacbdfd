"""Stage 1 teacher: the features of every view of each batch, back on the host (it knows no writer)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cospress.data.device_decode import decode_view_items
from cospress.data.prefetch import prefetch
from cospress.extract.config import ExtractConfig
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
    """What one rank's pass over its pending shards did: images and skipped (counted by the runner),
    seconds spent reading and in the teacher (counted by `run_teacher`)."""

    done: int = 0
    skipped: int = 0
    reading: float = 0.0
    teacher: float = 0.0


AHEAD = 1  # batches decoded ahead of the teacher's; 0: decoded in the loop's thread, in turn


def decoded(batches: Iterable[list[dict]], size: int, device: torch.device) -> Iterator[list[dict]]:
    """The batches with their views decoded + replayed on ``device`` (bytes mode; `decode_view_items`),
    batch k+1 in a thread while the caller runs the teacher on batch k: on CUDA on a side stream, the
    compute stream waiting for its event (`cospress.data.prefetch`). A pure function of each batch, so
    the features are bitwise those of decoding in turn (``AHEAD`` 0; tests/test_stage1_prefetch.py)."""

    def prepare(items: list[dict]) -> list[dict]:
        decode_view_items(items, size, device)
        return items

    return prefetch(batches, prepare, device, AHEAD, lambda items: [it["images"] for it in items])


def _batch(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The views of a batch as one tensor on ``device``. Host views bound for CUDA (pinned by the
    DataLoader) are concatenated into pinned memory, so the copy does not block: ``torch.cat`` of
    pinned tensors returns pageable memory, whose copy waits for the stream."""
    if device.type != "cuda" or images[0].device.type == "cuda":
        return torch.cat(images).to(device, non_blocking=True)
    host = torch.empty(
        (sum(len(im) for im in images), *images[0].shape[1:]), dtype=images[0].dtype, pin_memory=True
    )
    return torch.cat(images, out=host).to(device, non_blocking=True)


def _features(
    teacher: Any, images: list[torch.Tensor], tokens: bool, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's float16 cls [n, V, D] and tokens [n, V, T, D] (None unless ``tokens``) of n
    images' views, each uint8 [V, 3, S, S], on ``device`` (the host copy is :class:`HostCopies`'s)."""
    n, v = len(images), len(images[0])
    x = _batch(images, device)
    with torch.inference_mode(), autocast(device, amp):
        feats = teacher(x)
    cls = feats.cls.to(torch.float16).reshape(n, v, -1)
    if not tokens:
        return cls, None
    return cls, feats.tokens.to(torch.float16).reshape(n, v, teacher.num_tokens, -1)


class HostCopies:
    """Device-to-host copies of a batch's features into double-buffered pinned memory (CUDA).

    ``start(tensors)`` queues the copies of batch k on a copy stream (after the teacher's work on
    them) into pinned slot k % 2 and returns at once; ``wait(handle)`` blocks until they are done and
    gives numpy views of the slot. The runner waits for batch k only after batch k+1's teacher forward
    is queued, so the ~100 MB of tokens per batch come back while the GPU computes the next batch
    (a pageable ``.cpu()`` waits for the whole stream, then copies at pageable speed). A slot is
    written again two batches later, after its numbers were copied into the shard buffer.
    On a CPU there is nothing to copy: ``start`` returns the tensors' numpy views (the same bytes
    as before: tests/test_golden_store.py).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.slots: list[dict[int, torch.Tensor]] = [{}, {}]  # pinned, by position in ``tensors``
        self.count = 0

    def start(self, tensors: list[torch.Tensor | None]) -> Any:
        if not self.cuda:
            return [None if t is None else t.numpy() for t in tensors]
        slot = self.slots[self.count % 2]
        self.count += 1
        self.stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        out = []
        with torch.cuda.stream(self.stream):
            for j, t in enumerate(tensors):
                if t is None:
                    out.append(None)
                    continue
                if j not in slot or slot[j].numel() < t.numel() or slot[j].dtype != t.dtype:
                    slot[j] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
                host = slot[j][: t.numel()].view(t.shape)
                host.copy_(t, non_blocking=True)
                out.append(host)
        # the device tensors stay referenced by the handle until the copies are done
        return out, list(tensors), self.stream.record_event()

    def wait(self, handle: Any) -> list[np.ndarray | None]:
        if not self.cuda:
            return handle
        out, _, event = handle
        event.synchronize()
        return [None if t is None else t.numpy() for t in out]


def run_teacher(
    batches: Iterable[list[dict]],
    teacher: Any,
    tokens: bool,
    device: torch.device,
    amp: torch.dtype | None,
    res: TeacherPass,
) -> Iterator[tuple[list[dict], np.ndarray | None, np.ndarray | None]]:
    """Run the teacher over ``batches`` (of `ViewDataset` items, one shard each): yields each batch's
    items with the float16 cls [n, V, D] and tokens [n, V, T, D] (None unless ``tokens``) of its good
    images, as numpy (both None when every image of the batch was skipped).

    Batch k is yielded once batch k+1's teacher forward is queued (its features come back meanwhile,
    :class:`HostCopies`); bytes mode decodes + replays batch k+1 while the teacher runs on batch k
    (:func:`decoded`). Seconds spent reading (and waiting for a decode) and in the teacher go to ``res``.
    """
    copies, pending = HostCopies(device), None
    t0 = time.perf_counter()
    for items in decoded(batches, teacher.input_size, device):
        res.reading += time.perf_counter() - t0
        good = [it["images"] for it in items if it["images"] is not None]
        t1 = time.perf_counter()
        feats = _features(teacher, good, tokens, device, amp) if good else None
        handle = copies.start(list(feats)) if feats is not None else None
        res.teacher += time.perf_counter() - t1
        if pending is not None:
            yield _wait(pending, copies, res)
        pending = (items, handle)
        t0 = time.perf_counter()
    if pending is not None:
        yield _wait(pending, copies, res)


def _wait(
    pending: tuple[list[dict], Any], copies: HostCopies, res: TeacherPass
) -> tuple[list[dict], np.ndarray | None, np.ndarray | None]:
    """A batch's items and its features, once their host copies are done."""
    items, handle = pending
    t1 = time.perf_counter()
    cls, tok = copies.wait(handle) if handle is not None else (None, None)
    res.teacher += time.perf_counter() - t1
    return items, cls, tok
