"""Random erasing as timm's ``RandomErasing`` (one box), recorded per view and replayed at any size.

Drawn like timm: with probability p, up to 10 tries of an area fraction in ``erase_area`` and an
aspect ratio h / w log-uniform in ``erase_aspect``; the first box that fits inside the view is kept
(none fits: no erasing). The box is recorded in fractions of the view, so the teacher and the student
erase the same region at their sizes; its pixels are ``floor(fraction * size + 0.5)`` as the crop's.

The fill is in pixel space (timm erases the normalised tensor; here teacher and student normalise
differently, so the fill is defined before normalisation, as timm's fill for ImageNet mean / std):
``const`` the ImageNet mean colour, ``rand`` one colour N(mean, std) per view (recorded), ``pixel``
per-pixel noise N(mean, std): the view records a noise seed, and the noise is a counter-based hash of
(seed, channel, row, column) computed in integers and float64 on the view's device, so it is the same
on the CPU and on a GPU (white noise at each size: the same distribution, not the same pixels).
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def hash_noise(seeds: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """Standard normal float64 [n, 3, size, size], a pure function of (seed, channel, row, column)."""
    n = len(seeds)
    cells = torch.arange(3 * size * size, dtype=torch.int64, device=device).view(1, 3, size, size)
    s = _mix32(seeds.to(device, torch.int64).view(n, 1, 1, 1) & _MASK32)
    a = _mix32((_mix32(cells) ^ s) & _MASK32)
    b = _mix32((a ^ 0x9E3779B9) & _MASK32)
    u1 = ((a >> 8).double() + 0.5) / (1 << 24)
    u2 = ((b >> 8).double() + 0.5) / (1 << 24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def apply_erasing(x: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    """Erase the recorded boxes of float [B, 3, S, S] in [0, 1]; erase: CPU float [B, 8]. In place."""
    rows = torch.nonzero(erase[:, 2] > 0).flatten()
    if not len(rows):
        return x
    size = x.shape[-1]
    e = erase[rows].double()
    h = (e[:, 2] * size + 0.5).floor().clamp(1, size)
    w = (e[:, 3] * size + 0.5).floor().clamp(1, size)
    top = torch.minimum((e[:, 0] * size + 0.5).floor().clamp_min(0), size - h)
    left = torch.minimum((e[:, 1] * size + 0.5).floor().clamp_min(0), size - w)
    pos = torch.arange(size, dtype=torch.float64)
    in_y = (pos[None] >= top[:, None]) & (pos[None] < (top + h)[:, None])
    in_x = (pos[None] >= left[:, None]) & (pos[None] < (left + w)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).to(x.device)  # [n, 1, S, S]
    fill = e[:, 4:7].view(-1, 3, 1, 1).to(x.device).expand(-1, -1, size, size)
    noisy = e[:, 7] > 0
    if bool(noisy.any()):
        std = torch.tensor(NOISE_STD, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
        noise = hash_noise(e[:, 7], size, x.device) * std * noisy.to(x.device).view(-1, 1, 1, 1)
        fill = fill + noise
    idx = rows.to(x.device)
    x.index_copy_(0, idx, torch.where(mask, fill.clamp(0.0, 1.0).to(x.dtype), x[idx]))
    return x
