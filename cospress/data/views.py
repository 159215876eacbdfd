"""Seeded augmentation views: sample their parameters once, record them, replay them at any resolution.

A view is a vector of ``policy.num_params`` float32 values drawn by a counter-based RNG (numpy
Philox) keyed by ``sha256([seed, key, view])``: the same (seed, key, view) gives the same view in
any order, worker or rank. Stage 1 stores these vectors; stage 2 replays them (never the RNG), so
teacher and student see the same crop at their own resolutions.

Recorded values, version 1 (``PARAM_NAMES``, in order; version 2 adds erasing and RandAugment, see
``cospress.data.policy``):
  crop_top, crop_left      top-left corner of the crop box, fractions of the image height / width
  crop_height, crop_width  box size, fractions of the image height / width (1, 1 = whole image)
  flip                     1 = horizontal flip, 0 = none
  brightness, contrast, saturation   blend factors (identity 1); applied in this order, then hue
  hue                      hue shift in turns, [-0.5, 0.5] (identity 0)
  grayscale                1 = convert to grey (3 equal channels), 0 = none
  blur_sigma               gaussian blur sigma as a fraction of the output size (0 = none); the
                           policy's sigma range is in pixels at 224 px, so fraction = sigma / 224

Version 2's RandAugment and erasing are drawn from a second keyed stream,
``sha256([seed, key, view, "v2"])``, so a version 2 policy draws the same crops, flips and colours
as the version 1 policy with the same settings.

This module is the entry point: the policy lives in ``policy``, replay in ``replay`` (per image, in
DataLoader workers; batched, on a GPU), the version 2 ops in ``randaugment`` and ``erasing``.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from cospress.data.erasing import sample_erasing
from cospress.data.policy import (
    ERASE_NAMES,
    IDX,
    NUM_PARAMS,
    NUM_PARAMS_V2,
    PARAM_NAMES,
    PARAM_NAMES_V2,
    RA_NAMES,
    VIEW_POLICY_VERSION,
    ViewPolicy,
    layout_version,
    param_names,
)
from cospress.data.randaugment import parse_rand_augment, sample_rand_augment
from cospress.data.replay import replay_view, replay_views_batch

_BLUR_REF_SIZE = 224.0


# ---------------------------------------------------------------------------------------------- sampling


def _rng(seed: int, key: str, view: int, *stream: str) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([int(seed), str(key), int(view), *stream]).encode()).digest()
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

    Returns float32 [P] in ``policy.param_names`` order. The photometric draws come first in a fixed
    layout, so they do not depend on how many crop tries were needed.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be positive")
    rng = _rng(seed, key, view)
    u = rng.random(7)  # flip, jitter gate, grayscale gate, blur gate, and spares for later versions
    p = center_view_params(width, height, policy.version).astype(np.float64)
    p[IDX["flip"]] = float(u[0] < policy.flip)
    jitter = rng.random(4)
    if u[1] < policy.color_jitter:
        for j, name in enumerate(("brightness", "contrast", "saturation")):
            s = getattr(policy, name)
            lo = max(0.0, 1.0 - s)
            p[IDX[name]] = lo + (1.0 + s - lo) * jitter[j]
        p[IDX["hue"]] = policy.hue * (2.0 * jitter[3] - 1.0)
    p[IDX["grayscale"]] = float(u[2] < policy.grayscale)
    sigma = policy.blur_sigma[0] + (policy.blur_sigma[1] - policy.blur_sigma[0]) * rng.random()
    if u[3] < policy.blur:
        p[IDX["blur_sigma"]] = sigma / _BLUR_REF_SIZE
    top, left, h, w = _crop_box(rng, width, height, policy.scale, policy.ratio)
    p[:4] = (top / height, left / width, h / height, w / width)
    if policy.version == 2:
        extra = _rng(seed, key, view, "v2")
        p[IDX[ERASE_NAMES[0]] : IDX[ERASE_NAMES[-1]] + 1] = sample_erasing(policy, extra)
        spec = parse_rand_augment(policy.rand_augment)
        if spec is not None:
            p[IDX[RA_NAMES[0]] :] = sample_rand_augment(spec, extra)
    return p.astype(np.float32)


def center_view_params(width: int, height: int, version: int = 1) -> np.ndarray:
    """The whole image (box = full image), no flip, identity colour, no blur (nor RandAugment or
    erasing): float32 [P] in the layout of policy `version`."""
    p = np.zeros(len(param_names(version)), np.float32)
    p[[IDX["crop_height"], IDX["crop_width"]]] = 1.0
    p[[IDX["brightness"], IDX["contrast"], IDX["saturation"]]] = 1.0
    return p


__all__ = [
    "NUM_PARAMS",
    "NUM_PARAMS_V2",
    "PARAM_NAMES",
    "PARAM_NAMES_V2",
    "VIEW_POLICY_VERSION",
    "ViewPolicy",
    "center_view_params",
    "layout_version",
    "param_names",
    "replay_view",
    "replay_views_batch",
    "sample_view_params",
]
