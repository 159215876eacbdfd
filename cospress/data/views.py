"""Seeded augmentation views: sample their parameters once, record them, replay them at any resolution.

A view is a vector of ``P = len(PARAM_NAMES)`` float32 values drawn by a counter-based RNG (numpy
Philox) keyed by ``sha256([seed, key, view])``: the same (seed, key, view) gives the same view in
any order, worker or rank. Stage 1 stores these vectors; stage 2 replays them (never the RNG), so
teacher and student see the same crop at their own resolutions.

Recorded values (``PARAM_NAMES``, in order):
  crop_top, crop_left      top-left corner of the crop box, fractions of the image height / width
  crop_height, crop_width  box size, fractions of the image height / width (1, 1 = whole image)
  flip                     1 = horizontal flip, 0 = none
  brightness, contrast, saturation   blend factors (identity 1); applied in this order, then hue
  hue                      hue shift in turns, [-0.5, 0.5] (identity 0)
  grayscale                1 = convert to grey (3 equal channels), 0 = none
  blur_sigma               gaussian blur sigma as a fraction of the output size (0 = none); the
                           policy's sigma range is in pixels at 224 px, so fraction = sigma / 224

On the CPU, replay each view with :func:`replay_view` in DataLoader workers (cache friendly);
:func:`replay_views_batch` is for a GPU, where the images were decoded.

Replay order: crop -> resize to size x size (bilinear, antialias) -> flip -> brightness ->
contrast -> saturation -> hue -> grayscale -> blur -> round to uint8. The box in pixels is
``floor(fraction * size_px + 0.5)``, clamped inside the image; the blur kernel has
``2 * ceil(3 sigma) + 1`` taps with reflect padding. The work is done in float32
in [0, 1], so :func:`replay_views_batch` (vectorised colour ops, any device) matches the
per-image :func:`replay_view` (torchvision ops) to within 1 grey level (max abs difference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cospress.errors import ConfigError
from cospress.utils import sha256_json

VIEW_POLICY_VERSION = 1
PARAM_NAMES: tuple[str, ...] = (
    "crop_top",
    "crop_left",
    "crop_height",
    "crop_width",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
)
NUM_PARAMS = len(PARAM_NAMES)
_IDX = {n: i for i, n in enumerate(PARAM_NAMES)}
_BLUR_REF_SIZE = 224.0
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


@dataclass(frozen=True)
class ViewPolicy:
    """The augmentation policy. Probabilities are in [0, 1]; jitter strengths as torchvision's ColorJitter."""

    scale: tuple[float, float] = (0.08, 1.0)  # crop area, fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w / h
    flip: float = 0.5
    color_jitter: float = 0.0  # probability of applying brightness/contrast/saturation/hue
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at 224 px
    version: int = VIEW_POLICY_VERSION

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma"):
            lo, hi = (float(v) for v in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not 0 < lo <= hi or (name == "scale" and hi > 1):
                raise ConfigError(f"view policy {name}={(lo, hi)}: need 0 < low <= high (and scale <= 1)")
        for name in ("flip", "color_jitter", "grayscale", "blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"view policy {name}={getattr(self, name)}: a probability must be in [0, 1]"
                )
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"view policy {name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"view policy hue={self.hue}: must be in [0, 0.5]")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown view policy fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def fingerprint(self) -> str:
        """sha256 of :meth:`to_dict` (sorted keys): equal policies have equal fingerprints."""
        return sha256_json(self.to_dict())


# ---------------------------------------------------------------------------------------------- sampling


def _rng(seed: int, key: str, view: int) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([int(seed), str(key), int(view)]).encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, h, w) in pixels: 10 tries, then a centre crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = max(1, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(
    policy: ViewPolicy, seed: int, key: str, view: int, width: int, height: int
) -> np.ndarray:
    """Draw view `view` of sample `key` for an image of `width` x `height` pixels.

    Returns float32 [P] in :data:`PARAM_NAMES` order. The photometric draws come first in a fixed
    layout, so they do not depend on how many crop tries were needed.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be positive")
    rng = _rng(seed, key, view)
    u = rng.random(7)  # flip, jitter gate, grayscale gate, blur gate, and spares for later versions
    p = center_view_params(width, height).astype(np.float64)
    p[_IDX["flip"]] = float(u[0] < policy.flip)
    jitter = rng.random(4)
    if u[1] < policy.color_jitter:
        for j, name in enumerate(("brightness", "contrast", "saturation")):
            s = getattr(policy, name)
            lo = max(0.0, 1.0 - s)
            p[_IDX[name]] = lo + (1.0 + s - lo) * jitter[j]
        p[_IDX["hue"]] = policy.hue * (2.0 * jitter[3] - 1.0)
    p[_IDX["grayscale"]] = float(u[2] < policy.grayscale)
    sigma = policy.blur_sigma[0] + (policy.blur_sigma[1] - policy.blur_sigma[0]) * rng.random()
    if u[3] < policy.blur:
        p[_IDX["blur_sigma"]] = sigma / _BLUR_REF_SIZE
    top, left, h, w = _crop_box(rng, width, height, policy.scale, policy.ratio)
    p[:4] = (top / height, left / width, h / height, w / width)
    return p.astype(np.float32)


def center_view_params(width: int, height: int) -> np.ndarray:
    """The whole image (box = full image), no flip, identity colour, no blur: float32 [P]."""
    p = np.zeros(NUM_PARAMS, np.float32)
    p[[_IDX["crop_height"], _IDX["crop_width"]]] = 1.0
    p[[_IDX["brightness"], _IDX["contrast"], _IDX["saturation"]]] = 1.0
    return p


# ---------------------------------------------------------------------------------------------- replay


def _box_pixels(p: np.ndarray | torch.Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels from fractions, rounded half up and clamped inside the image."""
    ct, cl, ch, cw = (float(v) for v in p[:4])
    h = min(height, max(1, math.floor(ch * height + 0.5)))
    w = min(width, max(1, math.floor(cw * width + 0.5)))
    top = min(height - h, max(0, math.floor(ct * height + 0.5)))
    left = min(width - w, max(0, math.floor(cl * width + 0.5)))
    return top, left, h, w


def _kernel_size(sigma_px: float, size: int) -> int:
    return min(2 * math.ceil(3.0 * sigma_px) + 1, 2 * size - 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _as_uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
    return image


def replay_view(
    image: Image.Image | torch.Tensor, params: np.ndarray | torch.Tensor, size: int
) -> torch.Tensor:
    """Replay one recorded view on `image` (PIL or uint8 [3, H, W]); returns uint8 [3, size, size]."""
    img = _as_uint8_chw(image)
    p = [float(v) for v in params]
    if len(p) != NUM_PARAMS:
        raise ValueError(f"expected {NUM_PARAMS} view params ({', '.join(PARAM_NAMES)}), got {len(p)}")
    top, left, h, w = _box_pixels(params, img.shape[-1], img.shape[-2])
    # crop, then antialiased bilinear resize: what TF.resized_crop does for a float tensor and a box
    # inside the image, called directly (its dispatch cost as much as the resize for small images)
    x = img[:, top : top + h, left : left + w].to(torch.float32).div_(255.0)
    if (h, w) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if p[_IDX["flip"]] > 0.5:
        x = TF.horizontal_flip(x)
    for name, op in (
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
    ):
        if p[_IDX[name]] != 1.0:  # factor 1 is the identity on [0, 1] images
            x = op(x, p[_IDX[name]])
    if p[_IDX["hue"]] != 0.0:
        x = TF.adjust_hue(x, p[_IDX["hue"]])
    if p[_IDX["grayscale"]] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    sigma = p[_IDX["blur_sigma"]] * size
    if sigma > 0:
        k = _kernel_size(sigma, size)
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return _to_uint8(x)


# ---------------------------------------------------------------------------------------------- batched


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of RGB float [B, 3, H, W]."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB float [B, 3, H, W] by `shift` [B, 1, 1] turns.

    Value (max) and chroma (max - min) are kept; each channel is rebuilt from the rotated hue
    sector. A grey pixel has chroma 0, so its (undefined) hue does not matter.
    """
    r, g, b = x.unbind(1)
    v = x.amax(1)
    chroma = v - x.amin(1)
    d = chroma.clamp_min(1e-12)
    sector = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h6 = (sector + 6.0 * shift).remainder_(6.0)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        out.append(v - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


def _blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable gaussian blur (reflect padding) of float [B, 3, S, S]; sigma [B] in pixels."""
    bsz, c, size, _ = x.shape
    sig = [float(s) for s in sigma.cpu()]
    radius = max((_kernel_size(s, size) // 2 if s > 0 else 0) for s in sig)
    if radius == 0:
        return x
    pos = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.zeros(bsz, 2 * radius + 1, dtype=torch.float32)  # built on the CPU, moved once
    for i, s in enumerate(sig):
        if s <= 0:
            weights[i, radius] = 1.0
            continue
        r = _kernel_size(s, size) // 2
        pdf = torch.exp(-0.5 * (pos / s) ** 2) * (pos.abs() <= r)
        weights[i] = pdf / pdf.sum()
    kern = weights.to(x.device).repeat_interleave(c, 0)  # [B*3, K]
    y = F.pad(x.reshape(1, bsz * c, size, size), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=bsz * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=bsz * c)
    return y.reshape(bsz, c, size, size)


def replay_views_batch(
    images: torch.Tensor | list[torch.Tensor], params: torch.Tensor | np.ndarray, size: int
) -> torch.Tensor:
    """Replay B views on their images, on the images' device (CPU or CUDA).

    images: uint8 [B, 3, H, W] or a list of uint8 [3, H_i, W_i]; params: [B, P].
    Returns uint8 [B, 3, size, size], within 1 grey level of :func:`replay_view` per image.
    """
    imgs = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if not imgs:
        raise ValueError("replay_views_batch needs at least one image")
    device = imgs[0].device
    p = torch.as_tensor(params, dtype=torch.float32)
    if p.shape != (len(imgs), NUM_PARAMS):
        raise ValueError(f"params must be [{len(imgs)}, {NUM_PARAMS}], got {tuple(p.shape)}")
    p_cpu = p.cpu()
    crops = []
    for img, row in zip(imgs, p_cpu, strict=True):
        img = _as_uint8_chw(img)
        top, left, h, w = _box_pixels(row, img.shape[-1], img.shape[-2])
        crop = img[None, :, top : top + h, left : left + w].to(torch.float32).div_(255.0)
        crops.append(
            F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        )
    x = torch.cat(crops).clamp_(0.0, 1.0)
    p = p.to(device)

    def rows(mask: torch.Tensor) -> torch.Tensor | None:
        """Indices (on `device`) of the images an op changes; None when it changes none."""
        idx = torch.nonzero(mask).flatten()
        return idx.to(device) if len(idx) else None

    def factor(idx: torch.Tensor, name: str) -> torch.Tensor:
        return p[idx, _IDX[name]].view(-1, 1, 1, 1)

    # Only the images an op changes are touched: identity ops are skipped (equal results, less memory traffic).
    if (idx := rows(p_cpu[:, _IDX["flip"]] > 0.5)) is not None:
        x.index_copy_(0, idx, x[idx].flip(-1))
    if (idx := rows(p_cpu[:, _IDX["brightness"]] != 1)) is not None:
        x.index_copy_(0, idx, _blend(x[idx], torch.zeros_like(x[idx]), factor(idx, "brightness")))
    if (idx := rows(p_cpu[:, _IDX["contrast"]] != 1)) is not None:
        y = x[idx]
        x.index_copy_(0, idx, _blend(y, _gray(y).mean(dim=(1, 2, 3), keepdim=True), factor(idx, "contrast")))
    if (idx := rows(p_cpu[:, _IDX["saturation"]] != 1)) is not None:
        y = x[idx]
        x.index_copy_(0, idx, _blend(y, _gray(y), factor(idx, "saturation")))
    if (idx := rows(p_cpu[:, _IDX["hue"]] != 0)) is not None:
        x.index_copy_(0, idx, _shift_hue(x[idx], p[idx, _IDX["hue"]].view(-1, 1, 1)))
    if (idx := rows(p_cpu[:, _IDX["grayscale"]] > 0.5)) is not None:
        x.index_copy_(0, idx, _gray(x[idx]).expand(-1, 3, -1, -1))
    blur = p_cpu[:, _IDX["blur_sigma"]]
    if (idx := rows(blur > 0)) is not None:
        x.index_copy_(0, idx, _blur_batch(x[idx], blur[blur > 0] * size))
    return _to_uint8(x)
