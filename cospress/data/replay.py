"""Replay recorded views: per image (:func:`replay_view`, CPU workers) and batched (:func:`replay_views_batch`).

Replay order: crop -> resize to size x size (bilinear, antialias) -> flip -> RandAugment (version 2)
-> brightness -> contrast -> saturation -> hue -> grayscale -> blur -> random erasing (version 2)
-> round to uint8. A row of 11 values is a version 1 view, of 27 a version 2 view (``policy``).
The box in pixels is ``floor(fraction * size_px + 0.5)``, clamped inside the image; the blur kernel
has ``2 * ceil(3 sigma) + 1`` taps with reflect padding. The work is done in float32 in [0, 1].

Very large downscales (an axis shrinking more than ``PRESHRINK_ABOVE`` = 64x, e.g. 64 px students of
30+ MP images) are first area-averaged (``adaptive_avg_pool2d``) to ``PRESHRINK_TO`` = 32x the output
size on every device, then resized: CUDA's antialiased kernel fails beyond ~94x, and both paths stay
equal. Below 64x nothing changes.

The batched path on a GPU (``batched=True``, the default off the CPU) does the crop + resize of the
whole batch as two batched matmuls with the antialias weights of PyTorch's kernel (crop offsets and
the pre-shrink folded in): one copy per distinct image + 2 matmuls instead of ~3 kernels per view.
RandAugment and erasing are one code for both paths (``randaugment``, ``erasing``).

Agreement of :func:`replay_views_batch` with :func:`replay_view` (tests/test_views.py,
tests/test_replay_batched.py): the batched colour ops within 1 grey level (max abs difference); the
batched matmul resize within 1 grey level of F.interpolate (float difference < 1e-4). RandAugment's
threshold ops (solarize, posterize, equalize) can turn such a 1-level input difference into a
larger one: with RandAugment, >= 99.5% of the pixels agree within 1 grey level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cospress.data.erasing import apply_erasing
from cospress.data.policy import ERASE_NAMES, IDX, PARAM_NAMES, RA_NAMES, layout_version
from cospress.data.randaugment import apply_rand_augment
from cospress.data.resize import batched_crop_resize, box_pixels, resize
from cospress.runtime import to_device

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision
_E0, _RA0 = IDX[ERASE_NAMES[0]], IDX[RA_NAMES[0]]


def _kernel_size(sigma_px: float, size: int) -> int:
    return min(2 * math.ceil(3.0 * sigma_px) + 1, 2 * size - 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def as_uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
    return image


def _colour_single(x: torch.Tensor, p: list[float], size: int) -> torch.Tensor:
    """Version 1's colour ops and blur on one float [3, S, S] view (torchvision ops)."""
    for name, op in (
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
    ):
        if p[IDX[name]] != 1.0:  # factor 1 is the identity on [0, 1] images
            x = op(x, p[IDX[name]])
    if p[IDX["hue"]] != 0.0:
        x = TF.adjust_hue(x, p[IDX["hue"]])
    if p[IDX["grayscale"]] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    sigma = p[IDX["blur_sigma"]] * size
    if sigma > 0:
        k = _kernel_size(sigma, size)
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return x


def replay_view(
    image: Image.Image | torch.Tensor, params: np.ndarray | torch.Tensor, size: int
) -> torch.Tensor:
    """Replay one recorded view on `image` (PIL or uint8 [3, H, W]); returns uint8 [3, size, size]."""
    img = as_uint8_chw(image)
    p = [float(v) for v in params]
    version = layout_version(len(p))
    top, left, h, w = box_pixels(p, img.shape[-1], img.shape[-2])
    # crop, then antialiased bilinear resize: what TF.resized_crop does for a float tensor and a box
    # inside the image, called directly (its dispatch cost as much as the resize for small images)
    x = img[:, top : top + h, left : left + w].to(torch.float32).div_(255.0)
    if (h, w) != (size, size):
        x = resize(x[None], size)[0]
    if p[IDX["flip"]] > 0.5:
        x = TF.horizontal_flip(x)
    if version == 2:
        row = torch.tensor(p, dtype=torch.float32)[None]
        x = apply_rand_augment(x[None], row[:, _RA0:])[0]
    x = _colour_single(x, p, size)
    if version == 2:
        x = apply_erasing(x[None].contiguous(), row[:, _E0 : _E0 + len(ERASE_NAMES)])[0]
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
    kern = to_device(weights, x.device).repeat_interleave(c, 0)  # [B*3, K]
    y = F.pad(x.reshape(1, bsz * c, size, size), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=bsz * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=bsz * c)
    return y.reshape(bsz, c, size, size)


def _colour_batch(x: torch.Tensor, p: torch.Tensor, p_cpu: torch.Tensor, size: int) -> torch.Tensor:
    """Version 1's colour ops and blur, vectorised; only the images an op changes are touched."""
    device = x.device

    def rows(mask: torch.Tensor) -> torch.Tensor | None:
        idx = torch.nonzero(mask).flatten()
        return to_device(idx, device) if len(idx) else None

    def factor(idx: torch.Tensor, name: str) -> torch.Tensor:
        return p[idx, IDX[name]].view(-1, 1, 1, 1)

    if (idx := rows(p_cpu[:, IDX["brightness"]] != 1)) is not None:
        x.index_copy_(0, idx, _blend(x[idx], torch.zeros_like(x[idx]), factor(idx, "brightness")))
    if (idx := rows(p_cpu[:, IDX["contrast"]] != 1)) is not None:
        y = x[idx]
        x.index_copy_(0, idx, _blend(y, _gray(y).mean(dim=(1, 2, 3), keepdim=True), factor(idx, "contrast")))
    if (idx := rows(p_cpu[:, IDX["saturation"]] != 1)) is not None:
        y = x[idx]
        x.index_copy_(0, idx, _blend(y, _gray(y), factor(idx, "saturation")))
    if (idx := rows(p_cpu[:, IDX["hue"]] != 0)) is not None:
        x.index_copy_(0, idx, _shift_hue(x[idx], p[idx, IDX["hue"]].view(-1, 1, 1)))
    if (idx := rows(p_cpu[:, IDX["grayscale"]] > 0.5)) is not None:
        x.index_copy_(0, idx, _gray(x[idx]).expand(-1, 3, -1, -1))
    blur = p_cpu[:, IDX["blur_sigma"]]
    if (idx := rows(blur > 0)) is not None:
        x.index_copy_(0, idx, _blur_batch(x[idx], blur[blur > 0] * size))
    return x


def _crop_resize_loop(imgs: list[torch.Tensor], p_cpu: torch.Tensor, size: int) -> torch.Tensor:
    """Per view: crop, float, antialiased resize (as :func:`replay_view`)."""
    crops = []
    for img, row in zip(imgs, p_cpu, strict=True):
        top, left, h, w = box_pixels(row, img.shape[-1], img.shape[-2])
        crop = img[None, :, top : top + h, left : left + w].to(torch.float32).div_(255.0)
        crops.append(resize(crop, size, force=True))
    return torch.cat(crops)


def replay_views_batch(
    images: torch.Tensor | list[torch.Tensor],
    params: torch.Tensor | np.ndarray,
    size: int,
    batched: bool | None = None,
) -> torch.Tensor:
    """Replay B views on their images, on the images' device (CPU or CUDA).

    images: uint8 [B, 3, H, W] or a list of uint8 [3, H_i, W_i] (the same tensor object for the
    views of one image); params: [B, P]. ``batched``: crop + resize as batched matmuls (default: off
    the CPU) or per view. Returns uint8 [B, 3, size, size], within 1 grey level of :func:`replay_view`.
    """
    imgs = [as_uint8_chw(i) for i in (images.unbind(0) if isinstance(images, torch.Tensor) else images)]
    if not imgs:
        raise ValueError("replay_views_batch needs at least one image")
    device = imgs[0].device
    p_cpu = torch.as_tensor(params, dtype=torch.float32).cpu()
    if p_cpu.ndim != 2 or len(p_cpu) != len(imgs):
        raise ValueError(f"params must be [{len(imgs)}, P], got {tuple(p_cpu.shape)}")
    version = layout_version(p_cpu.shape[1])
    if batched is None:
        batched = device.type != "cpu"
    if batched:
        x = batched_crop_resize(imgs, p_cpu, size)
    else:
        x = _crop_resize_loop(imgs, p_cpu, size)
    x = x.clamp_(0.0, 1.0)
    p = to_device(p_cpu, device)
    if (idx := torch.nonzero(p_cpu[:, IDX["flip"]] > 0.5).flatten()).numel():
        idx = to_device(idx, device)
        x.index_copy_(0, idx, x[idx].flip(-1))
    if version == 2:
        x = apply_rand_augment(x, p_cpu[:, _RA0:])
    x = _colour_batch(x, p, p_cpu, size)
    if version == 2:
        x = apply_erasing(x, p_cpu[:, _E0 : _E0 + len(ERASE_NAMES)])
    return _to_uint8(x)


__all__ = ["PARAM_NAMES", "as_uint8_chw", "replay_view", "replay_views_batch"]
