"""Stage 2 prefetch: batch k+1 is read, decoded, replayed and sent to the device while batch k trains.

The thread (on CUDA a side stream, events, ``record_stream``) is the shared `cospress.data.prefetch`;
this module says what one batch's preparation is: a :class:`Ready` (the student inputs on the device,
and the store's targets as fp32 ``Features`` there). Everything it does is a pure function of the batch
(no global RNG is drawn, the loader has its own generator), so training is bitwise what it is without
the thread; ``AHEAD = 0`` runs the same preparation in the loop's own thread (tests compare the two).
An error in a batch (an image that cannot be decoded) is raised by the loop when it reaches that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cospress.data.device_decode import decode_replay
from cospress.data.prefetch import prefetch as side_prefetch
from cospress.distill.model import teacher_features
from cospress.errors import BadImageError
from cospress.models.features import Features

__all__ = ["AHEAD", "Ready", "device_images", "prefetch", "prepare_batch"]

AHEAD = 1  # batches prepared ahead of the one training; 0: prepared in the loop's thread, in turn


@dataclass
class Ready:
    """One batch ready to train: the loader's ``batch``, ``images`` uint8 [n*R, 3, S, S] on the device,
    ``teacher`` the store's targets (fp32 Features on the device), or None online (the loop runs the
    teacher)."""

    batch: dict[str, Any]
    images: torch.Tensor
    teacher: Features | None


def device_images(batch: dict[str, Any], size: int, device: torch.device) -> torch.Tensor:
    """The student inputs of a batch: uint8 [n*R, 3, S, S] on ``device``, decoded there in bytes mode.

    Raises BadImageError naming the first image that cannot be decoded (as the CPU path does).
    """
    if batch.get("images") is not None:
        return batch["images"].to(device, non_blocking=True)
    enc = batch["encoded"]
    n = len(enc)
    params = batch["params"].reshape(n, -1, batch["params"].shape[-1])
    images, errors = decode_replay(enc, list(params), size, device)
    bad = [(i, e) for i, e in enumerate(errors) if e]
    if bad:
        i, reason = bad[0]
        raise BadImageError(
            f"{reason} (store row {int(batch['rows'][i])}); remove it and re-extract the store"
        )
    return images


def prepare_batch(batch: dict[str, Any], size: int, device: torch.device, targets: bool) -> Ready:
    """The student inputs of ``batch`` and, when ``targets`` (store mode), its targets, on ``device``.

    The images are decoded before the targets move: a decode never runs while the targets' float16
    copies are in flight (see ``device_decode._decode_jpegs`` for why that is safe anyway on CUDA).
    """
    images = device_images(batch, size, device)
    return Ready(batch, images, teacher_features(batch, device) if targets else None)


def prefetch(
    loader: Iterable[dict[str, Any]],
    prepare: Callable[[dict[str, Any]], Ready],
    device: torch.device,
    ahead: int | None = None,
) -> Iterator[Ready]:
    """``prepare(batch)`` of every batch of ``loader``, in order, prepared in a thread while the caller
    trains on the current one (`cospress.data.prefetch`): up to ``ahead`` (default :data:`AHEAD`) wait
    ready in a queue while the thread prepares the next. ``ahead`` 0: each batch is prepared in the
    caller's thread when asked for."""
    ahead = AHEAD if ahead is None else int(ahead)
    return side_prefetch(loader, prepare, device, ahead, _tensors)


def _tensors(ready: Ready) -> list[torch.Tensor | None]:
    """The tensors of a prepared batch that the training stream takes over."""
    teacher = ready.teacher
    return [ready.images] + ([] if teacher is None else [teacher.cls, teacher.tokens])
