"""Crop boxes and the antialiased bilinear resize of replay: per view, and batched as matmuls.

``resize`` is ``F.interpolate(bilinear, antialias=True)``, except that an axis shrinking more than
``PRESHRINK_ABOVE`` (64x) is first area-averaged to ``PRESHRINK_TO`` (32x) the output size
(``adaptive_avg_pool2d``): CUDA's antialiased kernel sizes its thread block from shared memory and
fails beyond ~94x, and the pre-shrink is done on every device so the CPU and a GPU agree.

``batched_crop_resize`` computes the same thing for a whole batch: the antialias resize is separable
and linear, out = Wy @ crop @ Wx^T, with the weights of PyTorch's kernel (``_aa_weights``) placed at
the crop's rows / columns of the full image and the pre-shrink's averaging folded in. The images of a
batch are padded into a few tensors (one copy per distinct image; images of similar size share one,
an image over ``_BIG_PIXELS`` is alone, so one huge image does not pad the rest); each is two
batched matmuls. Full float32 matmuls (no TF32). Difference from the per-view path: < 1e-4 in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cospress.runtime import to_device
from cospress.similarity import full_fp32_matmul

PRESHRINK_ABOVE = 64
PRESHRINK_TO = 32
_BIG_PIXELS = 1 << 22


def box_pixels(
    p: Sequence[float] | np.ndarray | torch.Tensor, width: int, height: int
) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels from fractions, rounded half up and clamped inside the image."""
    ct, cl, ch, cw = (float(v) for v in p[:4])
    h = min(height, max(1, math.floor(ch * height + 0.5)))
    w = min(width, max(1, math.floor(cw * width + 0.5)))
    top = min(height - h, max(0, math.floor(ct * height + 0.5)))
    left = min(width - w, max(0, math.floor(cl * width + 0.5)))
    return top, left, h, w


def _preshrunk(n: int, size: int) -> int:
    return PRESHRINK_TO * size if n > PRESHRINK_ABOVE * size else n


def resize(x: torch.Tensor, size: int, force: bool = False) -> torch.Tensor:
    """Antialiased bilinear resize of float [B, C, h, w] to size x size (pre-shrunk beyond 64x)."""
    h, w = x.shape[-2:]
    mid = (_preshrunk(h, size), _preshrunk(w, size))
    if mid != (h, w):
        x = F.adaptive_avg_pool2d(x, mid)
    if force or x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in]: PyTorch's antialiased bilinear weights (align_corners=False)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        taps = np.clip(1.0 - np.abs((j - center + 0.5) * invscale), 0.0, None)
        total = taps.sum()
        w[i, lo:hi] = taps / total if total else taps
    return w


def _pool_weights(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in]: adaptive average pooling along one axis."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def axis_weights(start: int, length: int, full: int, size: int) -> np.ndarray:
    """float32 [size, full]: crop [start, start + length) of an axis of `full` pixels, resized to `size`."""
    w = np.zeros((size, full))
    mid = _preshrunk(length, size)
    a = _aa_weights(mid, size)
    w[:, start : start + length] = a @ _pool_weights(length, mid) if mid != length else a
    return w.astype(np.float32)


def _groups(imgs: list[torch.Tensor]) -> list[list[list[int]]]:
    """Distinct images (by storage and shape) as lists of view indices, grouped for padding: images whose
    height and width have the same bit length (padding wastes < 4x), each image over _BIG_PIXELS alone."""
    first: dict[tuple, int] = {}
    views: list[list[int]] = []
    for b, img in enumerate(imgs):
        key = (img.data_ptr(), tuple(img.shape), tuple(img.stride()))
        if key not in first:
            first[key] = len(views)
            views.append([])
        views[first[key]].append(b)
    buckets: dict[tuple, list[list[int]]] = {}
    for i, v in enumerate(views):
        _, h, w = imgs[v[0]].shape
        key = ("big", i) if h * w > _BIG_PIXELS else (int(h).bit_length(), int(w).bit_length())
        buckets.setdefault(key, []).append(v)
    return list(buckets.values())


def _weights(
    start: np.ndarray, length: np.ndarray, full: int, size: int, device: torch.device
) -> torch.Tensor:
    """float32 [..., size, full] on `device`: :func:`axis_weights` for arrays of crops (length 0 = zeros).

    Built on the device from the crop numbers (no large copies); pre-shrunk axes (rare) on the CPU."""
    st = to_device(torch.from_numpy(start.astype(np.float64)), device)[..., None, None]
    ln = to_device(torch.from_numpy(length.astype(np.float64)), device)[..., None, None]
    scale = (ln / size).clamp_min(1e-12)
    support = scale.clamp_min(1.0)
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(size, device=device, dtype=torch.float64)[:, None] + 0.5)
    lo = torch.floor(center - support + 0.5).clamp_min(0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), ln)
    local = torch.arange(full, device=device, dtype=torch.float64) - st
    taps = (1.0 - ((local - center + 0.5) * invscale).abs()).clamp_min(0.0) * ((local >= lo) & (local < hi))
    total = taps.sum(-1, keepdim=True)
    w = torch.where(total > 0, taps / total.clamp_min(1e-300), taps).to(torch.float32)
    for pos in zip(*np.nonzero(length > PRESHRINK_ABOVE * size), strict=True):
        w[pos] = to_device(
            torch.from_numpy(axis_weights(int(start[pos]), int(length[pos]), full, size)), device
        )
    return w


def _group_resize(
    imgs: list[torch.Tensor], group: list[list[int]], p_cpu: torch.Tensor, size: int
) -> torch.Tensor:
    """Views of the images in `group` (lists of view indices, one per image): float [n_views, 3, S, S]."""
    device = imgs[0].device
    hmax = max(imgs[v[0]].shape[1] for v in group)
    wmax = max(imgs[v[0]].shape[2] for v in group)
    g, vmax = len(group), max(len(v) for v in group)
    boxes = np.zeros((4, g, vmax), np.int64)  # top, left, h, w; padding views keep h = w = 0
    padded = torch.zeros(g, hmax, 3, wmax, dtype=torch.float32, device=device)
    for u, views in enumerate(group):
        img = imgs[views[0]]
        padded[u, : img.shape[1], :, : img.shape[2]].copy_(img.permute(1, 0, 2))
        for j, b in enumerate(views):
            boxes[:, u, j] = box_pixels(p_cpu[b], img.shape[2], img.shape[1])
    wy = _weights(boxes[0], boxes[2], hmax, size, device).div_(255.0).reshape(g, vmax * size, hmax)
    wx = _weights(boxes[1], boxes[3], wmax, size, device).reshape(g * vmax, size, wmax)
    with full_fp32_matmul():
        rows = torch.bmm(wy, padded.reshape(g, hmax, 3 * wmax))  # [g, V*S, 3*W]
        out = torch.bmm(rows.reshape(g * vmax, size * 3, wmax), wx.transpose(1, 2))  # [g*V, S*3, S]
    out = out.reshape(g * vmax, size, 3, size).permute(0, 2, 1, 3)
    keep = torch.tensor([u * vmax + j for u, views in enumerate(group) for j in range(len(views))])
    return out.index_select(0, to_device(keep, device))


def batched_crop_resize(imgs: list[torch.Tensor], p_cpu: torch.Tensor, size: int) -> torch.Tensor:
    """Crop + antialiased resize of B views (images may repeat): float [B, 3, size, size] in [0, 1]."""
    out = torch.empty(len(imgs), 3, size, size, dtype=torch.float32, device=imgs[0].device)
    for group in _groups(imgs):
        order = to_device(torch.tensor([b for views in group for b in views]), out.device)
        out.index_copy_(0, order, _group_resize(imgs, group, p_cpu, size))
    return out
