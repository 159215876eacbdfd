"""Stage 2 validation: embed full images with the student and score a weighted kNN after each epoch.

The bank is a fixed sample of labelled training rows, the queries the labelled held-out rows (see
:class:`~cospress.distill.data.TrainData`); the images are the full source images at the student's size.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cospress.data.device_decode import Encoded, decode_replay, pack, worker_read
from cospress.data.views import center_view_params, replay_view
from cospress.distill.data import TrainData, _Lazy
from cospress.errors import BadImageError
from cospress.runtime import autocast
from cospress.vote import vote

__all__ = ["CenterImages", "center_views", "embed_images", "knn_accuracy", "validate_epoch"]

log = logging.getLogger(__name__)


class CenterImages(Dataset):
    """Item i = the full image of source position ``indices[i]`` resized to ``size``: uint8 [3, size, size].

    decode "device": item i is the sample's :class:`~cospress.data.device_decode.Encoded` instead
    (collate with ``device_decode.pack``, then :func:`center_views`).
    """

    def __init__(self, lazy: _Lazy, indices: np.ndarray, size: int, decode: str = "cpu") -> None:
        self.lazy, self.indices, self.size = lazy, np.asarray(indices, dtype=np.int64), int(size)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        sample = worker_read(self.lazy.source, int(self.indices[i]), self.decode)
        if isinstance(sample, Encoded):  # bytes mode: center_views decodes on the device
            return sample
        return replay_view(sample.image, center_view_params(*sample.image.size), self.size)


def center_views(encoded: Any, size: int, device: torch.device) -> torch.Tensor:
    """Decode an EncodedBatch on ``device`` and resize every full image: uint8 [n, 3, size, size]."""
    p = center_view_params(1, 1)[None]  # fractions: the same full box for every image size
    images, errors = decode_replay(encoded, [p] * len(encoded), size, device)
    bad = [e for e in errors if e]
    if bad:
        raise BadImageError(f"{bad[0]}; a validation image cannot be decoded")
    return images


@torch.no_grad()
def embed_images(
    student: nn.Module,
    lazy: _Lazy,
    indices: np.ndarray,
    size: int,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    workers: int,
    batch_size: int = 256,
    decode: str = "cpu",
) -> torch.Tensor:
    """L2-normalised student CLS of the full images at source positions ``indices``: [n, Ds] fp32 (CPU).

    decode "device": workers read bytes; images are decoded and resized on ``device``.
    """
    on_device = decode == "device"
    loader = torch.utils.data.DataLoader(
        CenterImages(lazy, indices, size, decode),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=pack if on_device else None,
        pin_memory=on_device and device.type == "cuda",
    )
    was_training = student.training
    student.eval()
    out = []
    try:
        for batch in loader:
            images = center_views(batch, size, device) if on_device else batch.to(device)
            with autocast(device, amp_dtype):
                cls = student(images).cls
            out.append(torch.nn.functional.normalize(cls.float(), dim=-1).cpu())
    finally:
        student.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, int(student.dim))


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted kNN top-1 accuracy: bank [N, D], query [M, D] L2-normalised; votes exp(cos / T) of the k nearest."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, bank.shape[0])
    correct = 0
    for q, ql in zip(query.split(1024), query_labels.split(1024), strict=True):
        sim, idx = (q.float() @ bank.float().T).topk(k, dim=1)
        scores = vote(sim.numpy(), bank_labels[idx].numpy(), num_classes, temperature)
        correct += int((scores.argmax(1) == ql.numpy()).sum())
    return correct / max(query.shape[0], 1)


def validate_epoch(
    model: nn.Module, data: TrainData, cfg: Any, device: torch.device, decode: str, *, epoch: int, step: int
) -> dict[str, Any]:
    """The validation row of ``epoch``: {"phase": "val", "epoch", "step"}, plus "knn_accuracy",
    "val_images", "bank_images", "time_val_s" when ``data.knn``.

    ``model``: the DistillModel (its student is embedded under its ``amp_dtype``); ``cfg``: the run's
    DistillConfig.
    """
    row: dict[str, Any] = {"phase": "val", "epoch": epoch, "step": step}
    if not data.knn:
        return row
    t0 = time.perf_counter()
    emb = {}
    for name, rows in (("bank", data.bank_rows), ("val", data.val_rows)):
        emb[name] = embed_images(
            model.student,
            data.lazy,
            data.source_index[rows],
            cfg.student_size,
            device=device,
            amp_dtype=model.amp_dtype,
            workers=cfg.workers,
            decode=decode,
        )
    acc = knn_accuracy(
        emb["bank"],
        torch.as_tensor(data.labels[data.bank_rows]),
        emb["val"],
        torch.as_tensor(data.labels[data.val_rows]),
        cfg.val_k,
        cfg.val_temperature,
    )
    row["knn_accuracy"] = acc
    row["val_images"], row["bank_images"] = len(data.val_rows), len(data.bank_rows)
    row["time_val_s"] = time.perf_counter() - t0
    log.info("epoch %d: kNN accuracy %.4f on %d held-out images", epoch, acc, len(data.val_rows))
    return row
