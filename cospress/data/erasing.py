"""Random erasing as timm's ``RandomErasing`` (one box), recorded per view and replayed at any size.

Drawn like timm: with probability p, up to 10 tries of an area fraction in ``erase_area`` and an
aspect ratio h / w log-uniform in ``erase_aspect``; the first box that fits inside the view is kept
(none fits: no erasing). The box is recorded in fractions of the view, so the teacher and the student
erase the same region at their sizes; its pixels are ``floor(fraction * size + 0.5)`` as the crop's.

The fill is in pixel space (timm erases the normalised tensor; here teacher and student normalise
differently, so the fill is defined before normalisation, as timm's fill for ImageNet mean / std):
``const`` the ImageNet mean colour, ``rand`` one colour N(mean, std) per view (recorded), ``pixel``
per-pixel noise N(mean, std): the view records a noise seed, and the noise is a counter-based hash
of (seed, channel, row and column within the box) computed in integers and float64 on the view's
device, so it is the same on the CPU and on a GPU (white noise at each size: the same distribution,
not the same pixels).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cospress.runtime import to_device

MEAN = (0.485, 0.456, 0.406)  # ImageNet, as timm's defaults
NOISE_STD = (0.229, 0.224, 0.225)
_MASK32 = 0xFFFFFFFF


def sample_erasing(policy, rng: np.random.Generator) -> np.ndarray:
    """float32 [8]: erase_top, erase_left, erase_height, erase_width, r, g, b, noise seed (all 0: none)."""
    gate = rng.random()
    tries = rng.random((10, 4))  # area, log aspect, top, left
    z = rng.standard_normal(3)
    seed = int(rng.integers(1, 1 << 24))  # exact in float32
    out = np.zeros(8, np.float64)
    if gate >= policy.erase_prob:
        return out.astype(np.float32)
    lo, hi = math.log(policy.erase_aspect[0]), math.log(policy.erase_aspect[1])
    for area_u, aspect_u, top_u, left_u in tries:
        area = policy.erase_area[0] + (policy.erase_area[1] - policy.erase_area[0]) * area_u
        aspect = math.exp(lo + (hi - lo) * aspect_u)
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if h < 1 and w < 1:
            out[:4] = (top_u * (1 - h), left_u * (1 - w), h, w)
            break
    else:
        return out.astype(np.float32)
    mean, std = np.array(MEAN), np.array(NOISE_STD)
    out[4:7] = np.clip(mean + std * z, 0.0, 1.0) if policy.erase_mode == "rand" else mean
    out[7] = seed if policy.erase_mode == "pixel" else 0
    return out.astype(np.float32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 holding values < 2^32; every product stays below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def hash_noise(seeds: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Standard normal float64 [n, 3, height, width]: a pure function of (seed, channel, row, column)
    counted from the box's top-left corner (so of the box alone, whatever else is in the batch)."""
    n = len(seeds)
    c = torch.arange(3, dtype=torch.int64, device=device).view(1, 3, 1, 1) << 24
    yy = torch.arange(height, dtype=torch.int64, device=device).view(1, 1, -1, 1) << 12
    xx = torch.arange(width, dtype=torch.int64, device=device).view(1, 1, 1, -1)
    s = _mix32(to_device(seeds, device, torch.int64).view(n, 1, 1, 1) & _MASK32)
    a = _mix32((_mix32(c | yy | xx) ^ s) & _MASK32)
    b = _mix32((a ^ 0x9E3779B9) & _MASK32)
    u1 = ((a >> 8).double() + 0.5) / (1 << 24)
    u2 = ((b >> 8).double() + 0.5) / (1 << 24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _boxes(e: torch.Tensor, size: int) -> tuple[np.ndarray, ...]:
    """Pixel boxes (top, left, h, w) int64 [n] of recorded fractions: floor(f * size + 0.5), clamped."""
    f = e.numpy().astype(np.float64)
    h = np.clip(np.floor(f[:, 2] * size + 0.5), 1, size).astype(np.int64)
    w = np.clip(np.floor(f[:, 3] * size + 0.5), 1, size).astype(np.int64)
    top = np.minimum(np.clip(np.floor(f[:, 0] * size + 0.5), 0, None), size - h).astype(np.int64)
    left = np.minimum(np.clip(np.floor(f[:, 1] * size + 0.5), 0, None), size - w).astype(np.int64)
    return top, left, h, w


def apply_erasing(x: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    """Erase the recorded boxes of float [B, 3, S, S] in [0, 1]; erase: CPU float [B, 8]. In place.

    The fills are computed on the device over the boxes' bounding size and written with one indexed
    copy (indices built on the CPU from the recorded boxes: no device sync)."""
    rows = torch.nonzero(erase[:, 2] > 0).flatten()
    if not len(rows):
        return x
    size, device = x.shape[-1], x.device
    e = erase[rows]
    top, left, h, w = _boxes(e, size)
    hb, wb = int(h.max()), int(w.max())
    valid = (np.arange(hb)[None, :, None] < h[:, None, None]) & (
        np.arange(wb)[None, None, :] < w[:, None, None]
    )
    n_i, dy, dx = np.nonzero(valid)  # [m]: the pixels of every box
    flat = torch.from_numpy((n_i * hb + dy) * wb + dx)
    where = [torch.from_numpy(v) for v in (rows.numpy()[n_i], top[n_i] + dy, left[n_i] + dx)]
    fill = to_device(e[:, 4:7], device, torch.float64).view(-1, 3, 1, 1).expand(-1, -1, hb, wb)
    if bool((e[:, 7] > 0).any()):
        std = to_device(torch.tensor(NOISE_STD, dtype=torch.float64), device).view(1, 3, 1, 1)
        noisy = to_device(e[:, 7] > 0, device, torch.float64).view(-1, 1, 1, 1)
        fill = fill + hash_noise(e[:, 7].double(), hb, wb, device) * std * noisy
    values = fill.clamp(0.0, 1.0).to(x.dtype).permute(0, 2, 3, 1).reshape(-1, 3)
    n_idx, y_idx, x_idx = (to_device(t, device) for t in where)
    x[n_idx, :, y_idx, x_idx] = values.index_select(0, to_device(flat, device))
    return x
