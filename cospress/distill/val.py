"""Stage 2 validation helpers: embed full images with the student and score a weighted kNN.

Re-exported by ``cospress.distill``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cospress.distill.data import CenterImages, _Lazy, center_views
from cospress.runtime import autocast

__all__ = ["embed_images", "knn_accuracy"]


# ============================================================================ validation
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
    from cospress.data.device_decode import pack

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
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == ql).sum())
    return correct / max(query.shape[0], 1)
